"""Write tests/fixtures/fid_inception_io.npz: pytorch-fid's own FID Inception-v3
(mseitzer/pytorch-fid, src/pytorch_fid/inception.py) run on deterministic weights, for
tests/test_fid.py and test_fid_cli.py.

pytorch-fid downloads pt_inception-2015-12-05; here its download is patched to return weights drawn
by a rule (the one tests/test_fid.py's fixture_weights redraws): for the k-th key of sorted(keys), a
torch.Generator seeded k draws running_var 0.5 + rand, running_mean 0.1 randn, tensors of >= 2 dims
randn sqrt(2 / fan_in), other weights 1 + 0.1 randn, other biases 0.1 randn.

Keys: `keys`, `shapes` (JSON) of the weight file; `images` (N x 3 x S x S in [0, 1], resized to 299
bilinearly inside pytorch-fid's InceptionV3), `pool3` (N x 2048), `logits` (fc(pool3), N x 1008);
`images_299`, `pool3_299` (one image already 299 x 299). The draws, one torch.Generator seeded
--seed (default 123: the committed fixture's draws, reproduced exactly): the images, a 299 x 299
image whose top-left S x S corner replaces the last image, then images_299.

    python tools/conformance/fid_inception_io.py --pytorch-fid ~/src/pytorch-fid
"""
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official  # noqa: E402

OUTPUTS = ("fid_inception_io.npz",)
PINNED = {"mseitzer/pytorch-fid": "b9c18118d082cbd263c1b8963fc4221dc1cbb659"}


def rule_weights(shapes):
    """The deterministic stand-in for the weight file: key -> tensor of the listed shape."""
    state = {}
    for k, key in enumerate(sorted(shapes)):
        shape = shapes[key]
        g = torch.Generator().manual_seed(k)
        if key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        elif key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


def draw_inputs(seed, n, side):
    """n images of side x side and one of 299 x 299, uniform in [0, 1] (see the docstring)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, side, side, generator=g)
    corner = torch.rand(1, 3, 299, 299, generator=g)
    images[-1] = corner[0, :, :side, :side]          # as the committed fixture's third image
    images_299 = torch.rand(1, 3, 299, 299, generator=g)
    return images, images_299


def official_outputs(inception, state, images, images_299):
    """pytorch-fid's InceptionV3 (pool3 block, its own resize and 2x - 1) with `state` as its
    downloaded weights; logits from the fc layer of its fid_inception_v3()."""
    # the patch: pytorch-fid's download returns the rule's weights instead of the released file
    inception.load_state_dict_from_url = lambda url, progress=True: dict(state)
    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    fc = inception.fid_inception_v3().fc.eval()
    with torch.inference_mode():
        pool3 = model(images)[0].flatten(1)                  # (N, 2048, 1, 1) -> (N, 2048)
        pool3_299 = model(images_299)[0].flatten(1)
        logits = fc(pool3)
    return dict(pool3=pool3.numpy(), logits=logits.numpy(), pool3_299=pool3_299.numpy())


def main():
    p = official.parser(__doc__, PINNED)
    p.add_argument("--n", type=int, default=3, help="number of small images (default: 3)")
    p.add_argument("--side", type=int, default=64, help="side of the small images (default: 64)")
    p.set_defaults(seed=123)                                 # the committed fixture's draws
    args = p.parse_args()
    (clone,) = official.checkouts(args, PINNED)
    inception = official.module("pytorch_fid_inception", clone / "src/pytorch_fid/inception.py")
    # the weight file's keys and shapes: those of pytorch-fid's own (torchvision) skeleton
    skeleton = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    shapes = {k: list(v.shape) for k, v in sorted(skeleton.state_dict().items())
              if not k.endswith("num_batches_tracked")}
    images, images_299 = draw_inputs(args.seed, args.n, args.side)
    out = official_outputs(inception, rule_weights(shapes), images, images_299)
    official.save_npz(args.out / OUTPUTS[0], dict(
        images=images.numpy(), pool3=out["pool3"], images_299=images_299.numpy(),
        pool3_299=out["pool3_299"], logits=out["logits"], keys=sorted(shapes),
        shapes=json.dumps(shapes)))


if __name__ == "__main__":
    main()
