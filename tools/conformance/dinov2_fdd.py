"""Write tests/fixtures/dinov2_fdd.npz: FDD as dgm-eval computes it (`--model dinov2`), on a
small DINOv2 with random weights, for tests/test_fid.py and test_fid_cli.py.

Official code: facebookresearch/dinov2's own DinoVisionTransformer with the settings its torch hub
uses for `dinov2_vitl14` (img_size 518, patch 14, LayerScale 1.0, MLP ratio 4, no registers,
position embedding interpolated with offset 0.1 and no antialiasing, MemEffAttention blocks) at a
small width and depth; layer6ai-labs/dgm-eval's DINOv2Encoder (its transform), its ADM-style .npz
DataLoader, get_representations and compute_FD_with_reps. dgm-eval's torch.hub.load of the released
ViT-L/14 is patched to return this small model, its state dict drawn from --seed and loaded
strictly. dgm-eval's modules are imported without its package __init__ files (which import every
encoder's dependencies); its fd.py needs scikit-learn.

Keys: `config_*`; `sd/<name>` (the state dict as the released files store it); `imgs_a`, `imgs_b`
(uint8 images, b brighter than a); `pixels_a` (the first 4 transformed inputs); `feats_a`, `feats_b`
(CLS features); `fd` (dgm-eval's FD between a and b); `odd_img` (one image of another shape) and
`odd_feat`. Weights: LayerNorm weights 1 + 0.3 randn; LayerNorm biases, LayerScale gammas and the
CLS token 0.3 randn; everything else 0.05 randn (one torch.Generator, state-dict order). The
committed fixture's random draws follow no rule found, so the default run draws other numbers.

    python tools/conformance/dinov2_fdd.py --dinov2 ~/src/dinov2 --dgm-eval ~/src/dgm-eval
"""
import importlib
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official  # noqa: E402

OUTPUTS = ("dinov2_fdd.npz",)
PINNED = {"facebookresearch/dinov2": "b8931f7bf91576930313be2c6d6af376033b35f0",
          "layer6ai-labs/dgm-eval": "74c79f7527fbf38fdccfbac51f25d759bc02ab07"}
# dinov2/hub/backbones.py's _make_dinov2_model defaults (what torch.hub's dinov2_vitl14 builds)
HUB = dict(img_size=518, patch_size=14, mlp_ratio=4, init_values=1.0, ffn_layer="mlp",
           block_chunks=0, num_register_tokens=0, interpolate_antialias=False,
           interpolate_offset=0.1)


def draw(seed, state_shapes, n, side, odd):
    """Random weights (rule in the docstring) and uint8 images: a ~ N(128, 40), b ~ N(150, 40)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in state_shapes.items():
        z = torch.randn(shape, generator=g)
        if ".norm" in name or name.startswith("norm."):
            sd[name] = 1 + 0.3 * z if name.endswith("weight") else 0.3 * z
        elif name.endswith("gamma") or name == "cls_token":
            sd[name] = 0.3 * z
        else:
            sd[name] = 0.05 * z
    rng = np.random.default_rng(seed)

    def images(mean, *size):
        return np.clip(rng.normal(mean, 40, (*size, 3)).round(), 0, 255).astype(np.uint8)
    return sd, images(128, n, side, side), images(150, n, side, side), images(128, *odd)


def build(vits, config):
    """DINOv2's ViT as the hub's vit_large builds it (MemEffAttention blocks), at `config`."""
    block = partial(vits.Block, attn_class=vits.MemEffAttention)
    return vits.DinoVisionTransformer(**config, block_fn=block).eval()


def official_fdd(vits, dgm, config, sd, imgs_a, imgs_b, odd_img):
    """dgm-eval's pipeline on DINOv2's ViT at `config` with state dict `sd`."""
    model = build(vits, config)
    model.load_state_dict(sd, strict=True)
    # the patch: dgm-eval's torch.hub.load('facebookresearch/dinov2', ...) returns this model
    hub_load, torch.hub.load = torch.hub.load, lambda repo, name, *a, **k: model
    try:
        encoder = dgm.dinov2.DINOv2Encoder()                  # arch vitl14, clean_resize False
    finally:
        torch.hub.load = hub_load
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, images in (("a", imgs_a), ("b", imgs_b), ("odd", odd_img[None])):
            path = f"{tmp}/{name}.npz"
            np.savez(path, arr_0=images)                      # an ADM-style sample batch
            loader = dgm.dataloaders.get_dataloader(path, batch_size=50, num_workers=0,
                                                    transform=encoder.transform)
            out[name] = dgm.representations.get_representations(encoder, loader, "cpu")
            if name == "a":
                out["pixels_a"] = torch.stack([loader.data_set[i] for i in range(4)])
    fd = dgm.fd.compute_FD_with_reps(out["a"], out["b"])
    return dict(pixels_a=out["pixels_a"].numpy(), feats_a=out["a"].astype(np.float32),
                feats_b=out["b"].astype(np.float32), fd=np.float64(fd),
                odd_feat=out["odd"].astype(np.float32))


def import_dgm_eval(clone):
    """dgm-eval's modules, its packages registered without running their __init__.py."""
    for package in ("dgm_eval", "dgm_eval.models", "dgm_eval.metrics"):
        stub = types.ModuleType(package)
        stub.__path__ = [str(clone / package.replace(".", "/"))]
        sys.modules[package] = stub
    names = dict(dinov2="models.dinov2", dataloaders="dataloaders", fd="metrics.fd",
                 representations="representations")
    modules = {k: importlib.import_module(f"dgm_eval.{v}") for k, v in names.items()}
    return types.SimpleNamespace(**modules)


def main():
    p = official.parser(__doc__, PINNED)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=1)
    p.add_argument("--n", type=int, default=100, help="images per set (default: 100)")
    p.add_argument("--side", type=int, default=96, help="side of the images (default: 96)")
    p.add_argument("--odd", type=int, nargs=2, default=(200, 300), metavar=("H", "W"),
                   help="size of the odd image (default: 200 300)")
    args = p.parse_args()
    _, dgm_clone = official.checkouts(args, PINNED)
    vits = importlib.import_module("dinov2.models.vision_transformer")
    dgm = import_dgm_eval(dgm_clone)
    config = dict(img_size=HUB["img_size"], patch_size=HUB["patch_size"], embed_dim=args.embed_dim,
                  depth=args.depth, num_heads=args.num_heads)
    config.update(HUB)                                       # the fixture's config_* order
    shapes = {k: v.shape for k, v in build(vits, config).state_dict().items()}
    sd, imgs_a, imgs_b, odd_img = draw(args.seed, shapes, args.n, args.side, args.odd)
    out = official_fdd(vits, dgm, config, sd, imgs_a, imgs_b, odd_img)
    arrays = {f"config_{k}": v for k, v in config.items()}
    arrays.update({f"sd/{k}": v.numpy() for k, v in sd.items()})
    arrays.update(imgs_a=imgs_a, imgs_b=imgs_b, pixels_a=out["pixels_a"], feats_a=out["feats_a"],
                  feats_b=out["feats_b"], fd=out["fd"], odd_img=odd_img, odd_feat=out["odd_feat"])
    official.save_npz(args.out / OUTPUTS[0], arrays)


if __name__ == "__main__":
    main()
