"""
Train DiT, SPRINT or SparseDiT with flow matching: one plain DDP loop for both stages of SPRINT.

    # one process, CPU or GPU; without --data: the embedded toy data and the toy model
    python train.py --model sprint --drop 0.75
    # one node, a process per GPU
    torchrun --nproc_per_node=8 train.py --model sprint --drop 0.75 --data /path/to/imagenet/train
    # several nodes; latents from tools/encode_latents.py, memory-mapped
    torchrun --nnodes=4 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$HEAD \\
        --master_port=29500 train.py --model sprint --data latents/ --latent-scale 0.18215

Stage 1 is masked pre-training at --drop; stage 2 (--finetune-steps) trains on all tokens from the
stage-1 EMA weights with a fresh optimizer and its own lr, warm-up and EMA (SPRINT Sec. 3.3), as the
official code does: lr from 1% up over the warm-up's optimizer steps (LinearLR), EMA decay 0.999
meanwhile. `--init ckpt.pt --drop 0` runs stage 2 on its own. Path drop stays on in both stages.
`--resume RUN` continues a run exactly after a crash or a kill.

The file reads in the order of a run: flags -> data -> processes -> model -> the training step ->
the two stages -> held-out loss and grids -> checkpoints -> the loop. Data: an image folder in
ImageNet layout, a folder of arrays (x.npy, y.npy: memory-mapped, e.g. SD-VAE latents with
--latent-scale 0.18215, the papers' setting), an .npz of images or latents, or nothing: ten classes
of coloured shapes drawn in code. Step speed: tools/benchmark.py.
"""
import argparse
import copy
import glob
import hashlib
import json
import os
import time
import zipfile
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from sample import (MODELS, checkpoint_weights, create_model, load_weights, read_checkpoint, sample,
                    save_grid)
from sparsedit import SparseDiT
from sprint import SIZES, ModelConfig, sample_ids_keep


#################################################################################
#               Flags: visible defaults, the toy data's, a run's own            #
#################################################################################

# Without --data: the toy model and a short schedule, so that a plain `python train.py` shows every
# part of the loop on a laptop CPU in a few minutes. Each applies only to a flag left out.
TOY = dict(size="toy", image_size=16, global_batch_size=32, lr=1e-3, ema_decay=0.995, steps=2000,
           ft_lr=1e-3, ft_warmup=100, ft_ema_decay=0.995, log_every=25, ckpt_every=500,
           sample_every=250, eval_every=250)
# SPRINT's token drop and path drop, for a model with a sparse path; the others train without
SPARSE = dict(drop=0.75, path_drop=0.1)
# what a resumed run may change: its length (--steps while in stage 1), its lr, logging and speed
RESUME_MAY_CHANGE = {"steps", "finetune_steps", "lr", "ft_lr", "log_every", "ckpt_every",
                     "eval_every", "sample_every", "num_workers", "compile", "results_dir"}


