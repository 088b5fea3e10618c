"""
Train DiT, SPRINT or SparseDiT: one plain DDP loop for both stages of SPRINT, with the loss of the
model's diffusion (flow matching as SiT; DiT's DDPM loss for a model converted from a released DiT).

    python train.py --model sprint --drop 0.75        # the toy SPRINT, both stages, CPU or GPU
    torchrun --nproc_per_node=8 train.py --model sprint --size XL --data imagenet256_sdvae ...

The defaults are the toy run; README.md's recipes give the papers'. The file reads in the order of
a run: flags, data, model, the loss and its draws, the step, then the loop: each step trains, then
logs, evaluates, checkpoints and samples the EMA when due. Exact resume from the step alone: epoch
e's data order comes from (seed, e), every other draw of step s from (seed, s).
"""
import argparse
import contextlib
import copy
import glob
import inspect
import json
import math
import os
import re
import sys
import time
import zipfile
from collections import namedtuple
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

import fid
from sample import (LATENT_SCALE, SAMPLING, SD_VAE, autocast, checkpoint_weights, find_checkpoint,
                    generate, load_vae, load_weights, number, read_checkpoint, sample_grid,
                    setup_distributed)
from sparsedit import DDPM, MODELS, SparseDiT
from sprint import DDPM_STEPS, DIT_PAPER, SIZES, ModelConfig, sample_ids_keep


#################################################################################
#                 Flags: literal defaults, the embedded toy run                 #
#################################################################################

