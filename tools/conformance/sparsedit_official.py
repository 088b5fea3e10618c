"""Write tests/fixtures/sparsedit_official.npz: changsn/SparseDiT's own `models.py` and
`load_model.py` (its timm layers) with facebookresearch/DiT's `models.py`, on random weights
(tests/test_sparsedit.py reads it).

What it holds: `config_*`; `dit/<name>` (a DiT's state dict as a released DiT file stores it);
`sparse/<name>` (a SparseDiT's state dict in SparseDiT's own names, every parameter random, the
recovery blocks' `merged_layer1/2` weights and biases too); `x, t, y` (integer timesteps, y = 10 the
null label); `sides` (SparseDiT's `semantic_size`: the side of its `AdaptiveAvgPool2d`, fixed per
model); `conv_side{s}`: the DiT converted into a SparseDiT by SparseDiT's `load_model` exactly as
its train.py does (`--pretrained`), run at side s; `rand_side{s}`: the random SparseDiT at side s;
`dit_out`: the DiT itself.

Random draws (all from torch's global generator, seeded --seed, in this order): the DiT's own
initialisation, its weights (every one but the fixed sin-cos table: matrices 0.02 N(0, 1), vectors
0.05 N(0, 1)), the initialisation of the SparseDiT train.py builds (what the conversion leaves:
merged_layer1 = 0, merged_layer2 = I), that of a second SparseDiT and its random weights (as the
DiT's), then x.

    python tools/conformance/sparsedit_official.py --dit ~/src/DiT --sparsedit ~/src/SparseDiT
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official  # noqa: E402

OUTPUTS = ("sparsedit_official.npz",)
PINNED = {"facebookresearch/DiT": "ed81ce2229091fd4ecc9a223645f95cf379d582b",
          "changsn/SparseDiT": "fc6917b9eea68fc647ce78b3ff0d8d1cb727f734"}
T = (0, 1, 250, 500, 998, 999)                                   # DiT timesteps of the 6 samples


def randomize(model):
    """Every parameter random but the fixed sin-cos table (adaLN gates and output layer too)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.05))
    return model


def draw(dit_models, sparse_models, dit_config, sparse_config):
    """The random DiT, the SparseDiT train.py builds (its own initialisation), a random SparseDiT
    and the inputs (y: K = num_classes is the null label)."""
    dit = randomize(dit_models.DiT(**dit_config))
    trainee = sparse_models.DiT(**sparse_config)
    sparse = randomize(sparse_models.DiT(**sparse_config))
    S, K = dit_config["input_size"], dit_config["num_classes"]
    x = torch.randn(len(T), 4, S, S)
    y = torch.tensor([0, K - 1, K, 1, K, 2])
    return dit.state_dict(), trainee.state_dict(), sparse.state_dict(), (x, torch.tensor(T), y)


@torch.no_grad()
def compute(dit_models, sparse_models, load_model, dit_config, sparse_config, dit_sd, trainee_sd,
            sparse_sd, inputs, sides):
    """dit_out, and conv_side{s} and rand_side{s} for each side s."""
    dit = dit_models.DiT(**dit_config).eval()
    dit.load_state_dict(dit_sd)
    out = {}
    for side in sides:
        model = sparse_models.DiT(**sparse_config, semantic_size=side).eval()
        model.longshortcut = False          # read by forward, never set by __init__ at this commit
        model.load_state_dict(trainee_sd)
        # train.py --pretrained: a released file is a bare state dict (no "ema"), blocks in order
        pretrained = dict(dit_sd)           # load_model deletes what it takes from it
        target_modules = model.module_name
        source_modules = ["blocks.{}".format(i) for i in range(len(target_modules))]
        new, missing, unexpected = load_model(model.state_dict(), pretrained, target_modules,
                                              source_modules, verbose=True)
        model.load_state_dict(new)
        if side == sides[0]:                # what a DiT lacks keeps train.py's initialisation
            print("load_model: missing", sorted({k.split(".")[-2] for k in missing}),
                  "unexpected", sorted({k.split(".", 2)[2] for k in unexpected}))
        out[f"conv_side{side}"] = model(*inputs)
        model.load_state_dict(sparse_sd)
        out[f"rand_side{side}"] = model(*inputs)
    out["dit_out"] = dit(*inputs)
    return out


def main():
    p = official.parser(__doc__, PINNED)
    p.add_argument("--input-size", type=int, default=16)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--num-poolingformer", type=int, default=1)
    p.add_argument("--num-dumbbell", type=int, default=2)
    p.add_argument("--dumbbell-group", type=int, nargs=4, default=[1, 3, 1, 1],
                   help="generation, sparse, recovery and dense blocks of each dumbbell")
    p.add_argument("--num-normal-block", type=int, default=1)
    p.add_argument("--sides", type=int, nargs="+", default=[3, 4, 6])
    args = p.parse_args()
    dit_clone, sparse_clone = official.checkouts(args, PINNED)
    dit_models = official.module("dit_models", dit_clone / "models.py")
    sparse_models = official.module("sparsedit_models", sparse_clone / "models.py")
    load_model = official.module("sparsedit_load_model", sparse_clone / "load_model.py").load_model

    config = {k: getattr(args, k) for k in ("input_size", "patch_size", "hidden_size", "num_heads",
                                            "num_poolingformer", "num_dumbbell",
                                            "num_normal_block", "num_classes")}
    config["depth"] = (args.num_poolingformer + args.num_dumbbell * sum(args.dumbbell_group)
                       + args.num_normal_block)
    dit_config = {k: config[k] for k in ("input_size", "patch_size", "hidden_size", "depth",
                                         "num_heads", "num_classes")}
    sparse_config = dict(config, dumbbell_group=args.dumbbell_group)
    torch.manual_seed(args.seed)
    dit_sd, trainee_sd, sparse_sd, inputs = draw(dit_models, sparse_models, dit_config,
                                                 sparse_config)
    out = compute(dit_models, sparse_models, load_model, dit_config, sparse_config, dit_sd,
                  trainee_sd, sparse_sd, inputs, args.sides)

    arrays = dict(zip("xty", inputs), sides=torch.tensor(args.sides), **out)
    arrays.update({f"dit/{k}": v for k, v in dit_sd.items()})
    arrays.update({f"sparse/{k}": v for k, v in sparse_sd.items()})
    config.update(seed=args.seed, dumbbell_group=args.dumbbell_group)
    arrays.update({f"config_{k}": v for k, v in config.items()})
    official.save_npz(args.out / OUTPUTS[0], arrays)


if __name__ == "__main__":
    main()