def parse_args(argv=None):
    """The command line -> (flags, the set of flags given on it: --resume and the toy data's
    defaults fill only the others)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())

    def toy(key):
        return f" (default %(default)s; embedded data: {TOY[key]})"

    # the model
    p.add_argument("--model", choices=list(MODELS), default="sprint", help="default %(default)s")
    p.add_argument("--size", choices=list(SIZES), default="B", help="width, heads and depths"
                   + toy("size"))
    p.add_argument("--patch-size", type=int, default=2, help="pixels (or latent cells) per token "
                   "side (default %(default)s)")
    p.add_argument("--hidden-size", type=int, help="overrides the size's width")
    p.add_argument("--num-heads", type=int, help="overrides the size's attention heads")
    p.add_argument("--depths", type=int, nargs=3, metavar=("E", "M", "D"), help="overrides the "
                   "size's encoder, middle, decoder blocks (dit: their sum)")
    p.add_argument("--layout", type=lambda s: [int(v) for v in s.split(",")], metavar="P,S,K,T",
                   help="sparsedit: Poolingformers, SDTMs, sparse blocks per SDTM, top blocks")
    p.add_argument("--density", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="sparsedit: sparse grid sides at t = 1 and t = 0")
    # the data
    p.add_argument("--data", help="an image folder (a sub-folder per class), a folder with x.npy "
                   "and y.npy (memory-mapped) or an .npz with x and y; default: the embedded data")
    p.add_argument("--image-size", type=int, help="pixels; default: the arrays' own size, 64 for "
                   f"image folders, {TOY['image_size']} for the embedded data")
    p.add_argument("--latent-scale", type=float, help="multiplies float latents (raw SD-VAE: "
                   "0.18215); default: already scaled (sample.py then assumes SD-VAE's 0.18215)")
    p.add_argument("--no-upscale", action="store_true", help="an image smaller than --image-size "
                   "is an error")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default: 8 for image "
                   "folders, 0 for arrays)")
    # SPRINT
    p.add_argument("--drop", type=float, help="stage-1 token drop in [0, 1) (default: "
                   f"{SPARSE['drop']} for sprint, 0 for the models without a sparse path)")
    p.add_argument("--mask-type", choices=["structured", "random"], default="structured",
                   help="kept tokens: k per n x n group (default) or anywhere")
    p.add_argument("--path-drop", type=float, help="share of samples, in [0, 1], that skip the "
                   f"sparse path (default: {SPARSE['path_drop']} for sprint, else 0)")
    # the schedule of both stages
    p.add_argument("--global-batch-size", type=int, default=256, help="images per step, all "
                   "processes" + toy("global_batch_size"))
    p.add_argument("--lr", type=float, default=1e-4, help="stage-1 lr" + toy("lr"))
    p.add_argument("--warmup", type=int, default=0, help="stage-1 lr warm-up from 1%%, EMA 0.999 "
                   "during it (default %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="stage-1 EMA decay"
                   + toy("ema_decay"))
    p.add_argument("--steps", type=int, default=400_000, help="stage-1 steps" + toy("steps"))
    p.add_argument("--finetune-steps", type=int, default=0, help="stage-2 steps at 0%% drop after "
                   "stage 1 (default %(default)s)")
    p.add_argument("--ft-lr", type=float, default=2e-4, help="stage-2 lr" + toy("ft_lr"))
    p.add_argument("--ft-warmup", type=int, default=5000, help="stage-2 lr warm-up from 1%%, EMA "
                   "0.999 during it" + toy("ft_warmup"))
    p.add_argument("--ft-ema-decay", type=float, default=0.9999, help="stage-2 EMA decay after its "
                   "warm-up" + toy("ft_ema_decay"))
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", help="start from this checkpoint's EMA weights with a fresh "
                       "optimizer (e.g. stage 2; a SparseDiT from a DiT)")
    may_change = ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_MAY_CHANGE))
    start.add_argument("--resume", help="continue a run exactly (a run folder: its newest "
                       "checkpoint); flags left out are the run's, given ones must agree except "
                       + may_change)
    # speed, seeds, logs
    p.add_argument("--compile", action="store_true", help="torch.compile the model (one graph "
                   "per stage)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 autocast on CUDA, "
                   "fp32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, data order, noise and "
                   "sample grids (default %(default)s)")
    p.add_argument("--results-dir", default="results", help="where numbered run folders are "
                   "created (default %(default)s)")
    p.add_argument("--log-every", type=int, default=50, help="loss, img/s, TFLOP/s and MFU every N "
                   "steps" + toy("log_every"))
    p.add_argument("--ckpt-every", type=int, default=50_000, help="every N steps, 0: only at the "
                   "end of stages" + toy("ckpt_every"))
    p.add_argument("--sample-every", type=int, default=10_000, help="EMA sample grid every N "
                   "steps, 0: never" + toy("sample_every"))
    p.add_argument("--eval-every", type=int, default=5_000, help="held-out loss every N steps, 0: "
                   "never" + toy("eval_every"))
    args = p.parse_args(argv)
    # parsed again into a namespace that already holds every flag: only the given ones change
    left_out = object()
    given = vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), left_out))))
    return args, {key for key, value in given.items() if value is not left_out}


def resolve_flags(args, given, world):
    """The flags left out take, in this order: the resumed run's flags (--resume), the toy data's
    (TOY, without --data), the model's token drop (SPARSE with a sparse path, else none); then they
    are checked -> --resume's (path, checkpoint), or None."""
    resumed = read_run(args, given) if args.resume else None
    if args.data is None and not resumed:
        for key, value in TOY.items():
            if key not in given:
                setattr(args, key, value)
    sparse = MODELS[args.model].has_sparse_path
    for key, value in SPARSE.items():
        if getattr(args, key) is None:
            setattr(args, key, value if sparse else 0.0)
    check_args(args, world)
    return resumed


def read_run(args, given):
    """--resume's checkpoint (a run folder: its newest) -> (path, checkpoint). The run's flags fill
    those left out; a flag given with another value is refused, unless RESUME_MAY_CHANGE holds
    it."""
    if os.path.isdir(args.resume):
        found = sorted(glob.glob(os.path.join(args.resume, "checkpoints", "*.pt")))
    else:
        found = [args.resume]
    if not found or not os.path.isfile(found[-1]):
        raise ValueError(f"--resume {args.resume}: no such checkpoint, nor a run folder with "
                         f"checkpoints")
    try:
        ckpt = read_checkpoint(found[-1])
    except ValueError as e:
        raise ValueError(f"--resume {e}") from None
    run = {k: v for k, v in ckpt.get("args", {}).items()
           if k in vars(args) and k not in ("resume", "init")}
    differ = []
    for key, value in run.items():
        if key not in given:
            setattr(args, key, value)
        elif getattr(args, key) != value and key not in RESUME_MAY_CHANGE:
            show = " ".join(map(str, value)) if isinstance(value, list) else value
            mine = getattr(args, key)
            mine = " ".join(map(str, mine)) if isinstance(mine, list) else mine
            differ.append(f"--{key.replace('_', '-')} {mine} differs from the run's {show}")
    if differ:
        raise ValueError(f"--resume {found[-1]} does not fit the flags given: {'; '.join(differ)}; "
                         f"leave them out to use the run's")
    step = ckpt.get("step", 0)
    if args.steps != run.get("steps", args.steps) and step > min(args.steps, run["steps"]):
        raise ValueError(f"--steps {args.steps}: stage 1 ({run['steps']} steps) can change its "
                         f"length only while the run is in it, and not below its checkpoint's "
                         f"step {step}")
    return found[-1], ckpt


