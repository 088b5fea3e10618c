"""
Training data for train.py: an image folder in ImageNet layout, an .npz of images or latents, or
ten classes of coloured shapes drawn in code; a fixed held-out split, and the order in which the
ranks of a DDP run see it.

    data = setup_data(args)                     # -> Data: the dataset, its split, channels, side
    loader = data.loader(args, rank, world, position, pin_memory)
    # pixels in [-1, 1], latents times --latent-scale
    x, y = data.to_device(*next(loader), device)

Pixels stay uint8 until a batch reaches the device (Data.to_device scales them to [-1, 1]); latents
stay float. `encode_latents` turns an image folder into SD-VAE latents once (the papers' setting).
fid.py reads its image folders with the same `read_image` and IMAGE_EXTS, and sample.py
--labels-from reads a dataset's labels with `read_labels`.
"""
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset
from tqdm import tqdm

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


#################################################################################
#                          The embedded toy data                                #
#################################################################################

def embedded_dataset(size=16, n=4000, seed=0):
    """Ten classes of coloured shapes drawn in numpy (no download): uint8 (n, size, size, 3), labels
    (n,). A class is a shape and a hue; position, radius, hue and background vary, so a model must
    learn what a class looks like."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    r = rng.uniform(0.2, 0.32, (n, 1, 1))
    cy, cx = rng.uniform(0.35, 0.65, (2, n, 1, 1))
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size                # pixel centres in (0, 1)
    dy = yy - cy
    dx = xx - cx
    d = np.hypot(dy, dx)
    box = np.maximum(abs(dx), abs(dy))
    thin = 0.3 * r
    shapes = [
        d < r,                                                      # disc
        box < r,                                                    # square
        abs(dx) + abs(dy) < r,                                      # diamond
        abs(d - r) < thin,                                          # ring
        (np.minimum(abs(dx), abs(dy)) < thin) & (box < r),          # plus
        (abs(abs(dx) - abs(dy)) < thin) & (box < r),                # cross
        (dy < 0.8 * r) & (abs(dx) < 0.6 * (dy + r)),                # triangle
        np.sin(yy * 40 + cy * 9) > 0,                               # horizontal stripes
        np.sin(xx * 40 + cx * 9) > 0,                               # vertical stripes
        (np.sin(xx * 30 + cx * 9) > 0) ^ (np.sin(yy * 30 + cy * 9) > 0),   # checkerboard
    ]
    mask = np.stack(shapes)[y, np.arange(n)][..., None]           # (n, size, size, 1)
    hue = y[:, None] / 10 + rng.uniform(-0.03, 0.03, (n, 1)) + np.array([0, 1 / 3, 2 / 3])
    # a point on the colour wheel, (n, 3)
    fg = 0.5 + 0.5 * np.cos(2 * np.pi * hue)
    bg = rng.uniform(0.0, 0.35, (n, 1)) * np.ones(3)
    pixels = np.where(mask, fg[:, None, None], bg[:, None, None])
    return (255 * pixels).round().astype(np.uint8), y


#################################################################################
#                         Image files and folders                               #
#################################################################################

def center_crop_arr(img, size):
    """ADM's preprocessing (DiT's too): halve with a box filter while large, resize bicubic, crop
    the centre."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    arr = np.asarray(img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC))
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def read_image(path, source, verify=False):
    """An image file as an RGB PIL image (verify=True: only checked, without decoding). A file PIL
    cannot read is one ValueError naming where it came from (`source`: the flag or argument) and the
    file."""
    try:
        with Image.open(path) as img:
            return img.verify() if verify else img.convert("RGB")
    # PIL's ways of saying "not an image"
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{source}: cannot decode {path} ({e})") from None