def parser():
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0].strip(),
                                allow_abbrev=False)
    p.add_argument("--model", choices=list(MODELS), default="sprint")
    p.add_argument("--size", choices=list(SIZES), default="toy", help="width, heads, depths")
    p.add_argument("--patch-size", type=number(1), default=2)
    p.add_argument("--hidden-size", type=number(1), help="overrides the size's width")
    p.add_argument("--num-heads", type=number(1), help="overrides the size's heads")
    p.add_argument("--depths", type=number(0), nargs=3, help="overrides the size's blocks")
    p.add_argument("--layout", type=lambda s: [int(v) for v in s.split(",")], help="sparsedit's")
    p.add_argument("--density", type=number(1), nargs=2, help="sparsedit's sparse grid sides")
    p.add_argument("--data", help="an image folder, x.npy and y.npy's folder, or an .npz")
    p.add_argument("--image-size", type=number(1), help="default: the data's, 16 toy, 64 folders")
    p.add_argument("--latent-scale", type=float, default=LATENT_SCALE, help="times float latents")
    p.add_argument("--flip", choices=["none", "step"], help="mirror half the images each step "
                   "(default: the paper's, DiT's; never SPRINT's, SparseDiT's)")
    p.add_argument("--num-workers", type=number(0), help="default: 8 images, 4 x.npy, 0 in memory")
    p.add_argument("--drop", type=number(0, 1, float), default=0.75, help="SPRINT's token drop")
    p.add_argument("--mask-type", choices=["structured", "random"], default="structured")
    p.add_argument("--path-drop", type=number(0, 1, float), default=0.1, help="SPRINT's")
    p.add_argument("--global-batch-size", type=number(1), default=32)
    p.add_argument("--grad-accum", type=number(1), default=1, help="micro-batches a step")
    p.add_argument("--lr", type=float, default=1e-3, help="stage 1 (SPRINT, SiT: 1e-4)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="stage 1 (the papers: 0.9999)")
    p.add_argument("--steps", type=number(0), default=2000, help="stage-1 steps")
    p.add_argument("--finetune-steps", type=number(0), default=500, help="stage 2, at 0%% drop")
    p.add_argument("--ft-lr", type=float, default=1e-3, help="stage 2 (official: 2e-4)")
    p.add_argument("--ft-warmup", type=number(0), default=100, help="stage 2 (official: 5000)")
    p.add_argument("--ft-ema-decay", type=float, default=0.995, help="(official: 0.9999)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="the paper's on CUDA")
    p.add_argument("--grad-clip", type=number(0, kind=float), help="0: none (the paper's)")
    start = p.add_mutually_exclusive_group()      # a new model, --init's weights, or a run's
    start.add_argument("--diffusion", choices=["flow", "ddpm"], help="ddpm: the DiT paper's model")
    start.add_argument("--init", help="a checkpoint's EMA weights (a DiT's: SparseDiT's start)")
    start.add_argument("--resume", help="a run folder or checkpoint, continued with its flags")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true", help="blocks recomputed")
    p.add_argument("--seed", type=int, default=0, help="weights, data order, every random draw")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--log-every", type=number(1), default=25, help="loss, img/s, TFLOP/s")
    p.add_argument("--eval-every", type=number(0), default=250, help="held-out loss; 0: never")
    p.add_argument("--ckpt-every", type=number(0), default=500, help="0: at stage ends only")
    p.add_argument("--keep-last", type=number(0), default=0, help="checkpoints kept; 0: all")
    p.add_argument("--keep-every", type=number(0), default=0, help="milestones kept besides")
    p.add_argument("--sample-every", type=number(0), default=500, help="EMA grids; 0: never")
    p.add_argument("--fid-every", type=number(0), default=0, help="the EMA's FID; 0: never")
    p.add_argument("--fid-ref", help="fid.py's REF, e.g. ADM's reference batch")
    p.add_argument("--fid-samples", type=number(2), default=10_000, help="samples per FID")
    return p


# what a resumed run may change: its length (only longer), how it runs, is watched and kept
RESUMABLE = {"--steps", "--finetune-steps", "--grad-accum", "--compile", "--num-workers",
             "--activation-checkpointing", "--log-every", "--eval-every", "--ckpt-every",
             "--keep-last", "--keep-every", "--sample-every", "--fid-every", "--fid-ref",
             "--fid-samples"}


def parse_args(argv):
    """The flags of a new run or of the run --resume continues -> (flags, its checkpoint or None)"""
    args = parser().parse_args(argv)
    if args.resume is None:
        return args, None
    path = max(glob.glob(os.path.join(args.resume, "checkpoints", "*.pt")), default=args.resume)
    if not os.path.isfile(path):
        raise ValueError(f"--resume {args.resume}: no such checkpoint, nor a run folder with one")
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"--resume {e}") from None
    if "args" not in ckpt:
        raise ValueError(f"--resume {path}: not a checkpoint of train.py (give it as --init)")
    given = {a.split("=")[0] for a in argv if a.startswith("--")} - {"--resume"}
    if given - RESUMABLE:
        raise ValueError(f"--resume {path} takes the run's flags: leave out "
                         f"{' '.join(sorted(given - RESUMABLE))} (it may change only "
                         f"{' '.join(sorted(RESUMABLE))})")
    stored = ckpt["args"]
    run = argparse.Namespace(**{**vars(parser().parse_args([])), **stored, "resume": path})
    for name in (flag[2:].replace("-", "_") for flag in given):
        setattr(run, name, getattr(args, name))
    shrinks = run.steps < stored["steps"] or run.finetune_steps < stored["finetune_steps"]
    if shrinks or (ckpt["step"] > stored["steps"] and run.steps != stored["steps"]):
        raise ValueError(f"--steps {run.steps} --finetune-steps {run.finetune_steps}: a resumed "
                         f"run may only grow, stage 1 only while it lasts (step {ckpt['step']})")
    return run, ckpt


#################################################################################
#            Data: the toy set, image folders, arrays (memory-mapped)           #
#################################################################################

def embedded_dataset(size=16, n=4000, seed=0):
    """Ten classes of coloured shapes drawn in numpy: uint8 (n, size, size, 3), labels (n,). A class
    is a shape and a hue; position, radius, hue and background vary."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    r = rng.uniform(0.2, 0.32, (n, 1, 1))
    cy, cx = rng.uniform(0.35, 0.65, (2, n, 1, 1))
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size                # pixel centres in (0, 1)
    dy, dx = yy - cy, xx - cx
    d, box, thin = np.hypot(dy, dx), np.maximum(abs(dx), abs(dy)), 0.3 * r
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
    fg = 0.5 + 0.5 * np.cos(2 * np.pi * hue)                      # a point on the colour wheel
    bg = rng.uniform(0.0, 0.35, (n, 1)) * np.ones(3)
    return (255 * np.where(mask, fg[:, None, None], bg[:, None, None])).round().astype(np.uint8), y


def center_crop_arr(img, size):
    """ADM's (and DiT's): halve with a box filter while large, resize bicubic, crop the centre."""
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    arr = np.asarray(img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


class Arrays:
    """x: an image folder's files, uint8 images (N, H, W, 3) or float latents (N, [V views, [M = 2:
    the posterior's mean and std,]] C, H, W), y: N labels, in memory or x.npy and y.npy memory-
    mapped and opened per batch (nanoGPT's way). data[idx]: (B, 3, H, W) or (B, V, M, C, H, W)."""
    def __init__(self, source, size, x=None, y=None):
        self.source, self.size, self.x, self.y = source, size, x, y

    def arrays(self):
        if self.x is not None:
            return self.x, self.y
        return tuple(np.load(os.path.join(self.source, f"{k}.npy"), mmap_mode="r") for k in "xy")

    def __len__(self):
        return len(self.arrays()[1])

    def __getitem__(self, idx):
        x, y = self.arrays()
        x = [fid.read_image(f, "--data") for f in x[idx]] if x.dtype.kind == "U" else x[idx]
        y = torch.from_numpy(y[idx].astype(np.int64))
        if isinstance(x, list) or (x.dtype == np.uint8 and x.shape[1:3] != (self.size,) * 2):
            x = np.stack([center_crop_arr(img, self.size) for img in x])
        x = torch.from_numpy(np.asarray(x))
        if x.dtype == torch.uint8:
            return x.permute(0, 3, 1, 2), y                                   # (B, 3, H, W)
        views = x.shape[1] if x.ndim > 4 else 1
        return x.reshape(len(x), views, -1, *x.shape[-3:]), y                # (B, V, M, C, H, W)


def image_folder(root, size):
    """root/<class>/<image> (ImageNet layout), the classes in sorted order -> (Arrays, classes)."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    files = [(os.path.join(root, c, name), k) for k, c in enumerate(classes)
             for name in sorted(os.listdir(os.path.join(root, c)))
             if name.lower().endswith(fid.IMAGE_EXTS)]
    if not files:
        raise ValueError(f"--data {root}: no images (.png/.jpg/.webp/.bmp) in sub-folders")
    x, y = map(np.array, zip(*files))
    return Arrays(root, size, x, y), len(classes)


def load_data(args):
    """(dataset, number of classes) of --data, checked where it enters."""
    if args.data is None:
        return Arrays("the toy data", args.image_size or 16,
                      *embedded_dataset(args.image_size or 16)), 10
    if os.path.isdir(args.data) and not os.path.isfile(os.path.join(args.data, "x.npy")):
        return image_folder(args.data, args.image_size or 64)
    try:
        data = Arrays(args.data, args.image_size)
        if not os.path.isdir(args.data):
            with np.load(args.data) as f:
                data.x, data.y = f["x"], f["y"]
        x, y = data.arrays()
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"--data {args.data}: not an image folder, a folder with x.npy and y.npy, "
                         f"nor an .npz with arrays x and y ({type(e).__name__}: {e})") from None
    pixels = x.dtype == np.uint8 and x.ndim == 4 and x.shape[3] == 3
    latents = x.dtype.kind == "f" and x.ndim in (4, 5, 6) and x.shape[-1] == x.shape[-2]
    moments = x.ndim != 6 or x.shape[2] == 2
    labels = y.shape == x.shape[:1] and len(y) > 0 and y.dtype.kind in "iu" and y.min() >= 0
    if not (pixels or (latents and moments)) or not labels:
        raise ValueError(f"--data {args.data}: x must hold N uint8 images (N, H, W, 3) or float "
                         f"latents (N, [views, [2 (mean, std),]] C, H, H), y their N labels >= 0; "
                         f"got x {x.shape} {x.dtype}, y {y.shape} {y.dtype}")
    if latents and args.image_size not in (None, x.shape[-1]):
        raise ValueError(f"--image-size {args.image_size}: {args.data} holds {x.shape[-1]}x"
                         f"{x.shape[-1]} latents, which are not resized; leave --image-size out")
    data.size = args.image_size or (min(x.shape[1:3]) if pixels else x.shape[-1])
    return data, int(y.max()) + 1


def split(n):
    """Rows to train on, and min(256, n/10) held out (the same every run), each image whole."""
    perm = np.random.default_rng(0).permutation(n)
    k = min(256, n // 10)
    return perm[k:], np.sort(perm[:k])


def epoch_batches(indices, global_batch, rank, world, seed, step):
    """This rank's slice of each global batch from `step` on; epoch e's order seeded (seed, e)."""
    per_epoch, L = len(indices) // global_batch, global_batch // world
    epoch, batch = divmod(step, per_epoch)
    while True:
        perm = indices[np.random.default_rng((seed, epoch)).permutation(len(indices))]
        for b in range(batch, per_epoch):
            yield perm[b * global_batch + rank * L: b * global_batch + (rank + 1) * L]
        epoch, batch = epoch + 1, 0


def model_inputs(x, latent_scale, noise=None):
    """A batch as the model sees it: pixels (B, 3, H, W) in [-1, 1]; latents (B, V, M, C, H, W) by
    their first view, the posterior's mean or a draw mean + std * noise, times the latent scale."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    if noise is None:
        return x[:, 0, 0].float() * latent_scale
    return (x[:, 0, 0].float() + x[:, 0, 1].float() * noise) * latent_scale


def step_inputs(x, flip, latent_scale, G, rows):
    """A training batch as the model sees it, drawn for the global batch of G (this rank's rows):
    --flip step mirrors half (latents: the mirror's view), a posterior gives a fresh latent."""
    if flip == "step":
        mirrored = (torch.rand(G, device=x.device) < 0.5)[rows]
        views = x.flip(3 if x.dtype == torch.uint8 else 1)       # latents (B, 2, ...): swapped
        x = torch.where(mirrored.view(-1, *[1] * (x.ndim - 1)), views, x)
    posterior = x.dtype != torch.uint8 and x.shape[2] == 2
    noise = torch.randn(G, *x.shape[-3:], device=x.device)[rows] if posterior else None
    return model_inputs(x, latent_scale, noise)


#################################################################################
#     The model, its EMA and optimizer; the losses, their draws, the step       #
#################################################################################

def new_model(args, channels, side, num_classes):
    """The flags' model; with --init, its checkpoint's EMA weights (a DiT's converted to SparseDiT),
    diffusion, positions and q/k norm (a released DiT's: the DiT paper's, DIT_PAPER)."""
    init_cfg, weights = None, None
    if args.init:
        path = find_checkpoint(args.init)
        init_cfg, weights = checkpoint_weights(read_checkpoint(path), path, input_size=side)
    paper = DIT_PAPER if args.diffusion == "ddpm" else {}          # the DiT paper's model, or SiT
    if init_cfg:                                                  # the model --init's file holds
        paper = {k: getattr(init_cfg, k) for k in DIT_PAPER}
    sparsedit = {k: getattr(args, k) for k in ("layout", "density") if getattr(args, k)}
    cfg = ModelConfig(model=args.model, size=args.size, patch_size=args.patch_size,
                      input_size=side, in_channels=channels, num_classes=num_classes,
                      hidden_size=args.hidden_size or 0, num_heads=args.num_heads or 0,
                      depths=tuple(args.depths or ()), extra=sparsedit, **paper)
    model = MODELS[cfg.model](cfg)
    if init_cfg and init_cfg.model != cfg.model:
        if not (init_cfg.model == "dit" and isinstance(model, SparseDiT)):
            raise ValueError(f"{args.init} holds a {init_cfg.model} model: train it as "
                             f"--model {init_cfg.model} (a dit also as --model sparsedit)")
        weights = model.from_dit(weights)
    if weights:
        load_weights(model, weights, args.init)
    return model


def build_model(args, channels, side, num_classes, device, resumed=None):
    """(model, EMA, AdamW): a resumed run's, or the flags' new model and a copy of it as the EMA."""
    if resumed:
        raw = MODELS[resumed["config"]["model"]](ModelConfig(**resumed["config"]))
        raw.load_state_dict(resumed["model"])
    else:
        try:
            raw = new_model(args, channels, side, num_classes)
        except ValueError as e:
            raise ValueError(f"--init {e}" if args.init else str(e)) from None
    ema = copy.deepcopy(raw.to(device)).requires_grad_(False)
    opt = make_optimizer(raw, args.lr, device)
    if resumed:
        ema.load_state_dict(resumed["ema"])
        opt.load_state_dict(resumed["opt"])
    return raw, ema, opt


def make_optimizer(model, lr, device):
    """AdamW with weight decay 0 (SiT, DiT); the fused kernel on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0, fused=device.type == "cuda")


LABEL_DROP = 0.1               # labels -> the null label, for classifier-free guidance


def loss_at(model, x, draws, ddpm):
    """The training loss of each sample (B,) for its draws: flow matching's, the MSE of the velocity
    v = eps - x on the path x_t = (1 - t) x + t eps (SiT); or, given ddpm, DiT's mse + vb."""
    t, y, eps, sparse = draws
    if ddpm:                                              # a DDPM model has no sparse path
        return sum(ddpm.losses(model, x, y, t, eps))
    tt = t.view(-1, 1, 1, 1)
    v = model((1 - tt) * x + tt * eps, t, y, **sparse)
    return (v.float() - (eps - x)).pow(2).mean((1, 2, 3))


Stage = namedtuple("Stage", "drop mask_type path_drop lr ema_decay")


def stage_at(args, step, sparse_path):
    """This step's stage (SPRINT Sec. 3.3). Stage 1: --drop, --lr, --ema-decay. Stage 2 from step
    --steps on: every token, from the stage-1 EMA weights with a fresh AdamW, --ft-lr warmed up from
    1% over --ft-warmup steps (the official LinearLR), EMA decay at most 0.999 meanwhile. Path drop
    in both stages; neither drop without a sparse path."""
    path_drop = args.path_drop if sparse_path else 0.0
    if step < args.steps:
        drop = args.drop if sparse_path else 0.0
        return Stage(drop, args.mask_type, path_drop, args.lr, args.ema_decay)
    warming_up = step - args.steps < args.ft_warmup
    progress = (step - args.steps) / args.ft_warmup if warming_up else 1.0
    ema_decay = min(args.ft_ema_decay, 0.999) if warming_up else args.ft_ema_decay
    return Stage(0.0, args.mask_type, path_drop, args.ft_lr * (0.01 + 0.99 * progress), ema_decay)


Draws = namedtuple("Draws", "t y eps sparse")   # sparse: SPRINT's {"ids_keep", "path_drop"}


def draw(y, shape, G, rows, stage, cfg):
    """The draws for labels y (B), this rank's rows of a global batch of G, drawn for all G: t (flow
    logit-normal, sigmoid(n), n ~ N(0, 1); DDPM uniform over 0..999), 10% of the labels the null
    label, eps (B, *shape) ~ N(0, I), then SPRINT's token and path drops, apart from the label's."""
    device = y.device
    if cfg.diffusion == "ddpm":
        t = torch.randint(DDPM_STEPS, (G,), device=device)
    else:
        t = torch.sigmoid(torch.randn(G, device=device))
    null = torch.rand(G, device=device) < LABEL_DROP
    eps = torch.randn(G, *shape, device=device)
    sparse = {}                                  # SPRINT's: the kept tokens, the dropped paths
    if stage.drop:
        sparse["ids_keep"] = sample_ids_keep(G, cfg.grid, stage.drop, stage.mask_type, device)[rows]
    if stage.path_drop:
        sparse["path_drop"] = (torch.rand(G, device=device) < stage.path_drop)[rows]
    return Draws(t[rows], torch.where(null[rows], cfg.num_classes, y), eps[rows], sparse)


def train_step(model, raw, ema, opt, x, draws, *, accum, ema_decay, ddpm, precision, grad_clip,
               scaler):
    """One AdamW step on this rank's batch in `accum` micro-batches (DDP averages the ranks' summed
    gradients after the last), the EMA update -> (loss, grad norm) on the device: no host sync."""
    loss = 0.0
    fields = [x, draws.t, draws.y, draws.eps, *draws.sparse.values()]     # each cut in `accum`
    for k, (x_k, t, y, eps, *sparse) in enumerate(zip(*(f.chunk(accum) for f in fields))):
        last = k == accum - 1
        with contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            with autocast(x.device, precision):
                draws_k = Draws(t, y, eps, dict(zip(draws.sparse, sparse)))
                loss_k = loss_at(model, x_k, draws_k, ddpm).mean() / accum
            scaler.scale(loss_k).backward()
        loss = loss + loss_k.detach()
    scaler.unscale_(opt)                               # the true gradient, to clip and to log
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    ema_update = get_ema_multi_avg_fn(ema_decay)      # fused over all parameters
    ema_update(list(ema.parameters()), list(raw.parameters()), None)
    return loss, grad_norm


#################################################################################
#   The run: held-out loss, the log, its folder and checkpoints; the loop       #
#################################################################################

@torch.no_grad()
def held_out_loss(model, x, y, rows, n, stage, ddpm, precision):
    """This rank's share (rows x, y) of the n held-out images' mean loss, drawn as a step draws
    from seed 0: the same t, labels and noise every time, with and without drop."""
    torch.manual_seed(0)                      # the next training step reseeds from its own step
    draws = draw(y, x.shape[1:], n, rows, stage, model.cfg)
    with autocast(x.device, precision):
        return loss_at(model, x, draws, ddpm).sum() / n


def log(run_dir, text=None, **record):
    """Rank 0's log: text to the console and log.txt, a record to log.jsonl; a write a line."""
    for name, line in (("log.txt", text), ("log.jsonl", record and json.dumps(record))):
        if run_dir and line:
            with open(os.path.join(run_dir, name), "a") as f:
                f.write(line + "\n")
    if run_dir and text:
        tqdm.write(text)                                        # above the progress bar


def run_folder(args):
    """results/NNN-model-size-patch, NNN one past the highest there (makedirs claims it: runs begun
    together each get their own), with checkpoints/, log.txt (for people), log.jsonl (programs)."""
    os.makedirs(args.results_dir, exist_ok=True)
    taken = [re.match(r"\d+", name) for name in os.listdir(args.results_dir)]
    number = max((int(m.group()) for m in taken if m), default=-1) + 1
    while True:
        path = f"{args.results_dir}/{number:03d}-{args.model}-{args.size}-{args.patch_size}"
        try:
            os.makedirs(os.path.join(path, "checkpoints"))
            return path
        except FileExistsError:
            number += 1


def save_checkpoint(run_dir, step, raw, ema, opt, scaler, args, train_s):
    """checkpoints/<step>.pt, written atomically (a kill leaves every file whole); then --keep-last
    deletes older ones but the stages' ends and --keep-every's (the official total limit, list)."""
    path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
    torch.save(dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                    scaler=scaler.state_dict(), config=asdict(raw.cfg), args=vars(args), step=step,
                    train_s=train_s), path + ".tmp")
    os.replace(path + ".tmp", path)
    log(run_dir, step=step, train_s=train_s, checkpoint=path)
    older = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")))[:-args.keep_last]
    for old in older if args.keep_last else []:
        at = int(os.path.basename(old)[:-3])
        if not (at in (args.steps, args.steps + args.finetune_steps) or due(at, args.keep_every)):
            os.remove(old)
    return path