def check_args(args, world):
    """Flags out of range -> a ValueError naming the flag, before anything is read or written."""
    for low, names in ((1, ("global_batch_size", "log_every")),
                       (0, ("steps", "finetune_steps", "warmup", "ft_warmup", "ckpt_every",
                            "eval_every", "sample_every", "num_workers"))):
        for name in names:
            value = getattr(args, name)
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least {low}")
    if args.steps + args.finetune_steps == 0:
        raise ValueError(f"--steps {args.steps} --finetune-steps {args.finetune_steps}: nothing "
                         f"to train; give --steps N (stage 1) or --finetune-steps N")
    if not MODELS[args.model].has_sparse_path and (args.drop or args.path_drop):
        raise ValueError(f"--model {args.model} has no sparse path: use --drop 0 --path-drop 0")
    if not 0 <= args.drop < 1:
        raise ValueError(f"--drop {args.drop}: must lie in [0, 1)")
    if not 0 <= args.path_drop <= 1:
        raise ValueError(f"--path-drop {args.path_drop}: must lie in [0, 1]")
    if args.global_batch_size % world:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                         f"{world} processes")
    if os.path.exists(args.results_dir) and not os.path.isdir(args.results_dir):
        raise ValueError(f"--results-dir {args.results_dir}: a file, not a folder; give a folder "
                         f"for the run folders")


#################################################################################
#                Data: the toy set, image folders, arrays on disk               #
#################################################################################

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