def list_classes(root):
    """An ImageNet-layout folder, root/<class>/<image> -> ([(path, class index)], number of
    classes); the classes are the sub-folders in sorted order."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    files = []
    for k, c in enumerate(classes):
        names = sorted(os.listdir(os.path.join(root, c)))
        files += [(os.path.join(root, c, f), k) for f in names if f.lower().endswith(IMAGE_EXTS)]
    return files, len(classes)


class ImageFolder:
    """ImageNet layout, root/<class>/<image>; data[indices] decodes one batch (in a DataLoader
    worker)."""
    def __init__(self, root, size, upscale=True):
        self.files, self.num_classes = list_classes(root)
        if not self.files:
            looked_for = "/".join(IMAGE_EXTS)
            raise ValueError(f"--data {root}: no images found (looked for {looked_for} in one "
                             f"sub-folder per class)")
        self.size = size
        self.upscale = upscale
        quiet = len(self.files) < 10_000
        for path, _ in tqdm(self.files, f"checking {root}", disable=quiet, leave=False):
            # a broken file fails here, named, not later in a worker
            self.load(path, verify=True)

    def __len__(self):
        return len(self.files)

    def load(self, path, verify=False):
        """The image's pixels, cropped; verify=True: only a check of what PIL reads without
        decoding (cheap)."""
        img = read_image(path, "--data", verify)
        if verify:
            return None
        if not self.upscale and min(img.size) < self.size:
            raise ValueError(f"--data: {path} is {img.width}x{img.height}, smaller than "
                             f"--image-size {self.size} (without --no-upscale it would be "
                             f"upscaled)")
        return center_crop_arr(img, self.size)

    def __getitem__(self, idx):
        x = np.stack([self.load(self.files[i][0]) for i in idx])   # (B, H, W, 3)
        y = torch.tensor([self.files[i][1] for i in idx])
        return torch.from_numpy(x).permute(0, 3, 1, 2), y


#################################################################################
#                  Loading --data, checked where it enters                      #
#################################################################################

def read_npz(path):
    """An .npz's x and y, checked: N > 0 images (uint8 pixels) or latents (finite floats), N labels
    (integers >= 0)."""
    try:
        with np.load(path) as f:
            if not {"x", "y"} <= set(f.files):
                raise ValueError(f"--data {path}: needs arrays 'x' and 'y' (found: "
                                 f"{', '.join(f.files)})")
            x = f["x"]
            y = f["y"]
    except (OSError, EOFError) as e:
        message = f"--data {path}: neither an image folder nor a readable .npz ({e})"
        raise ValueError(message) from None
    shapes_fit = len(x) == len(y) > 0 and x.ndim in (3, 4)
    if not shapes_fit or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(f"--data {path}: x must hold N > 0 images, y their N labels (integers "
                         f">= 0); got x {x.shape} {x.dtype}, y {y.shape} {y.dtype}")
    if x.dtype != np.uint8:
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise ValueError(f"--data {path}: {bad.sum()} of its {len(x)} latents hold NaN or "
                             f"infinite values (the first: x[{np.argmax(bad)}]); remove them")
    return x, y


def load_data(args):
    """(dataset, number of classes) for --data, an image folder or an .npz (checked), or the
    embedded toy data."""
    if args.data is None:
        x, y = embedded_dataset(args.image_size)
    elif not os.path.exists(args.data):
        raise ValueError(f"--data {args.data}: no such file or folder")
    elif os.path.isdir(args.data):
        folder = ImageFolder(args.data, args.image_size or 64, upscale=not args.no_upscale)
        return folder, folder.num_classes
    elif not zipfile.is_zipfile(args.data):                       # an .npz is a zip of .npy files
        raise ValueError(f"--data {args.data}: neither an image folder nor an .npz file (with "
                         f"arrays x and y)")
    else:
        x, y = read_npz(args.data)
        side = x.shape[1] if x.dtype == np.uint8 else x.shape[2]
        resize = args.image_size and args.image_size != side
        if resize and x.dtype != np.uint8:
            raise ValueError(f"--image-size {args.image_size}: {args.data} holds {side}x{side} "
                             f"latents, which cannot be resized; leave --image-size out")
        if resize:                                                # pixels: ADM's antialiased resize
            x = np.stack([center_crop_arr(Image.fromarray(img), args.image_size) for img in x])
    # uint8 pixels (N, H, W[, C]) or latents (N, C, H, W) -> (N, C, H, W); data[indices] is a batch
    x = torch.from_numpy(x[..., None] if x.ndim == 3 else x)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2)
    return TensorDataset(x, torch.from_numpy(y).long()), int(y.max()) + 1


def read_labels(path, source):
    """The labels (N,) of a dataset: an .npz's y, or the class of each image in an image folder."""
    if os.path.isdir(path):
        labels = [k for _, k in list_classes(path)[0]]
    elif zipfile.is_zipfile(path):
        with np.load(path) as f:
            labels = f["y"] if "y" in f.files else []
    else:
        raise ValueError(f"{source} {path}: neither an image folder nor an .npz file (with labels "
                         f"y)")
    labels = np.asarray(labels)
    if not len(labels) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"{source} {path}: holds no labels (an .npz needs y, integers >= 0; a "
                         f"folder one sub-folder of images per class)")
    return labels