def ema_fid(ema, inception, ref, args, B, rank, world, sampling):
    """fid.py's FID of --fid-samples unguided EMA images (the official eval_fid's) against
    --fid-ref's statistics ref; batch k (samples kB..kB+B-1) on rank k % world, as sample.py's."""
    N = args.fid_samples
    stored = (generate(ema, range(k * B, min(k * B + B, N)), args.seed, None, *sampling)[0]
              for k in range(rank, math.ceil(N / B), world))
    return fid.fid_of((images["arr_0"] for images in stored), inception, ref, world)


def due(step, every):
    """Whether what is done every `every` steps (0: never) is due after `step` steps."""
    return every > 0 and step % every == 0


def main(argv=None):
    """Train as the flags say -> the run folder (rank 0; None on the other ranks)."""
    args, ckpt = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world, device = setup_distributed()
    G, total, accum = args.global_batch_size, args.steps + args.finetune_steps, args.grad_accum
    if total < 1:
        raise ValueError(f"--steps {args.steps} --finetune-steps 0: nothing to train")
    if G % (world * accum):
        raise ValueError(f"--global-batch-size {G} does not split over {world} processes x "
                         f"--grad-accum {accum}")
    L = G // world
    rows = slice(rank * L, (rank + 1) * L)                 # this rank's rows of a global batch

    dataset, num_classes = load_data(args)
    train_idx, eval_idx = split(len(dataset))
    if len(train_idx) < G:
        raise ValueError(f"--global-batch-size {G}: the data holds {len(train_idx)} to train on")
    first = dataset[[0]][0]                 # pixels (1, 3, H, W) or latents (1, V, M, C, H, W)
    pixels = first.dtype == torch.uint8

    # Model: the same initial weights on every rank, then --init's or a resumed run's state
    torch.manual_seed(args.seed)
    raw, ema, opt = build_model(args, first.shape[-3], first.shape[-1], num_classes, device, ckpt)
    if args.activation_checkpointing:
        raw.checkpoint_blocks()
    ddpm = DDPM(device=device) if raw.cfg.diffusion == "ddpm" else None
    recipe = raw.cfg.paper_recipe                       # where no flag says; kept in args
    precision = args.precision = args.precision or (
        recipe.precision if device.type == "cuda" else "fp32")
    grad_clip = args.grad_clip = recipe.grad_clip if args.grad_clip is None else args.grad_clip
    mirrors = pixels or first.shape[1] == 2                 # latents: both views stored
    args.flip = args.flip or (recipe.flip if mirrors else "none")
    if args.flip == "step" and not mirrors:
        raise ValueError(f"--flip step: {args.data} stores no mirror of its images: train --flip "
                         f"none, or encode both views (tools/encode_latents.py --views both)")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if ckpt and ckpt.get("scaler"):                     # a disabled scaler's state is empty
        scaler.load_state_dict(ckpt["scaler"])
    held_out = stage_at(args, 0, raw.has_sparse_path)._replace(path_drop=0.0)   # stage 1's drop
    middle = ""
    if held_out.drop:                # a drop the token grid cannot keep: refused before any write
        M = sample_ids_keep(1, raw.cfg.grid, held_out.drop, args.mask_type).shape[1]
        middle = f" (the middle on {M})"

    # The EMA's samples: the official loop's Euler (DDPM) 50 steps, as sample.py samples them
    precision_s = SAMPLING[raw.cfg.diffusion][0] if device.type == "cuda" else "fp32"
    vae, no_grids = None, None
    if not pixels and (args.sample_every or args.fid_every):
        try:
            vae = load_vae(SD_VAE, device, precision_s)
        except ValueError as e:                         # without diffusers: no grids, no FID
            if args.fid_every:
                raise ValueError(f"--fid-every: {e}") from None
            no_grids = f"no sample grids: {e}"
    sampling = ("ddpm" if ddpm else "euler", 50, precision_s, vae, args.latent_scale)
    if args.fid_every:                   # fid.py's Inception (torch's hub cache), REF's statistics
        if not args.fid_ref:
            raise ValueError(f"--fid-every {args.fid_every}: give fid.py's --fid-ref REF")
        inception = fid.released(fid.FIDInceptionV3, fid.INCEPTION_URL, device)
        ref, _ = fid.statistics(args.fid_ref, "--fid-ref", ("mu", "sigma"), lambda _: inception, 50)

    # The run: the data in order from its step, this rank's share of the held-out images
    start, train_s = (ckpt["step"], ckpt["train_s"]) if ckpt else (0, 0.0)
    order = epoch_batches(train_idx, G, rank, world, args.seed, start)
    decodes = dataset.x is not None and dataset.x.dtype.kind == "U"     # an image folder's files
    workers = 8 if decodes else (4 if dataset.x is None else 0)         # 4: x.npy's memory map
    workers = workers if args.num_workers is None else args.num_workers
    loader = iter(DataLoader(dataset, sampler=order, batch_size=None, num_workers=workers,
                             pin_memory=device.type == "cuda", generator=torch.Generator()))
    eval_rows = slice(rank, None, world)
    mine = eval_idx[eval_rows]
    eval_x, eval_y = dataset[mine] if len(mine) else (first[:0], torch.zeros(0, dtype=torch.long))
    eval_x, eval_y = model_inputs(eval_x.to(device), args.latent_scale), eval_y.to(device)
    model = torch.compile(raw) if args.compile else raw
    if world > 1:      # buffers (RoPE grid, mask token, table) are equal by construction: not sent
        sync = "forward_sync_buffers"                   # torch 2.13's name; earlier ones':
        sync = sync if sync in inspect.signature(DDP).parameters else "broadcast_buffers"
        model = DDP(model, device_ids=[device] if device.type == "cuda" else None, **{sync: False})
    last_ckpt = args.resume                       # the checkpoint a resumed run continues, or None
    run_dir = None
    if rank == 0:
        run_dir = os.path.dirname(os.path.dirname(last_ckpt)) if ckpt else run_folder(args)
    log(run_dir, f"{args.model}-{args.size}/{args.patch_size}: {raw.num_params() / 1e6:.2f}M "
        f"parameters, {raw.num_tokens} tokens, {raw.training_flops(held_out.drop) / 1e9:.3g} "
        f"GFLOPs/image as trained{middle}; {precision}, grad clip {grad_clip or 0}, flip "
        f"{args.flip}; {len(train_idx)} + {len(eval_idx)} held-out images; batch {G} = {world} x "
        f"{accum} x {L // accum}; {run_dir}")
    log(run_dir, no_grids)

    def evaluate(step):
        """Held-out losses: the raw weights' with all tokens (as sampled) and at stage 1's drop (the
        gap stage 2 closes), the EMA's with all tokens (what sampling uses)."""
        measured = {"eval_loss": (raw, 0.0), "eval_loss_drop": (raw, held_out.drop),
                    "eval_loss_ema": (ema, 0.0)}
        if not held_out.drop:
            del measured["eval_loss_drop"]
        values = torch.stack([held_out_loss(weights, eval_x, eval_y, eval_rows, len(eval_idx),
                                            held_out._replace(drop=drop), ddpm, precision)
                              for weights, drop in measured.values()])
        if world > 1:
            dist.all_reduce(values)
        losses = dict(zip(measured, values.tolist()))
        text = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
        log(run_dir, f"step {step}: held-out {text}", step=step, train_s=train_s, **losses)

    evaluating = len(eval_idx) > 0 and args.eval_every > 0
    if start == 0 and evaluating:
        evaluate(0)
    pending = []                                # each step's (loss, grad norm), on the device
    pbar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
    clock = time.perf_counter()
    try:
        for step in range(start, total):
            # Train one step, every random draw of it from (seed, step), on every rank
            stage = stage_at(args, step, raw.has_sparse_path)
            if step == args.steps and step > 0:         # stage 2: the EMA weights, a new AdamW
                raw.load_state_dict(ema.state_dict())
                opt = make_optimizer(raw, stage.lr, device)
            for group in opt.param_groups:
                group["lr"] = stage.lr
            torch.manual_seed(int(np.random.SeedSequence([args.seed, step]).generate_state(1)[0]))
            x, y = next(loader)
            x = step_inputs(x.to(device, non_blocking=True), args.flip, args.latent_scale, G, rows)
            draws = draw(y.to(device, non_blocking=True), x.shape[1:], G, rows, stage, raw.cfg)
            loss, grad_norm = train_step(model, raw, ema, opt, x, draws, accum=accum,
                                         ema_decay=stage.ema_decay, ddpm=ddpm, precision=precision,
                                         grad_clip=grad_clip, scaler=scaler)
            pending.append(torch.stack([loss, grad_norm]))
            pbar.update()

            # Then what is due after `done` steps (not training time): log, evaluations, samples
            done = step + 1
            stage_end = done in (args.steps, total)
            eval_now = evaluating and (stage_end or due(done, args.eval_every))
            ckpt_now = stage_end or due(done, args.ckpt_every)
            grid_now = due(done, args.sample_every) and not no_grids
            if not (due(done, args.log_every) or eval_now or ckpt_now or grid_now
                    or due(done, args.fid_every)):
                continue
            values = torch.stack(pending)
            if world > 1:
                dist.all_reduce(values)
            values = values.cpu() / world
            seconds = time.perf_counter() - clock
            train_s += seconds
            if not values[:, 0].isfinite().all():      # (fp16's grad norm may overflow: skipped)
                raise FloatingPointError(f"a non-finite loss by step {done}: stopped, the last "
                                         f"checkpoint is {last_ckpt or 'none'}")
            per_s = len(pending) * G / seconds              # images; a step: about 3 forwards
            figures = {"loss": values[:, 0].mean().item(), "img/s": per_s,
                       "TFLOP/s": 3 * raw.training_flops(stage.drop) * per_s / world / 1e12}
            pbar.set_postfix({k: f"{v:.4g}" for k, v in figures.items()})
            log(run_dir, step=done, stage=1 if done <= args.steps else 2, train_s=train_s,
                lr=stage.lr, grad_norm=values[:, 1].mean().item(), **figures)
            pending = []
            if eval_now:
                evaluate(done)
            if ckpt_now and run_dir:
                last_ckpt = save_checkpoint(run_dir, done, raw, ema, opt, scaler, args, train_s)
            if grid_now and run_dir:
                sample_grid(ema, f"{run_dir}/samples/{done:07d}.png", args.seed, *sampling)
            if due(done, args.fid_every):
                value = ema_fid(ema, inception, ref, args, L // accum, rank, world, sampling)
                log(run_dir, f"step {done}: FID {value:.3f} of {args.fid_samples} EMA samples",
                    step=done, train_s=train_s, fid=value)
            clock = time.perf_counter()
    finally:                     # also on an error: its message then starts on a line of its own
        pbar.close()
        del loader                               # its workers end with the run, not at exit
    if world > 1:            # every rank waits for rank 0's last checkpoint, then the group ends
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def cli(argv=None):
    """train.py as a command: bad input or a diverged run ends in one line, no traceback."""
    try:
        return main(argv)
    except (ValueError, FloatingPointError, OSError) as e:
        message = str(e)
        if "Original Traceback" in message:             # from a DataLoader worker: its last line
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        raise SystemExit(f"train.py: error: {message}") from None


if __name__ == "__main__":
    cli()