class ImageFolder:
    """ImageNet layout, root/<class>/<image>, the classes in sorted order; data[indices] decodes one
    batch (in a DataLoader worker), centre-cropped to `size`. name: the argument it came from, named
    in errors."""
    def __init__(self, root, size, upscale=True, name="--data"):
        self.name = name
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.files = []
        for k, c in enumerate(classes):
            names = sorted(os.listdir(os.path.join(root, c)))
            self.files += [(os.path.join(root, c, f), k) for f in names
                           if f.lower().endswith(IMAGE_EXTS)]
        if not self.files:
            looked_for = "/".join(IMAGE_EXTS)
            raise ValueError(f"{name} {root}: no images found (looked for {looked_for} in one "
                             f"sub-folder per class)")
        self.num_classes = len(classes)
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
        decoding (cheap). A file PIL cannot read is one ValueError naming it."""
        try:
            with Image.open(path) as img:
                if verify:
                    return img.verify()
                img = img.convert("RGB")
        # PIL's ways of saying "not an image"
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{self.name}: cannot decode {path} ({e})") from None
        if not self.upscale and min(img.size) < self.size:
            raise ValueError(f"{self.name}: {path} is {img.width}x{img.height}, smaller than "
                             f"--image-size {self.size} (without --no-upscale it would be "
                             f"upscaled)")
        return center_crop_arr(img, self.size)

    def __getitem__(self, idx):
        x = np.stack([self.load(self.files[i][0]) for i in idx])   # (B, H, W, 3)
        y = torch.tensor([self.files[i][1] for i in idx])
        return torch.from_numpy(x).permute(0, 3, 1, 2), y


def nonfinite_rows(x):
    """Indices of the rows of x (N, ...) that hold a NaN or an infinity."""
    return np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))


class Arrays:
    """x: uint8 images (N, H, W, 3) (or grey (N, H, W)) or float latents (N, C, H, W), y (N,)
    labels; in memory (an .npz or the embedded data, checked whole when read) or memory-mapped (a
    folder's x.npy and y.npy). data[indices] reads only those rows, so a rank's memory does not
    grow with N and all ranks share one copy in the page cache; a memory-mapped batch with a
    non-finite latent stops the run, naming its index, and memory-mapped pixels are cropped to
    `size` (ADM's antialiased crop) where given."""
    def __init__(self, x, y, source, size=None):
        self.x = x
        self.y = y
        self.source = source
        self.size = size

    def __len__(self):
        return len(self.x)

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        x = np.asarray(self.x[idx])                                  # reads these rows only
        if isinstance(self.x, np.memmap) and x.dtype != np.uint8:
            bad = nonfinite_rows(x)
            if len(bad):
                raise ValueError(f"--data {self.source}: x[{idx[bad[0]]}] holds NaN or infinite "
                                 f"values; remove it")
        if self.size:
            x = np.stack([center_crop_arr(Image.fromarray(img), self.size) for img in x])
        x = torch.from_numpy(x[..., None] if x.ndim == 3 else x)
        if x.dtype == torch.uint8:                                   # (B, H, W, C) -> (B, C, H, W)
            x = x.permute(0, 3, 1, 2)
        return x, torch.from_numpy(np.asarray(self.y[idx], dtype=np.int64))

    def __getstate__(self):
        """For a DataLoader worker started by spawn (macOS, Windows): a memory-mapped array travels
        as its file's name, not as a copy of its data."""
        state = dict(vars(self))
        for key in ("x", "y"):
            if isinstance(state[key], np.memmap):
                state[key] = state[key].filename
        return state

    def __setstate__(self, state):
        for key in ("x", "y"):
            if isinstance(state[key], str):
                state[key] = np.load(state[key], mmap_mode="r")
        vars(self).update(state)


def read_arrays(path):
    """x, y and the number of classes of an .npz (read into memory, every latent checked once) or of
    a folder's x.npy and y.npy (memory-mapped: nothing of x is read until a batch asks for it)."""
    folder = os.path.isdir(path)
    try:
        if folder:
            x = np.load(os.path.join(path, "x.npy"), mmap_mode="r")
            y = np.load(os.path.join(path, "y.npy"), mmap_mode="r")
        else:
            with np.load(path) as f:
                if not {"x", "y"} <= set(f.files):
                    raise ValueError(f"--data {path}: needs arrays 'x' and 'y' (found: "
                                     f"{', '.join(f.files)})")
                x = f["x"]
                y = f["y"]
    except (OSError, EOFError) as e:
        kind = "a folder with a readable x.npy and y.npy" if folder else "a readable .npz"
        raise ValueError(f"--data {path}: not {kind} ({e})") from None
    if x.dtype == np.uint8:                                          # (N, H, W) or (N, H, W, 3)
        x_fits = x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)
    else:                                                            # (N, C, H, H)
        x_fits = np.issubdtype(x.dtype, np.floating) and x.ndim == 4 and x.shape[2] == x.shape[3]
    y_fits = len(y) == len(x) > 0 and y.ndim == 1 and np.issubdtype(y.dtype, np.integer)
    low, high = (y.min(), y.max()) if y_fits else (-1, -1)
    if not (x_fits and y_fits) or low < 0:
        raise ValueError(f"--data {path}: x must hold N > 0 uint8 images (N, H, W[, 3]) or float "
                         f"latents (N, C, H, H), y their N labels (integers >= 0); got x {x.shape} "
                         f"{x.dtype}, y {y.shape} {y.dtype}")
    bad = [] if folder or x.dtype == np.uint8 else nonfinite_rows(x)
    if len(bad):
        raise ValueError(f"--data {path}: {len(bad)} of its {len(x)} latents hold NaN or "
                         f"infinite values (the first: x[{bad[0]}]); remove them")
    return x, y, int(high) + 1


def load_data(args):
    """(dataset, number of classes) for --data: an image folder, a folder of arrays, an .npz, or
    the embedded toy data; checked where it enters."""
    if args.data is None:
        x, y = embedded_dataset(args.image_size)
        return Arrays(x, y, "embedded"), 10
    if not os.path.exists(args.data):
        raise ValueError(f"--data {args.data}: no such file or folder")
    arrays = os.path.isfile(os.path.join(args.data, "x.npy")) or zipfile.is_zipfile(args.data)
    if os.path.isdir(args.data) and not arrays:
        folder = ImageFolder(args.data, args.image_size or 64, upscale=not args.no_upscale)
        return folder, folder.num_classes
    if not arrays:                                                 # an .npz is a zip of .npy files
        raise ValueError(f"--data {args.data}: neither an image folder, a folder with x.npy and "
                         f"y.npy, nor an .npz file (with arrays x and y)")
    x, y, num_classes = read_arrays(args.data)
    if x.dtype != np.uint8:
        if args.image_size and args.image_size != x.shape[2]:
            raise ValueError(f"--image-size {args.image_size}: {args.data} holds {x.shape[2]}x"
                             f"{x.shape[3]} latents, which cannot be resized; leave --image-size "
                             f"out")
        return Arrays(x, y, args.data), num_classes
    # pixels, square and --image-size (default: their own shorter side): cropped as ADM does, in
    # memory once, or memory-mapped batch by batch
    size = args.image_size or min(x.shape[1:3])
    crop = (size, size) != x.shape[1:3]
    if crop and not isinstance(x, np.memmap):
        x = np.stack([center_crop_arr(Image.fromarray(img), size) for img in x])
        crop = False
    return Arrays(x, y, args.data, size if crop else None), num_classes


def split(n):
    """A fixed held-out subset of indices (min(256, n/10), the same for every run and seed) and the
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
        if workers is None:                   # decoding or cropping images: in worker processes
            workers = 8 if isinstance(self.dataset, ImageFolder) or self.dataset.size else 0
        order = epoch_batches(self.train_idx, args.global_batch_size, rank, world, args.seed,
                              **position)
        return iter(DataLoader(self.dataset, sampler=order, batch_size=None, num_workers=workers,
                               pin_memory=pin_memory, generator=torch.Generator()))


def setup_data(args):
    """--data (or the embedded data) opened, split, and one item read to learn its shape -> Data."""
    data, num_classes = load_data(args)
    train_idx, eval_idx = split(len(data))
    if len(train_idx) < args.global_batch_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size}: the data holds only "
                         f"{len(train_idx)} training items")
    first = data[[0]][0]                                          # (1, C, H, W)
    pixels = first.dtype == torch.uint8
    return Data(data, num_classes, train_idx, eval_idx, pixels, first.shape[1], first.shape[-1],
                args.latent_scale or 1.0)


#################################################################################
#                  Processes: one per GPU under torchrun, precision             #
#################################################################################

def setup_distributed():
    """(rank, world_size, device) from torchrun's environment; a plain `python` run is rank 0 of
    1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def autocast(device, precision):
    """bf16 autocast, or plain float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def matmul_peak(device, n=8192, reps=10):
    """This GPU's bf16 matmul FLOP/s, measured (the median of `reps` n³ products after 3 warm-up
    ones): what MFU is reported against, rather than a datasheet figure."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(3 + reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / float(np.median(times[3:]))