@torch.no_grad()
def encode_latents(folder, out, vae="stabilityai/sd-vae-ft-ema", size=256, device="cuda",
                   batch=256, workers=16):
    """An ImageNet-layout folder -> an .npz of SD-VAE latents x (2N, 4, size/8, size/8) float16 and
    labels y, each image with its mirror image (SiT's flip augmentation), for train.py --data with
    --latent-scale 0.18215. Needs the optional diffusers package, imported only here."""
    from diffusers import AutoencoderKL

    images = ImageFolder(folder, size)
    order = BatchSampler(SequentialSampler(range(len(images))), batch, drop_last=False)
    encoder = AutoencoderKL.from_pretrained(vae).to(device).eval()
    xs = []
    ys = []
    for x, y in DataLoader(images, sampler=order, batch_size=None, num_workers=workers):
        for view in (x, x.flip(3)):
            pixels = view.to(device).float() / 127.5 - 1                  # (B, 3, H, W) in [-1, 1]
            xs.append(encoder.encode(pixels).latent_dist.sample().half().cpu())
            ys.append(y)
    np.savez(out, x=torch.cat(xs).numpy(), y=torch.cat(ys).numpy())


#################################################################################
#           The held-out split, and each rank's share of every batch            #
#################################################################################

def split(n):
    """A fixed held-out subset (min(256, n/10) items, the same for every run and seed) and the
    training rest."""
    perm = np.random.default_rng(0).permutation(n)
    k = min(256, n // 10)
    return perm[k:], np.sort(perm[:k])


def epoch_batches(indices, global_batch, rank, world, seed, epoch=0, batch=0):
    """This rank's slice of each global batch, endlessly, from (epoch, batch) on. An epoch is a
    permutation seeded by (seed, epoch), the same on every rank, so the ranks together see every
    item once per epoch."""
    G = global_batch
    L = global_batch // world
    while True:
        perm = indices[np.random.default_rng((seed, epoch)).permutation(len(indices))]
        for b in range(batch, len(indices) // G):
            yield perm[b * G + rank * L: b * G + (rank + 1) * L]
        epoch += 1
        batch = 0


@dataclass
class Data:
    """The dataset, its fixed split, and what its items are: how a batch reaches the device."""
    dataset: object
    num_classes: int
    train_idx: np.ndarray
    eval_idx: np.ndarray
    # uint8 images, scaled to [-1, 1]; else float latents, times --latent-scale
    pixels: bool
    channels: int
    side: int
    latent_scale: float

    def to_device(self, x, y, device):
        """A batch on the device: uint8 pixels -> [-1, 1], latents times --latent-scale (if
        given)."""
        x = x.to(device, non_blocking=True).float()
        y = y.to(device, non_blocking=True)
        return (x / 127.5 - 1 if self.pixels else x * self.latent_scale), y

    def loader(self, args, rank, world, position, pin_memory):
        """This rank's slice of every global batch from the saved position on; it never draws from
        the global RNG."""
        workers = args.num_workers
        if workers is None:
            workers = 8 if isinstance(self.dataset, ImageFolder) else 0
        order = epoch_batches(self.train_idx, args.global_batch_size, rank, world, args.seed,
                              **position)
        return iter(DataLoader(self.dataset, sampler=order, batch_size=None, num_workers=workers,
                               pin_memory=pin_memory, generator=torch.Generator()))


def setup_data(args):
    """--data (or the embedded data) loaded, split, and one item decoded early to learn its shape
    -> Data."""
    data, num_classes = load_data(args)
    train_idx, eval_idx = split(len(data))
    if len(train_idx) < args.global_batch_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size}: the data holds only "
                         f"{len(train_idx)} training items")
    first = data[[0]][0]                                          # (1, C, H, W)
    pixels = first.dtype == torch.uint8
    return Data(data, num_classes, train_idx, eval_idx, pixels, first.shape[1], first.shape[-1],
                args.latent_scale or 1.0)
