"""Write tests/fixtures/sprint_train_loss.npz: one training loss of snap-research/Sprint's own
`FlowMatching(prediction "v", path_type "linear", weighting "lognormal").compute_loss` (its
`src/scheduler/flow_matching.py`) on its SiT (`src/models/sit.py`) in training mode, called as its
train.py calls it, with every random draw it made recorded (tests/test_train.py reads it).

What it holds: `config` (JSON); `sd/<name>` (the state dict in the official names, float32, every
tensor random, `mask_token` too); `images` (float32), `y`; what compute_loss drew: `t` (the time
input, sigmoid of a standard normal), `noise`, `ids_keep` (kept tokens of the structured drop,
75% by default, row-major over the token grid); what the model drew in training mode: `y_used`
(labels after the label drop, num_classes = the null label), `path_dropped` (samples whose deep
path output was replaced by mask tokens); `model_out`; `loss_per_sample` (mean over C, H, W of
(out - (noise - images))^2) and `loss` (compute_loss's value, their mean). All computed in
float64: the model and the images cast to double, so that the noise is drawn in float64 (t is
drawn in float32, as the official code draws it, then cast).

Random draws (torch's global generator, seeded --seed, in this order): every tensor of the state
dict (official_sprint_tiny.randomize), images, y, then compute_loss's own draws (t, noise, the kept
tokens, in the model the label drop and the path drop). A seed whose draws drop no label or no path
is refused (the fixture is there to check both); the default, 0, drops 1 label and 3 paths.

    python tools/conformance/sprint_train_loss.py --sprint ~/src/Sprint
"""
import contextlib
import sys
import types
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official  # noqa: E402
from official_sprint_tiny import build, model_config, parser, randomize  # noqa: E402

OUTPUTS = ("sprint_train_loss.npz",)
PINNED = {"snap-research/Sprint": "12c5fc90cc69a5ab6524225ee10515684d982f20"}


@torch.no_grad()
def compute(config, state_dict, images, y):
    """compute_loss once on the model with `state_dict` in float64 and training mode, drawing from
    torch's global generator; every draw read where the official code uses it."""
    from src.scheduler import flow_matching
    model = build(config)
    model.load_state_dict(state_dict)
    model = model.double().train()
    seen = {}

    def model_call(module, args, kwargs):                      # model(x_t, t, y=..., mask_dict=...)
        seen["t"] = args[1]
        seen["ids_keep"] = kwargs["mask_dict"]["ids_keep"]

    def deep_path(module, args):                   # renoise_linear(cat([deep, shallow], -1))
        deep = args[0][..., :config["hidden_size"]]
        seen["path_dropped"] = (deep == model.mask_token).all(-1).all(-1)

    randn_like = torch.randn_like

    def draw_noise(x):                                         # compute_loss's one randn_like
        seen["noise"] = randn_like(x)
        return seen["noise"]

    hooks = [model.register_forward_pre_hook(model_call, with_kwargs=True),
             model.register_forward_hook(lambda m, args, out: seen.update(model_out=out[0])),
             model.y_embedder.embedding_table.register_forward_pre_hook(
                 lambda m, args: seen.update(y_used=args[0])),         # the labels after the drop
             model.renoise_linear.register_forward_pre_hook(deep_path)]
    no_amp = types.SimpleNamespace(autocast=contextlib.nullcontext)   # the accelerator: fp64 as is
    scheduler = flow_matching.FlowMatching(prediction="v", path_type="linear",
                                           weighting="lognormal", encoders=None, accelerator=no_amp)
    mask_config = types.SimpleNamespace(mask_type=config["mask_type"],
                                        mask_ratio=config["mask_ratio"])
    with mock.patch.object(torch, "randn_like", draw_noise):
        loss, _ = scheduler.compute_loss(model, images.double(), dict(y=y), zs=None,
                                         mask_config=mask_config)
    for hook in hooks:
        hook.remove()
    # the per-sample terms of that loss: the v target d_alpha x + d_sigma noise (= noise - x)
    _, _, d_alpha, d_sigma = scheduler.interpolant(seen["t"].view(-1, 1, 1, 1))
    target = d_alpha * images.double() + d_sigma * seen["noise"]
    seen["loss_per_sample"] = flow_matching.mean_flat((seen["model_out"] - target) ** 2)
    assert torch.allclose(seen["loss_per_sample"].mean(), loss, rtol=1e-12, atol=0)
    return dict(seen, loss=loss)


def main():
    p = parser(__doc__, hidden_size=64, batch=16)
    args = p.parse_args()
    if args.patch_size != 2:
        p.error("--patch-size: the official compute_loss draws its drop assuming patch 2")
    official.checkouts(args, PINNED)
    config = dict(model_config(args), seed=args.seed)

    torch.manual_seed(args.seed)
    state_dict = {k: v.contiguous() for k, v in randomize(build(config)).state_dict().items()}
    C, S = args.in_channels, args.context_size
    images = torch.randn(args.batch, C, S, S)
    y = torch.randint(args.num_classes, (args.batch,))
    out = compute(config, state_dict, images, y)
    print(f"labels dropped: {(out['y_used'] != y).sum()}, paths dropped: "
          f"{out['path_dropped'].sum()} of {args.batch}")
    if (out["y_used"] == y).all() or not out["path_dropped"].any():
        sys.exit(f"seed {args.seed} drops no label or no path; choose another --seed")

    arrays = dict(images=images.numpy(), y=y.numpy())
    for k in ("t", "noise", "ids_keep", "y_used", "path_dropped", "model_out", "loss_per_sample",
              "loss"):
        arrays[k] = out[k].numpy()
    arrays.update({f"sd/{k}": v.numpy() for k, v in state_dict.items()}, config=config)
    official.save_npz(args.out / OUTPUTS[0], arrays)


if __name__ == "__main__":
    main()