#################################################################################
#                      The model, its EMA and the optimizer                     #
#################################################################################

def build_model(args, device, in_channels, num_classes, input_size):
    """(model, its EMA, AdamW) for these flags and data, from --init's weights if given."""
    # SparseDiT's layout and density, where given
    extra = {k: getattr(args, k) for k in ("layout", "density") if getattr(args, k) is not None}
    cfg = ModelConfig(args.model, args.size, args.patch_size, input_size, in_channels,
                      num_classes, args.hidden_size or 0, args.num_heads or 0,
                      tuple(args.depths or ()), extra=extra)
    raw = create_model(cfg).to(device)
    if args.init:
        init_from(raw, args.init)
    ema = copy.deepcopy(raw).requires_grad_(False)
    return raw, ema, make_optimizer(raw, args.lr, device)


def init_from(model, path):
    """--init: this model's own weights (EMA where present) from our checkpoint or an official
    SPRINT file, or a SparseDiT's from a dense DiT checkpoint (SparseDiT.from_dit) -> the model.
    Every error names --init and the file."""
    if not os.path.isfile(path):
        raise ValueError(f"--init {path}: no such file")
    try:
        ckpt = read_checkpoint(path)
        stored = ckpt.get("config", {})
        if isinstance(model, SparseDiT) and stored.get("model") == "dit":
            try:
                weights = model.from_dit(ModelConfig(**stored), checkpoint_weights(ckpt))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            ckpt = {"model": weights}
        return load_weights(model, path, ckpt=ckpt)
    except ValueError as e:
        raise ValueError(f"--init {e}") from None


