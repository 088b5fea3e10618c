"""Write tests/fixtures/dit_official.npz: facebookresearch/DiT's own `models.py` and `diffusion/` on
random weights (tests/test_dit.py reads it).

What it holds: `config_*` (the DiT's arguments); `sd/<name>` (the state dict as a released DiT file
stores it); the forward pass (`fwd_*`), `forward_with_cfg` (`cfg_*`), the per-sample terms of
`create_diffusion("").training_losses` (`loss_*`), the kept timesteps of
`space_timesteps(1000, "25")` and `"250"` (`steps25`, `steps250`), `p_mean_variance` of the 25-step
diffusion (`pmv_*`) and sample.py's loop (25 steps, guidance 4, the batch doubled with null
labels, `forward_with_cfg`; `chain_noise[k]`: the noise p_sample draws at its k-th step, index 24
down to 0, for the conditional half, the one kept).

Random draws (all from torch's global generator, seeded --seed, then in this order): the DiT's own
initialisation, every weight but the fixed sin-cos table ~ 0.15 N(0, 1) (the final linear layer's
0.02 N(0, 1)), then the inputs, then the noise of each of the chain's steps.

    python tools/conformance/dit_official.py --dit ~/src/DiT
"""
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official  # noqa: E402

OUTPUTS = ("dit_official.npz",)
PINNED = {"facebookresearch/DiT": "ed81ce2229091fd4ecc9a223645f95cf379d582b"}
STEPS, CHAIN_SCALE, CFG_SCALE = 25, 4.0, 1.5                     # the chain; forward_with_cfg


def draw(DiT, config):
    """The official DiT with random weights, and the inputs (K = num_classes is the null label)."""
    model = DiT(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":                              # keep DiT's sin-cos table
                std = 0.02 if name.startswith("final_layer.linear") else 0.15
                p.copy_(torch.randn_like(p) * std)
    K, C, S = config["num_classes"], config["in_channels"], config["input_size"]
    fwd_x = torch.randn(6, C, S, S)
    half = torch.randn(3, C, S, S)                               # forward_with_cfg reads half
    return model, dict(
        fwd_x=fwd_x, fwd_t=torch.tensor([0, 1, 250, 500, 998, 999]),
        fwd_y=torch.tensor([0, K - 1, K, 1, K, 2]),
        cfg_x=torch.cat([half, half]), cfg_t=torch.tensor([10, 400, 900] * 2),
        cfg_y=torch.tensor([1, 0, K - 1, K, K, K]), cfg_scale=CFG_SCALE,
        loss_x0=torch.randn(6, C, S, S), loss_t=torch.tensor([0, 3, 100, 500, 900, 999]),
        loss_y=torch.tensor([0, 1, 2, K, 1, 0]), loss_noise=torch.randn(6, C, S, S),
        pmv_x=torch.randn(4, C, S, S), pmv_i=torch.tensor([STEPS - 1, STEPS // 2, 1, 0]),
        pmv_y=torch.tensor([0, 1, K, 2]),
        chain_z=torch.randn(3, C, S, S), chain_y=torch.tensor([0, 1, K - 1]),
        # what p_sample's th.randn_like(x) draws at each step: the doubled batch's noise
        chain_noise=torch.randn(STEPS, 6, C, S, S), chain_scale=CHAIN_SCALE,
    )


@torch.no_grad()
def compute(model, io):
    """The official outputs for `io` (its chain_noise: each step's noise for the doubled batch)."""
    from diffusion import create_diffusion, space_timesteps
    K = model.y_embedder.num_classes
    out = dict(fwd_out=model(io["fwd_x"], io["fwd_t"], io["fwd_y"]),
               cfg_out=model.forward_with_cfg(*(io[f"cfg_{k}"] for k in ("x", "t", "y", "scale"))))
    terms = create_diffusion("").training_losses(model, io["loss_x0"], io["loss_t"],
                                                 dict(y=io["loss_y"]), noise=io["loss_noise"])
    out.update(loss_mse=terms["mse"], loss_vb=terms["vb"], loss_loss=terms["loss"])
    out["steps25"] = torch.tensor(sorted(space_timesteps(1000, "25")))
    out["steps250"] = torch.tensor(sorted(space_timesteps(1000, "250")))
    diffusion = create_diffusion(str(STEPS))
    pmv = diffusion.p_mean_variance(model, io["pmv_x"], io["pmv_i"], clip_denoised=False,
                                    model_kwargs=dict(y=io["pmv_y"]))
    out.update({f"pmv_{k}": pmv[k] for k in ("mean", "log_variance", "pred_xstart")})
    # sample.py's loop; p_sample's own draw replaced by the recorded noise (the same numbers)
    z, y = io["chain_z"], io["chain_y"]
    noises = iter(io["chain_noise"])
    with mock.patch.object(torch, "randn_like", lambda x: next(noises)):
        samples = diffusion.p_sample_loop(
            model.forward_with_cfg, (2 * len(z), *z.shape[1:]), torch.cat([z, z]),
            clip_denoised=False, device="cpu",
            model_kwargs=dict(y=torch.cat([y, torch.full_like(y, K)]), cfg_scale=io["chain_scale"]))
    out["chain_out"] = samples[:len(z)]                           # the null half removed
    return out


def main():
    p = official.parser(__doc__, PINNED)
    p.add_argument("--input-size", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=10)
    args = p.parse_args()
    (clone,) = official.checkouts(args, PINNED)
    models = official.module("dit_models", clone / "models.py")
    config = dict(input_size=args.input_size, patch_size=args.patch_size,
                  in_channels=args.in_channels, hidden_size=args.hidden_size, depth=args.depth,
                  num_heads=args.num_heads, mlp_ratio=4.0, class_dropout_prob=0.1,
                  num_classes=args.num_classes, learn_sigma=True)
    torch.manual_seed(args.seed)
    model, io = draw(models.DiT, config)
    out = compute(model, io)
    io["chain_noise"] = io["chain_noise"][:, :len(io["chain_z"])]  # the kept half's noise
    arrays = {f"config_{k}": v for k, v in config.items()}
    arrays.update({f"sd/{k}": v for k, v in model.state_dict().items()})
    groups = ("fwd", "cfg", "loss", "steps", "pmv", "chain")      # each: its inputs, its outputs
    results = {**io, **out}
    for key in sorted(results, key=lambda k: [k.startswith(g) for g in groups].index(True)):
        arrays[key] = results[key]
    official.save_npz(args.out / OUTPUTS[0], arrays)


if __name__ == "__main__":
    main()
