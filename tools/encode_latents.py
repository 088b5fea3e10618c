"""
An image folder -> SD-VAE latents in the memory-mapped layout that `train.py --data DIR` reads:

    python tools/encode_latents.py /path/to/imagenet/train imagenet256_sdvae --size 256
    python tools/encode_latents.py /path/to/imagenet/train imagenet512_sdvae --size 512 --views image

DIR/x.npy holds float16 VAE posteriors (N, V, 2, 4, size/8, size/8): for each view of each image
the posterior's mean and standard deviation, from which train.py draws a fresh latent each step,
as SPRINT does (its sample_posterior); DIR/y.npy their int64 labels (N,). --views both (V = 2): the
image and its mirror, for train.py --flip step (DiT's recipe); image (V = 1): the image alone, half
the size (SPRINT's code never flips); random (V = 1): the image or its mirror, one at random for good
(seeded), as fast-DiT extracts the features that SparseDiT fine-tunes on.
Images are read as train.py reads an image folder (ADM's centre crop; a file PIL cannot decode is
named). train.py scales the latents by SD-VAE's 0.18215 (--latent-scale). Needs diffusers.

Memory stays flat whatever N: x.npy is preallocated (numpy's open_memmap writes its header and
size) and each batch is written into its rows through an ordinary file handle. A latent that is not
finite stops the encoding, naming its image. Everything is written into DIR.partial/ and renamed
to DIR only once complete: an interrupted encoding never leaves a folder that train.py would take
for a whole one (an error or Ctrl-C removes DIR.partial; after a kill, rerunning starts afresh).
"""
import argparse
import os
import shutil
import sys

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from sample import load_vae                                                      # noqa: E402
from train import image_folder                                                   # noqa: E402


def preallocate(path, shape, dtype):
    """An .npy file of this shape and dtype (its data not yet written) -> where its data begins."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    offset = array.offset
    del array                                                  # unmapped: nothing stays resident
    return offset


@torch.no_grad()
def encode(folder, out, vae="stabilityai/sd-vae-ft-ema", size=256, device="cuda", batch=256,
           workers=16, views="both"):
    """Encode `folder` (ImageNet layout) into out/x.npy and out/y.npy, as the module says."""
    if os.path.exists(out):
        raise ValueError(f"{out} exists: choose another output folder (nothing is overwritten)")
    try:
        images, _ = image_folder(folder, size)
    except ValueError as e:
        raise ValueError(str(e).replace("--data", "FOLDER", 1)) from None      # train.py's words
    encoder = load_vae(vae, device)
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)                 # a killed run's leftovers
    os.makedirs(partial)
    try:
        write_latents(images, encoder, partial, size, device, batch, workers, views)
    except BaseException:                                      # an error or Ctrl-C: no leftovers
        shutil.rmtree(partial)
        raise
    os.replace(partial, out)
    return out


def write_latents(images, encoder, folder, size, device, batch, workers, views):
    """Each image's views (--views) through the VAE, into folder/x.npy and folder/y.npy."""
    shape = (len(images), 2 if views == "both" else 1, 2, 4, size // 8, size // 8)
    mirrored = np.random.default_rng(0).random(len(images)) < 0.5     # --views random's choice
    x_start = preallocate(os.path.join(folder, "x.npy"), shape, np.float16)
    y_start = preallocate(os.path.join(folder, "y.npy"), shape[:1], np.int64)
    row_bytes = int(np.prod(shape[1:])) * 2                    # float16
    order = BatchSampler(SequentialSampler(range(len(images))), batch, drop_last=False)
    batches = DataLoader(images, sampler=order, batch_size=None, num_workers=workers)
    first = 0                                                  # the batch's first image
    with open(os.path.join(folder, "x.npy"), "r+b") as x, \
            open(os.path.join(folder, "y.npy"), "r+b") as y:
        for pixels, labels in tqdm(batches, "encoding", total=len(order)):
            shown = [pixels, pixels.flip(3)] if views == "both" else [pixels]   # the image, mirror
            if views == "random":
                flip = torch.from_numpy(mirrored[first:first + len(pixels)])[:, None, None, None]
                shown = [torch.where(flip, pixels.flip(3), pixels)]
            posteriors = [encoder.encode(view.to(device).float() / 127.5 - 1).latent_dist
                          for view in shown]
            moments = [torch.stack([p.mean, p.std], dim=1) for p in posteriors]  # (B, 2, 4, h, w)
            z = torch.stack(moments, dim=1).half().cpu().numpy()   # (B, V, 2, 4, h, w)
            bad = np.flatnonzero(~np.isfinite(z.reshape(len(z), -1)).all(axis=1))
            if len(bad):
                raise ValueError(f"{images.x[first + bad[0]]}: its latent holds NaN or infinite "
                                 f"values; nothing was written")
            x.seek(x_start + first * row_bytes)
            x.write(z.tobytes())
            y.seek(y_start + first * 8)
            y.write(labels.numpy().astype(np.int64).tobytes())
            first += len(labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("folder", help="images in ImageNet layout: a sub-folder per class")
    p.add_argument("out", help="the folder to create, with x.npy and y.npy")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="diffusers AutoencoderKL "
                   "(default %(default)s)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default "
                   "%(default)s): latents of size/8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256, help="images per VAE pass")
    p.add_argument("--num-workers", type=int, default=16, help="DataLoader workers decoding images")
    p.add_argument("--views", choices=["both", "image", "random"], default="both", help="each "
                   "image and its mirror; the image; one of them at random (default %(default)s)")
    args = p.parse_args(argv)
    try:
        out = encode(args.folder, args.out, args.vae, args.size, args.device, args.batch_size,
                     args.num_workers, args.views)
    except ValueError as e:
        raise SystemExit(f"encode_latents.py: error: {e}")
    print(f"wrote {out}/x.npy and {out}/y.npy")


if __name__ == "__main__":
    main()