def make_optimizer(model, lr, device):
    """AdamW with weight decay 0 (SiT); the fused kernel on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0,
                             fused=device.type == "cuda")


#################################################################################
#                    Flow matching and the training step                        #
#################################################################################

LABEL_DROP = 0.1               # labels -> the null label, for classifier-free guidance


@dataclass
class TokenDrop:
    """A training step's token drop (SPRINT Sec. 3.2): the share of tokens the middle blocks skip,
    how the kept ones are drawn (structured | random), and the probability that a sample skips the
    middle blocks altogether (path drop)."""
    ratio: float
    mask_type: str
    path_drop_prob: float


def sparse_path_inputs(batch_size, grid, token_drop, device):
    """SPRINT's random inputs of one training forward, drawn on the device with static shapes:
    ids_keep (B, M), the tokens the middle blocks keep, and path_drop (B,), the samples whose middle
    output is replaced by mask tokens. A model without a sparse path trains with neither."""
    inputs = {}
    if token_drop.ratio:
        inputs["ids_keep"] = sample_ids_keep(batch_size, grid, token_drop.ratio,
                                             token_drop.mask_type, device)
    if token_drop.path_drop_prob:
        inputs["path_drop"] = torch.rand(batch_size, device=device) < token_drop.path_drop_prob
    return inputs


def velocity_loss(model, x, y, t, eps, **sparse):
    """Linear path x_t = (1 - t) x + t eps; MSE between the predicted and the true velocity
    v = eps - x."""
    tt = t.view(-1, 1, 1, 1)
    v = model((1 - tt) * x + tt * eps, t, y, **sparse)
    return (v.float() - (eps - x)).pow(2).mean()


def train_step(model, raw, ema, opt, x, y, token_drop, precision, decay):
    """One AdamW step -> (loss, grad norm) as device tensors: nothing in here waits for the GPU."""
    B = x.shape[0]
    t = torch.sigmoid(torch.randn(B, device=x.device))          # logit-normal t = s/(1+s), s = e^n
    null = torch.rand(B, device=x.device) < LABEL_DROP
    y = torch.where(null, raw.cfg.num_classes, y)
    # SPRINT: the kept tokens of the middle blocks and the path-dropped samples (none for DiT)
    sparse = sparse_path_inputs(B, raw.cfg.grid, token_drop, x.device)
    with autocast(x.device, precision):
        loss = velocity_loss(model, x, y, t, torch.randn_like(x), **sparse)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_ema(ema, raw, decay)
    return loss.detach(), grad_norm


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, one fused kernel for all parameters."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


#################################################################################
#             The two stages: masked pre-training, full-token fine-tune         #
#################################################################################

@dataclass
class Stage:
    """A training stage: its first step, token drop, lr, lr warm-up steps and EMA target decay."""
    begin: int
    token_drop: TokenDrop
    lr: float
    warmup: int
    ema_decay: float

    def lr_at(self, step):
        """The official LinearLR warm-up (start_factor 0.01) over the stage's first `warmup` steps,
        then lr."""
        if not self.warmup:
            return self.lr
        return self.lr * (0.01 + 0.99 * min(1.0, (step - self.begin) / self.warmup))

    def ema_decay_at(self, step):
        """At most 0.999 during the lr warm-up, as the official fine-tuning does, then the target
        (0.9999; the toy data's short run uses 0.995)."""
        if step - self.begin < self.warmup:
            return min(self.ema_decay, 0.999)
        return self.ema_decay


def stages(args):
    """Stage 1 at --drop; stage 2 (--finetune-steps) at 0% drop with its own lr, warm-up and EMA
    (SPRINT Sec. 3.3). Path drop stays on in both."""
    token_drop = TokenDrop(args.drop, args.mask_type, args.path_drop)
    stage1 = Stage(0, token_drop, args.lr, args.warmup, args.ema_decay)
    full_tokens = replace(token_drop, ratio=0.0)
    stage2 = Stage(args.steps, full_tokens, args.ft_lr, args.ft_warmup, args.ft_ema_decay)
    return stage1, stage2


#################################################################################
#             Measuring a run: the logged interval, held-out loss, grids        #
#################################################################################

GRID = dict(sampler="euler", steps=25, cfg_scale=4.0)    # how the EMA sample grids are drawn


def read_interval(buf, world, done, last_ckpt):
    """The interval's per-step (loss, grad norm), averaged over the ranks: the loop's only wait for
    the device. A non-finite step stops the run, naming it."""
    vals = buf.clone()
    if world > 1:
        dist.all_reduce(vals)
    vals = vals.cpu() / world
    if not vals.isfinite().all():
        i = (~vals.isfinite().all(1)).nonzero()[0, 0].item()      # the interval's first bad step
        raise FloatingPointError(f"step {done - len(vals) + i + 1}: non-finite loss "
                                 f"{vals[i, 0].item()} (grad norm {vals[i, 1].item()}); stopped, "
                                 f"the last checkpoint is {last_ckpt or 'none'}")
    return vals


@torch.no_grad()
def held_out_loss(model, x, y, precision, token_drop, batch=64, grid=8):
    """Velocity loss on the held-out set, averaged over t = (i + 0.5)/grid with fixed noise and a
    fixed drop pattern: every evaluation sees the same inputs, and the training RNG is left alone
    (a resumed run stays exact)."""
    token_drop = replace(token_drop, path_drop_prob=0.0)
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(0)
        total = 0.0
        for t in (torch.arange(grid, device=x.device) + 0.5) / grid:
            for xb, yb in zip(x.split(batch), y.split(batch)):
                sparse = sparse_path_inputs(len(xb), model.cfg.grid, token_drop, x.device)
                with autocast(x.device, precision):
                    loss = velocity_loss(model, xb, yb, t.expand(len(xb)), torch.randn_like(xb),
                                         **sparse)
                total += len(xb) * loss
    return total.item() / (grid * len(x))


def evaluate(raw, eval_data, args, token_drop, run_dir, step, train_s):
    """Held-out loss with all tokens (what sampling sees) and with the training drop: stage 2
    closes the gap between them."""
    x, y = eval_data
    all_tokens = replace(token_drop, ratio=0.0)
    losses = {"eval_loss": held_out_loss(raw, x, y, args.precision, all_tokens)}
    if token_drop.ratio:
        losses["eval_loss_drop"] = held_out_loss(raw, x, y, args.precision, token_drop)
    text = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
    log(run_dir, f"step {step}: held-out {text}", step=step, train_s=train_s, **losses)


def save_samples(ema, z, y, pixels, precision, path):
    """EMA samples from fixed noise and classes, a column per class (latents: channels 0-2 scaled,
    no VAE)."""
    with autocast(z.device, precision):
        imgs = sample(ema, z, y, **GRID)
    if not pixels:
        imgs = (imgs[:, :3] / (2 * imgs.std())).clamp(-1, 1)
    save_grid(imgs, path, nrow=len(y) // 4)


#################################################################################
#          The run on disk: its folder, logs, checkpoints, exact resume         #
#################################################################################

def run_folder(args, resumed=None):
    """A resumed checkpoint's run folder, else results/NNN-model-size-patch: never an existing one,
    even when two runs start at once. It receives log.txt (for people), log.jsonl (one JSON record
    per line, for programs), checkpoints/ and samples/ (EMA grids)."""
    if resumed and os.path.basename(os.path.dirname(resumed)) == "checkpoints":
        return os.path.dirname(os.path.dirname(resumed))
    os.makedirs(args.results_dir, exist_ok=True)
    while True:
        numbers = [d.split("-")[0] for d in os.listdir(args.results_dir)]
        taken = [int(n) for n in numbers if n.isdigit()]
        name = f"{max(taken, default=-1) + 1:03d}-{args.model}-{args.size}-{args.patch_size}"
        path = os.path.join(args.results_dir, name)
        try:
            # fails if another run took the number
            os.makedirs(os.path.join(path, "checkpoints"))
        except FileExistsError:
            continue
        os.makedirs(os.path.join(path, "samples"))
        return path


def log(run_dir, text=None, **record):
    """Rank 0 (the one with a run folder): text to the console and log.txt, a record to
    log.jsonl."""
    if run_dir is None:
        return
    if text:
        tqdm.write(text)                                        # above the progress bar
    lines = (("log.txt", text), ("log.jsonl", record and json.dumps(record)))
    for name, line in lines:
        if line:
            with open(os.path.join(run_dir, name), "a") as f:
                # one write: a kill leaves whole lines
                f.write(line + "\n")


def weights_digest(*models):
    """A short hash of the per-tensor float64 sums of the weights: equal on all ranks if DDP
    works."""
    sums = torch.stack([p.detach().double().sum() for m in models for p in m.parameters()])
    return hashlib.sha256(sums.cpu().numpy().tobytes()).hexdigest()[:16]


def save_checkpoint(run_dir, done, raw, ema, opt, args, data_position, train_s, rank, world,
                    device):
    """Gather every rank's RNG state and check that DDP kept the ranks equal; rank 0 writes
    checkpoints/<step>.pt atomically, with all a resumed run needs (model, EMA, optimizer, every
    rank's RNG state, the data position, the training seconds so far) -> its path."""
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    states = [({"cpu": torch.get_rng_state(), "cuda": cuda_rng}, weights_digest(raw, ema))] * world
    if world > 1:
        dist.all_gather_object(states, states[0])
    rngs = [rng for rng, _ in states]
    digests = [digest for _, digest in states]
    path = os.path.join(run_dir or "", "checkpoints", f"{done:07d}.pt")
    if rank == 0:
        if len(set(digests)) > 1:
            raise RuntimeError(f"step {done}: the weights differ across ranks ({digests})")
        state = {
            "model": raw.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "config": asdict(raw.cfg),
            "args": vars(args),
            "step": done,
            "rng": rngs,
            "data": data_position,
            "train_s": train_s,
        }
        torch.save(state, path + ".tmp")
        # atomic: a kill at any moment leaves every file whole
        os.replace(path + ".tmp", path)
        log(run_dir, step=done, train_s=train_s, checkpoint=path, rank_weights=digests)
    return path


def load_run_state(path, ckpt, raw, ema, opt):
    """A read checkpoint's whole state into the model, its EMA and the optimizer -> (path, step,
    data position, RNG states, training seconds so far)."""
    try:
        load_weights(raw, path, ema=False, ckpt=ckpt)
        load_weights(ema, path, ema=True, ckpt=ckpt)
    except ValueError as e:
        raise ValueError(f"--resume {e}") from None
    opt.load_state_dict(ckpt["opt"])
    return path, ckpt["step"], ckpt["data"], ckpt["rng"], ckpt.get("train_s", 0.0)


def restore_rngs(rngs, args, rank, world, device, run_dir):
    """Noise, t, drop patterns and flips differ across ranks; a resumed run continues every rank's
    own stream."""
    torch.manual_seed(args.seed * world + rank)
    if rngs is not None and len(rngs) != world:
        log(run_dir, f"warning: saved by {len(rngs)} processes, resumed on {world}: not the saved "
                     f"noise stream")
    elif rngs is not None:
        torch.set_rng_state(rngs[rank]["cpu"])
        if device.type == "cuda" and rngs[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rngs[rank]["cuda"], device)


#################################################################################
#                                 The training loop                             #
#################################################################################

def main(argv=None):
    """Train as the flags say -> the run folder (rank 0; None on the other ranks)."""
    args, given = parse_args(argv)
    rank, world, device = setup_distributed()
    resumed = resolve_flags(args, given, world)
    cuda = device.type == "cuda"
    G = args.global_batch_size
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = True           # fp32 matmuls in TF32 on the GPU
    torch.backends.cudnn.allow_tf32 = True

    # Data: a fixed held-out subset for evaluation, the rest to train on
    data = setup_data(args)

    # Model: the same initial weights on every rank, then --init's weights or a whole --resume state
    torch.manual_seed(args.seed)
    raw, ema, opt = build_model(args, device, data.channels, data.num_classes, data.side)
    schedule = stages(args)
    # a token drop this grid cannot realise fails here, naming --drop
    sparse_path_inputs(2, raw.cfg.grid, schedule[0].token_drop, device)
    last_ckpt = None                                   # a fresh run: nothing saved, step 0
    start = 0
    position = {"epoch": 0, "batch": 0}
    rngs = None
    train_s = 0.0
    if resumed:
        last_ckpt, start, position, rngs, train_s = load_run_state(*resumed, raw, ema, opt)
    model = torch.compile(raw) if args.compile else raw
    if world > 1:              # buffers (RoPE grid, mask token) are equal by construction
        model = DDP(model, device_ids=[device] if cuda else None, broadcast_buffers=False)
    loader = data.loader(args, rank, world, position, pin_memory=cuda)
    per_epoch = len(data.train_idx) // G
    eval_data = None
    if rank == 0 and args.eval_every and len(data.eval_idx):
        eval_data = data.to_device(*data.dataset[data.eval_idx], device)
    # the EMA sample grid: 4 rows of up to 10 classes, the same noise at every step
    classes = torch.linspace(0, data.num_classes - 1, min(data.num_classes, 10)).round().long()
    grid_y = classes.repeat(4).to(device)
    noise = torch.Generator().manual_seed(args.seed)
    grid_z = torch.randn(len(grid_y), data.channels, data.side, data.side, generator=noise)
    grid_z = grid_z.to(device)

    # The run folder (rank 0 alone writes), each rank's own noise stream
    run_dir = run_folder(args, last_ckpt) if rank == 0 else None
    restore_rngs(rngs, args, rank, world, device, run_dir)
    log(run_dir, f"{args.model}-{args.size}/{args.patch_size}: {raw.num_params() / 1e6:.2f}M "
        f"parameters, {raw.flops() / 1e9:.3g} GFLOPs/image, "
        f"{raw.training_flops(args.drop) / 1e9:.3g} at drop {args.drop}; "
        f"{args.data or 'embedded toy data'}: {len(data.train_idx)} + {len(data.eval_idx)} held "
        f"out, {data.channels}x{data.side}x{data.side}, {data.num_classes} classes; {world} "
        f"process(es) x {G // world}; {run_dir}")

    total = args.steps + args.finetune_steps
    peak = matmul_peak(device) if cuda else None
    # per-step (loss, grad norm), read at log time
    buf = torch.zeros(args.log_every, 2, device=device)
    n = 0
    pbar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
    if start == 0 and args.eval_every and eval_data is not None:
        evaluate(raw, eval_data, args, schedule[0].token_drop, run_dir, 0, train_s)
    t0 = time.perf_counter()
    try:
        for step in range(start, total):
            stage = schedule[1] if step >= args.steps else schedule[0]
            if step == args.steps and step > 0:
                # stage 2 starts from the stage-1 EMA weights with a fresh optimizer, as --init
                raw.load_state_dict(ema.state_dict())
                opt = make_optimizer(raw, stage.lr, device)
            for group in opt.param_groups:
                group["lr"] = stage.lr_at(step)
            x, y = data.to_device(*next(loader), device)
            if data.pixels:                                              # random horizontal flips
                flip = torch.rand(len(x), 1, 1, 1, device=device) < 0.5
                x = torch.where(flip, x.flip(3), x)
            loss, grad_norm = train_step(model, raw, ema, opt, x, y, stage.token_drop,
                                         args.precision, stage.ema_decay_at(step))
            buf[n, 0] = loss
            buf[n, 1] = grad_norm
            n += 1
            done = step + 1
            pbar.update()

            # Every log interval, checkpoint, evaluation or grid: one read of the device
            stage_end = done in (args.steps, total)
            ckpt_now = stage_end or (args.ckpt_every and done % args.ckpt_every == 0)
            eval_now = args.eval_every and (stage_end or done % args.eval_every == 0)
            sample_now = args.sample_every and (done == total or done % args.sample_every == 0)
            if n < args.log_every and not (ckpt_now or eval_now or sample_now):
                continue
            vals = read_interval(buf[:n], world, done, last_ckpt)
            n = 0
            # training seconds only: evaluation, grids and checkpoints happen after t0 is read
            seconds = time.perf_counter() - t0
            train_s += seconds
            images = len(vals) * G
            flops_per_s = 3 * raw.training_flops(stage.token_drop.ratio) * images / seconds / world
            figures = {
                "loss": vals[:, 0].mean().item(),
                "img/s": images / seconds,
                "TFLOP/s": flops_per_s / 1e12,               # per process
            }
            if peak:
                figures["MFU"] = raw.estimate_mfu(flops_per_s, peak)
            pbar.set_postfix({k: f"{v:.4g}" for k, v in figures.items()})
            log(run_dir, step=done, stage=1 + (step >= args.steps), train_s=train_s,
                lr=opt.param_groups[0]["lr"], grad_norm=vals[:, 1].mean().item(), **figures)
            if eval_now and eval_data is not None:
                # with stage 1's drop in both stages: the gap that stage 2 closes
                evaluate(raw, eval_data, args, schedule[0].token_drop, run_dir, done, train_s)
            if sample_now and rank == 0:
                path = f"{run_dir}/samples/{done:07d}.png"
                save_samples(ema, grid_z, grid_y, data.pixels, args.precision, path)
            if ckpt_now:
                seen = position["epoch"] * per_epoch + position["batch"] + done - start
                epoch, batch = divmod(seen, per_epoch)
                last_ckpt = save_checkpoint(run_dir, done, raw, ema, opt, args,
                                            {"epoch": epoch, "batch": batch}, train_s, rank,
                                            world, device)
            t0 = time.perf_counter()
    finally:                     # also on an error: its message then starts on a line of its own
        pbar.close()
        # the DataLoader's worker processes end with the run, also on an error (its iterators have
        # no public close; left to the garbage collector, workers can outlive the run by seconds)
        if hasattr(loader, "_shutdown_workers"):
            loader._shutdown_workers()
    log(run_dir, f"done: {total} steps, checkpoints in {run_dir}/checkpoints")
    if world > 1:
        # every rank waits for rank 0's last checkpoint: one that left early could abort the
        # others' gloo threads at exit
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def cli(argv=None):
    """train.py as a command: bad input or a diverged run ends in one line, no traceback."""
    try:
        return main(argv)
    except (ValueError, FloatingPointError) as e:
        message = str(e)
        # raised in a DataLoader worker: its last line only
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        raise SystemExit(f"train.py: error: {message}") from None


if __name__ == "__main__":
    cli()
