"""Write tests/fixtures/official_sprint_tiny.safetensors and official_sprint_tiny_io.npz: a tiny
SPRINT built by snap-research/Sprint's own `src/models/sit.py` on random weights, and its outputs
(tests/test_sprint.py reads both; tests/test_sample_cli.py samples from the weights).

The .safetensors holds the model's state dict under the official names (float32), as a released
file does. The .npz holds the inputs and the official outputs, computed with the model cast to
float64: `x, t, y, out_full` (all tokens; y's last label is the null label), `ids_keep,
out_masked` (the official structured drop, 75% by default, kept token indices row-major over the
token grid), `pdg_x, pdg_t, pdg_y, out_pdg` (path-drop guidance, `forward(...,
path_drop_guidance=True)`: first half the labels with the deep path, second half the null label
with the deep path dropped) and `config` (JSON).

Random draws (torch's global generator, seeded --seed, in this order): every tensor of the state
dict (see `randomize`), then x, t, the labels, then the kept tokens of the official
`prepare_mask_and_input`.

    python tools/conformance/official_sprint_tiny.py --sprint ~/src/Sprint
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official  # noqa: E402

OUTPUTS = ("official_sprint_tiny.safetensors", "official_sprint_tiny_io.npz")
PINNED = {"snap-research/Sprint": "12c5fc90cc69a5ab6524225ee10515684d982f20"}
# the rest of network_config in the official configs/train/SIT_XL_SPRINT_256.yaml
NETWORK = dict(class_dropout_prob=0.1, use_swiglu_large=True, q_norm="RMSNorm", k_norm="RMSNorm",
               representation_align=False, use_mask_restore=True, cfg_mask_prob=0.1,
               residual_type="concat_linear", use_checkpoint=False)


def build(config):
    """The official SiT of `config` (our JSON: depths = encoder, middle, decoder)."""
    from src.models.sit import SiT
    encoder, middle, decoder = config["depths"]
    return SiT(context_size=config["context_size"], patch_size=config["patch_size"],
               in_channels=config["in_channels"], hidden_size=config["hidden_size"],
               num_heads=config["num_heads"], num_classes=config["num_classes"],
               encoder_depth=encoder, middle_depth=middle, decoder_depth=decoder, **NETWORK)


@torch.no_grad()
def randomize(model):
    """Every tensor of the state dict random (the official init zeroes the adaLN and output layers):
    RMSNorm weights 1 + 0.1 N(0, 1), other tensors of >= 2 dims (mask_token too) N(0, 1 / fan_in)
    with fan_in their last size, biases 0.1 N(0, 1)."""
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn_like(p))
        elif p.dim() >= 2:
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        else:
            p.copy_(0.1 * torch.randn_like(p))
    return model


def mask_dict(ids_keep, n):
    """The official mask_dict for kept tokens `ids_keep` (B, M) out of n: `ids_restore` puts
    cat([kept, the rest ascending]) back in grid order (what restore_full_sequence gathers by)."""
    kept = torch.zeros(len(ids_keep), n, dtype=torch.bool).scatter_(1, ids_keep, True)
    rest = torch.arange(n).expand(len(ids_keep), n)[~kept].view(len(ids_keep), -1)
    return {"ids_keep": ids_keep, "ids_restore": torch.cat([ids_keep, rest], 1).argsort(1)}


@torch.no_grad()
def compute(config, state_dict, x, t, y, ids_keep, pdg_y):
    """The official outputs of the model with `state_dict`, in float64 and eval mode."""
    model = build(config)
    model.load_state_dict(state_dict)
    model = model.double().eval()
    n = (config["context_size"] // config["patch_size"]) ** 2
    return dict(out_full=model(x, t, y)[0],
                out_masked=model(x, t, y, mask_dict=mask_dict(ids_keep, n))[0],
                out_pdg=model(torch.cat([x, x]), torch.cat([t, t]), pdg_y,
                              path_drop_guidance=True)[0])


def parser(doc, hidden_size, batch):
    """The command line of both SPRINT generators: the model's configuration and the batch."""
    p = official.parser(doc, PINNED)
    p.add_argument("--context-size", type=int, default=8, help="latent side")
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=4,
                   help="keep 4: sample.py reads a released file as SD-VAE latents")
    p.add_argument("--hidden-size", type=int, default=hidden_size)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--depths", type=int, nargs=3, default=[1, 2, 1],
                   metavar=("ENCODER", "MIDDLE", "DECODER"))
    p.add_argument("--mask-ratio", type=float, default=0.75, choices=[0.5, 0.625, 0.75, 0.875],
                   help="the official structured drops")
    p.add_argument("--batch", type=int, default=batch)
    return p


def model_config(args):
    """The fixture's `config`: the model's arguments and the official drop."""
    return dict(context_size=args.context_size, patch_size=args.patch_size,
                in_channels=args.in_channels, hidden_size=args.hidden_size,
                num_heads=args.num_heads, num_classes=args.num_classes, depths=args.depths,
                mask_type="structured_with_random_offset", mask_ratio=args.mask_ratio)


def main():
    args = parser(__doc__, hidden_size=96, batch=4).parse_args()
    official.checkouts(args, PINNED)
    from src.utils.utils import prepare_mask_and_input
    config = model_config(args)

    torch.manual_seed(args.seed)
    model = randomize(build(config))
    B, C, S, null = args.batch, args.in_channels, args.context_size, args.num_classes
    x = torch.randn(B, C, S, S, dtype=torch.float64)
    t = torch.rand(B, dtype=torch.float64)
    labels = torch.randint(args.num_classes, (B,))
    y = torch.cat([labels[:-1], torch.tensor([null])])             # the last one unconditional
    pdg_y = torch.cat([labels, torch.full_like(labels, null)])
    # the kept tokens as the official training draws them (here from the token sequence, so that
    # any patch size works; the image form assumes patch 2)
    ids_keep = prepare_mask_and_input(images=model.flatten(x), mask_type=config["mask_type"],
                                      mask_ratio=config["mask_ratio"])["ids_keep"]

    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    out = compute(config, state_dict, x, t, y, ids_keep, pdg_y)
    arrays = dict(x=x, t=t, y=y, ids_keep=ids_keep, out_full=out["out_full"],
                  out_masked=out["out_masked"], pdg_x=torch.cat([x, x]), pdg_t=torch.cat([t, t]),
                  pdg_y=pdg_y, out_pdg=out["out_pdg"])
    arrays = {**{k: v.numpy() for k, v in arrays.items()}, "config": config}

    from safetensors.torch import save_file
    weights = args.out / OUTPUTS[0]
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, weights.with_suffix(".tmp"))               # written whole or not at all
    os.replace(weights.with_suffix(".tmp"), weights)
    print(f"wrote {weights}: {len(state_dict)} tensors")
    official.save_npz(args.out / OUTPUTS[1], arrays)


if __name__ == "__main__":
    main()
