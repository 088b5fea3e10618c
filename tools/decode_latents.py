"""
Latents that sample.py saved with --vae none (<out>.latents.npz) -> images, decoded with the SD VAE:

    python tools/decode_latents.py samples.latents.npz samples.npz --vae stabilityai/sd-vae-ft-ema

The output is what sample.py with a VAE would have written: an ADM .npz (arr_0 uint8 N x H x W x 3,
arr_1 labels) for fid.py, or a grid image (.png), in the precision and with the pixel conversion of
the model's official sampling code (sample.SAMPLING; fp32 on a CPU). Both files are streamed batch
by batch: 50,000 images at 512 px never sit in memory at once. Needs the optional diffusers package.
"""
import argparse
import itertools
import os
import sys
import zipfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from sample import SAMPLING, finish, load_vae, save_grid, write_npz              # noqa: E402


def read_rows(path, key, batch):
    """The array `key` of an .npz, batch rows at a time, read from the zip member as a stream."""
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, _, dtype = read_header(f)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch):
            rows = min(batch, shape[0] - start)
            data = f.read(rows * row_bytes)
            if len(data) < rows * row_bytes:
                raise ValueError(f"{path}: {key} holds fewer than the {shape[0]} rows its header "
                                 f"says")
            yield np.frombuffer(data, dtype).reshape(rows, *shape[1:])


def read_labels(path):
    """The labels (arr_1) of a latents file, checked to be one, and the diffusion of the model that
    sampled them (files older than that record: flow)."""
    try:
        with np.load(path) as saved:                 # reads only the members asked for
            if not {"latents", "arr_1"} <= set(saved.files):
                raise ValueError(f"{path}: holds {', '.join(saved.files)}, not the latents and "
                                 f"labels (latents, arr_1) that sample.py saves with --vae none")
            diffusion = str(saved["diffusion"][0]) if "diffusion" in saved.files else "flow"
            return saved["arr_1"], diffusion
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None


@torch.no_grad()
def decode(latents, out, vae, device="cuda", batch=64):
    """Decode latents (the .npz's `latents`, already divided by the latent scale) into `out`."""
    if os.path.exists(out):
        raise ValueError(f"{out} exists: choose another output (nothing is overwritten)")
    labels, diffusion = read_labels(latents)
    precision = SAMPLING[diffusion][0] if torch.device(device).type == "cuda" else "fp32"
    decoder = load_vae(vae, device, precision)
    blocks = (finish(torch.from_numpy(z.copy()).to(device), decoder, 1.0, diffusion)["arr_0"]
              for z in read_rows(latents, "latents", batch))
    first = next(blocks)                             # (B, H, W, 3): the images' shape
    folder, name = os.path.split(out)
    temporary = os.path.join(folder, f".{name}.tmp{os.path.splitext(name)[1]}")
    if out.endswith(".npz"):
        with open(temporary, "wb") as f:
            write_npz(f, {"arr_0": ((len(labels), *first.shape[1:]), np.uint8,
                                    itertools.chain([first], blocks)),
                          "arr_1": (labels.shape, labels.dtype, [labels])})
    else:
        save_grid(np.concatenate([first, *blocks]), temporary)
    os.replace(temporary, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("latents", help="an .latents.npz written by sample.py with --vae none")
    p.add_argument("out", help="an .npz (for fid.py) or a .png grid")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="diffusers AutoencoderKL "
                   "(default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64, help="latents per VAE pass")
    args = p.parse_args(argv)
    try:
        print(f"wrote {decode(args.latents, args.out, args.vae, args.device, args.batch_size)}")
    except ValueError as e:
        raise SystemExit(f"decode_latents.py: error: {e}")


if __name__ == "__main__":
    main()
