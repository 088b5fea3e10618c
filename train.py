"""
Train DiT, SPRINT or SparseDiT: one plain DDP loop for both stages of SPRINT, with the loss of the
model's diffusion (flow matching as SiT; DiT's DDPM loss for a model converted from a released DiT).

    python train.py --model sprint --drop 0.75        # the toy SPRINT on toy data, CPU or GPU
    torchrun --nproc_per_node=8 train.py --model sprint --size XL --data imagenet256_sdvae \
        --latent-scale 0.18215 --global-batch-size 256 --lr 1e-4 --ema-decay 0.9999 --steps 400000
    torchrun --nproc_per_node=8 train.py --model sparsedit --size XL --init DiT-XL-2-256x256.pt ...

The defaults are the toy run; README.md's recipes give the papers' sizes and schedules. Stage 2
(--finetune-steps) trains on all tokens from the stage-1 EMA weights with a fresh optimizer, its own
lr, warm-up and EMA (SPRINT Sec. 3.3). Exact resume from the step alone: epoch e's data order comes
from (seed, e), every other draw of step s from (seed, s), for the whole global batch on every rank
(each takes its rows): a checkpoint is the weights, EMA, optimizer, step and config. Data: an image
folder, a folder with x.npy and y.npy (memory-mapped), an .npz with x and y, or none (toy shapes).
"""
import argparse
import copy
import glob
import json
import math
import os
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

from sample import (DDPM, autocast, checkpoint_weights, load_weights, read_checkpoint, sample,
                    sample_inputs, save_grid, setup_distributed)
from sparsedit import MODELS, SparseDiT
from sprint import DDPM_STEPS, SIZES, ModelConfig, sample_ids_keep


#################################################################################
#                 Flags: literal defaults, the embedded toy run                 #
#################################################################################

def number(low, high=math.inf, kind=int):
    """An argparse type for numbers in [low, high]: argparse names the flag in its error."""
    def parse(text):
        if not low <= kind(text) <= high:
            bounds = f"lie in [{low}, {high}]" if high < math.inf else f"be at least {low}"
            raise argparse.ArgumentTypeError(f"{text}: must {bounds}")
        return kind(text)
    return parse


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
    p.add_argument("--latent-scale", type=float, help="times float latents (SD-VAE: 0.18215)")
    p.add_argument("--num-workers", type=number(0), help="default: 8 for images, 0 for arrays")
    p.add_argument("--drop", type=number(0, 1, float), default=0.75, help="SPRINT's token drop")
    p.add_argument("--mask-type", choices=["structured", "random"], default="structured")
    p.add_argument("--path-drop", type=number(0, 1, float), default=0.1, help="SPRINT's")
    p.add_argument("--global-batch-size", type=number(1), default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="stage 1 (SPRINT, SiT: 1e-4)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="stage 1 (the papers: 0.9999)")
    p.add_argument("--steps", type=number(0), default=2000, help="stage-1 steps")
    p.add_argument("--finetune-steps", type=number(0), default=0, help="stage 2, at 0%% drop")
    p.add_argument("--ft-lr", type=float, default=1e-3, help="stage 2 (official: 2e-4)")
    p.add_argument("--ft-warmup", type=number(0), default=100, help="stage 2 (official: 5000)")
    p.add_argument("--ft-ema-decay", type=float, default=0.995, help="(official: 0.9999)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", help="a checkpoint's EMA weights (a DiT's: SparseDiT's start)")
    start.add_argument("--resume", help="a run folder or checkpoint, continued with its flags")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="weights, data order, every random draw")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--log-every", type=number(1), default=25, help="loss, img/s, TFLOP/s")
    p.add_argument("--ckpt-every", type=number(0), default=500, help="0: at stage ends only")
    p.add_argument("--sample-every", type=number(0), default=250, help="EMA grid; 0: never")
    p.add_argument("--eval-every", type=number(0), default=250, help="held-out loss; 0: never")
    return p


def parse_args(argv):
    """The flags of a new run or of the run --resume continues -> (flags, (checkpoint path, it))."""
    args = parser().parse_args(argv)
    if args.resume is None:
        return args, (None, None)
    path = max(glob.glob(os.path.join(args.resume, "checkpoints", "*.pt")), default=args.resume)
    if not os.path.isfile(path):
        raise ValueError(f"--resume {args.resume}: no such checkpoint, nor a run folder with one")
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"--resume {e}") from None
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if given - {"--resume", "--steps", "--finetune-steps"}:
        raise ValueError(f"--resume {path} takes the run's flags, and only --steps and "
                         f"--finetune-steps may grow: leave out the others")
    run = argparse.Namespace(**{**ckpt["args"], "resume": path})
    run.steps = args.steps if "--steps" in given else run.steps
    run.finetune_steps = args.finetune_steps if "--finetune-steps" in given else run.finetune_steps
    step, stored = ckpt["step"], ckpt["args"]
    grows = run.steps >= stored["steps"] and run.finetune_steps >= stored["finetune_steps"]
    if not grows or run.steps != stored["steps"] and step > stored["steps"]:
        raise ValueError(f"--steps {run.steps} --finetune-steps {run.finetune_steps}: a resumed "
                         f"run may only grow, its stage 1 only while it lasts (step {step})")
    return run, (path, ckpt)


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
    """x: an image folder's files (decoded per batch, in DataLoader workers), uint8 images
    (N, H, W, 3), float latents (N, C, H, W) or (N, V, C, H, W), V views of each image
    (tools/encode_latents.py's image and mirror) of which a step draws one; y: N labels. In memory,
    or a folder's x.npy and y.npy memory-mapped, opened per batch as nanoGPT opens its tokens: a
    rank's memory does not grow with N. data[idx] reads those rows, images centre-cropped."""
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
        x = [self.decode(path) for path in x[idx]] if x.dtype.kind == "U" else np.asarray(x[idx])
        y = torch.from_numpy(y[idx].astype(np.int64))
        if isinstance(x, list) or x.dtype == np.uint8 and x.shape[1:3] != (self.size, self.size):
            x = np.stack([center_crop_arr(img, self.size) for img in x])
        if x.dtype == np.uint8:                                      # (B, H, W, 3) -> (B, 3, H, W)
            return torch.from_numpy(x).permute(0, 3, 1, 2), y
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        if len(bad):
            raise ValueError(f"--data {self.source}: x[{np.asarray(idx)[bad[0]]}] holds NaN or "
                             f"infinite values; remove it")
        return torch.from_numpy(x), y

    def decode(self, path):
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:   # PIL's ways of saying "not an image"
            raise ValueError(f"--data: cannot decode {path} ({e})") from None


def image_folder(root, size):
    """root/<class>/<image> (ImageNet layout), the classes in sorted order -> (Arrays, classes)."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    files = [(os.path.join(root, c, name), k) for k, c in enumerate(classes)
             for name in sorted(os.listdir(os.path.join(root, c)))
             if name.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp"))]
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
    latents = x.dtype.kind == "f" and x.ndim in (4, 5) and x.shape[-1] == x.shape[-2]
    if not (pixels or latents) or y.shape != x.shape[:1] or not len(y) or y.dtype.kind not in "iu" \
            or y.min() < 0:
        raise ValueError(f"--data {args.data}: x must hold N uint8 images (N, H, W, 3) or float "
                         f"latents (N, [views,] C, H, H), y their N labels >= 0; got x {x.shape} "
                         f"{x.dtype}, y {y.shape} {y.dtype}")
    if latents and args.image_size not in (None, x.shape[-1]):
        raise ValueError(f"--image-size {args.image_size}: {args.data} holds {x.shape[-1]}x"
                         f"{x.shape[-1]} latents, which are not resized; leave --image-size out")
    data.size = args.image_size or min(x.shape[1:3])
    if latents and data.x is not None:               # in memory: every latent checked now
        data[np.arange(len(y))]
    return data, int(y.max()) + 1


def split(n):
    """The rows to train on and a fixed held-out subset (min(256, n/10), the same for every run),
    a row an image with all its views: no held-out image is trained on mirrored."""
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


#################################################################################
#                      The model, its EMA and the optimizer                     #
#################################################################################

def build_model(args, channels, side, num_classes, device, resumed=None):
    """(model, EMA, AdamW): a resumed run's, or the flags' model with --init's weights (and its
    diffusion, positions, q/k norm: a released DiT's), a SparseDiT converted from a DiT's."""
    try:
        init_cfg, weights = None, None
        if args.init and not resumed:
            init_cfg, weights = checkpoint_weights(read_checkpoint(args.init), args.init,
                                                   input_size=side)
        paper = {k: getattr(init_cfg, k) for k in ("diffusion", "positions", "qk_norm") if init_cfg}
        extra = {k: getattr(args, k) for k in ("layout", "density") if getattr(args, k)}
        cfg = ModelConfig(**resumed["config"]) if resumed else ModelConfig(
            args.model, args.size, args.patch_size, side, channels, num_classes,
            args.hidden_size or 0, args.num_heads or 0, tuple(args.depths or ()), extra=extra,
            **paper)
        raw = MODELS[cfg.model](cfg)
        if init_cfg and init_cfg.model != cfg.model:
            if not (init_cfg.model == "dit" and isinstance(raw, SparseDiT)):
                raise ValueError(f"{args.init} holds a {init_cfg.model} model: train it as "
                                 f"--model {init_cfg.model} (a dit also as --model sparsedit)")
            weights = raw.from_dit(weights)
        if weights:
            load_weights(raw, weights, args.init)
    except ValueError as e:
        raise ValueError(f"--init {e}" if args.init and not resumed else str(e)) from None
    ema = copy.deepcopy(raw.to(device)).requires_grad_(False)
    opt = make_optimizer(raw, args.lr, device)
    for module, key in ((raw, "model"), (ema, "ema"), (opt, "opt")) if resumed else ():
        module.load_state_dict(resumed[key])
    return raw, ema, opt


def make_optimizer(model, lr, device):
    """AdamW with weight decay 0 (SiT, DiT); the fused kernel on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0, fused=device.type == "cuda")


#################################################################################
#     The losses (flow matching; the DiT paper's DDPM) and the training step    #
#################################################################################

LABEL_DROP = 0.1               # labels -> the null label, for classifier-free guidance


def ddpm_loss(model, x, y, t, eps, ddpm, **sparse):
    """DiT's training_losses per sample at timesteps t -> (mse, vb): mse of the predicted noise; vb
    the variational bound's term for the learned variance, the mean frozen: KL(q(x_{t-1} | x_t, x)
    || p(x_{t-1} | x_t)) in bits per dimension, at t = 0 the discretised decoder's NLL."""
    x_t = ddpm.at("sqrt_alpha_bar", t) * x + ddpm.at("sqrt_one_minus_alpha_bar", t) * eps
    eps_pred, v = model(x_t, t, y, **sparse).float().chunk(2, dim=1)
    mean, log_var, _ = ddpm.p_mean_variance(torch.cat([eps_pred.detach(), v], 1), x_t, t)
    true_log_var = ddpm.at("min_log", t)
    kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                + (ddpm.posterior_mean(x, x_t, t) - mean) ** 2 * torch.exp(-log_var))

    def cdf(v):                                  # the tanh approximation of the normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))
    inv_std = torch.exp(-0.5 * log_var)
    upper = cdf(inv_std * (x - mean + 1 / 255))
    lower = cdf(inv_std * (x - mean - 1 / 255))
    # the probability of x's bin; the outermost bins reach to infinity
    p = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1 - lower, upper - lower))
    nll = -torch.log(p.clamp(min=1e-12))
    vb = torch.where(t == 0, nll.mean((1, 2, 3)), kl.mean((1, 2, 3))) / math.log(2.0)
    return (eps - eps_pred).pow(2).mean((1, 2, 3)), vb


def loss_at(model, x, draws, ddpm):
    """The training loss of each sample (B,) at the drawn times, labels, noise and drops: flow
    matching's, the MSE of the velocity v = eps - x on the path x_t = (1 - t) x + t eps (SiT); or,
    given ddpm, DiT's mse + vb."""
    t, y, eps, sparse = draws
    with autocast(x.device):
        if ddpm:
            return sum(ddpm_loss(model, x, y, t, eps, ddpm, **sparse))
        tt = t.view(-1, 1, 1, 1)
        v = model((1 - tt) * x + tt * eps, t, y, **sparse)
    return (v.float() - (eps - x)).pow(2).mean((1, 2, 3))


Stage = namedtuple("Stage", "drop mask_type path_drop lr ema_decay")


def stage_at(args, step, sparse_path):
    """This step's stage (SPRINT Sec. 3.3): stage 1 at --drop; stage 2 at 0% drop, with its own
    lr, EMA and the official warm-up (LinearLR from 1%, EMA decay at most 0.999). Path drop in both;
    neither drop without a sparse path."""
    two = step >= args.steps
    begin, lr, warmup, decay = ((args.steps, args.ft_lr, args.ft_warmup, args.ft_ema_decay) if two
                                else (0, args.lr, 0, args.ema_decay))
    progress = min(1.0, (step - begin) / warmup) if warmup else 1.0
    return Stage(0.0 if two else args.drop * sparse_path, args.mask_type,
                 args.path_drop * sparse_path, lr * (0.01 + 0.99 * progress),
                 min(decay, 0.999) if progress < 1 else decay)


def sparse_path_inputs(G, rows, grid, stage, device):
    """SPRINT's random inputs of a forward, drawn for a global batch of G, this rank's rows:
    ids_keep (B, M), the tokens the middle blocks keep; path_drop (B,), samples that skip them."""
    inputs = {}
    if stage.drop:
        inputs["ids_keep"] = sample_ids_keep(G, grid, stage.drop, stage.mask_type, device)[rows]
    if stage.path_drop:
        inputs["path_drop"] = (torch.rand(G, device=device) < stage.path_drop)[rows]
    return inputs


# a training step's random inputs, this rank's rows: t (B,), labels (B,), noise eps like x, and
# SPRINT's {ids_keep, path_drop}
Draws = namedtuple("Draws", "t y eps sparse")


def draw(y, shape, G, rows, stage, cfg):
    """Draws for the labels y (B,) of this rank's rows of a global batch of G, drawn for the whole
    batch (any number of processes draws what one does): t logit-normal for flow matching (t =
    sigmoid(n), n ~ N(0, 1)) or a uniform timestep 0..999 for DDPM; 10% of the labels the null
    label; SPRINT's token and path drop, apart from the label drop; eps (B, *shape) ~ N(0, I)."""
    device = y.device
    if cfg.diffusion == "ddpm":
        t = torch.randint(DDPM_STEPS, (G,), device=device)
    else:
        t = torch.sigmoid(torch.randn(G, device=device))
    null = torch.rand(G, device=device) < LABEL_DROP
    sparse = sparse_path_inputs(G, rows, cfg.grid, stage, device)
    eps = torch.randn(G, *shape, device=device)
    return Draws(t[rows], torch.where(null[rows], cfg.num_classes, y), eps[rows], sparse)


def update_ema(ema, model, decay):
    """EMA <- decay * EMA + (1 - decay) * model, fused over all parameters (torch's EMA update)."""
    ema_update = get_ema_multi_avg_fn(decay)
    ema_update(list(ema.parameters()), list(model.parameters()), None)


def train_step(model, raw, ema, opt, x, draws, ema_decay, ddpm):
    """One AdamW step on this rank's batch x with its draws -> (loss, grad norm) on the device: no
    host sync. model: raw as it runs (compiled, DDP)."""
    loss = loss_at(model, x, draws, ddpm).mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_ema(ema, raw, ema_decay)
    return loss.detach(), grad_norm


#################################################################################
#        Measuring a run: held-out loss, the log, run folders, checkpoints      #
#################################################################################

@torch.no_grad()
def held_out_loss(model, x, y, stage, ddpm, batch=64, levels=8):
    """The training loss on the held-out set at noise levels (i + 0.5)/levels and the stage's token
    drop (no path drop), with the same noise and drop pattern at every evaluation."""
    torch.manual_seed(0)                    # the next training step draws from its own seed
    total = 0.0
    for level in (torch.arange(levels, device=x.device) + 0.5) / levels:
        for xb, yb in zip(x.split(batch), y.split(batch)):
            t = (level * DDPM_STEPS).long() if ddpm else level
            sparse = sparse_path_inputs(len(xb), slice(None), model.cfg.grid, stage, x.device)
            draws = Draws(t.expand(len(xb)), yb, torch.randn_like(xb), sparse)
            total += loss_at(model, xb, draws, ddpm).sum()
    return total.item() / (levels * len(x))


def log(run_dir, text=None, **record):
    """Rank 0's log: text to the console and log.txt, a record to log.jsonl; a write a line."""
    for name, line in (("log.txt", text), ("log.jsonl", record and json.dumps(record))):
        if run_dir and line:
            with open(os.path.join(run_dir, name), "a") as f:
                f.write(line + "\n")
    if run_dir and text:
        tqdm.write(text)                                        # above the progress bar


def run_folder(args):
    """results/NNN-model-size-patch, never another run's, with checkpoints/, samples/ (EMA grids),
    log.txt (for people) and log.jsonl (for programs)."""
    runs = len(os.listdir(args.results_dir)) if os.path.isdir(args.results_dir) else 0
    path = f"{args.results_dir}/{runs:03d}-{args.model}-{args.size}-{args.patch_size}"
    os.makedirs(os.path.join(path, "checkpoints"))              # never an existing run's
    os.makedirs(os.path.join(path, "samples"))
    return path


def save_checkpoint(run_dir, step, raw, ema, opt, args, train_s):
    """checkpoints/<step>.pt, written atomically: a kill at any moment leaves every file whole."""
    path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
    torch.save(dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                    config=asdict(raw.cfg), args=vars(args), step=step, train_s=train_s),
               path + ".tmp")
    os.replace(path + ".tmp", path)
    log(run_dir, step=step, train_s=train_s, checkpoint=path)
    return path


#################################################################################
#                                 The training loop                             #
#################################################################################

def main(argv=None):
    """Train as the flags say -> the run folder (rank 0; None on the other ranks)."""
    args, (last_ckpt, ckpt) = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world, device = setup_distributed()
    G, total = args.global_batch_size, args.steps + args.finetune_steps
    if total < 1:
        raise ValueError(f"--steps {args.steps} --finetune-steps 0: nothing to train")
    if G % world:
        raise ValueError(f"--global-batch-size {G} does not split over {world} processes")
    L = G // world
    rows = slice(rank * L, (rank + 1) * L)                 # this rank's rows of a global batch

    # Data: a fixed held-out subset for evaluation, the rest to train on, from the step on
    dataset, num_classes = load_data(args)
    train_idx, eval_idx = split(len(dataset))
    if len(train_idx) < G:
        raise ValueError(f"--global-batch-size {G}: the data holds {len(train_idx)} to train on")
    first = dataset[[0]][0]                                 # (1, [V,] C, H, W)
    pixels = first.dtype == torch.uint8
    start, train_s = (ckpt["step"], ckpt["train_s"]) if ckpt else (0, 0.0)
    order = epoch_batches(train_idx, G, rank, world, args.seed, start)
    decodes = dataset.x is not None and dataset.x.dtype.kind == "U"     # an image folder's files
    workers = 8 * decodes if args.num_workers is None else args.num_workers
    loader = iter(DataLoader(dataset, sampler=order, batch_size=None, num_workers=workers,
                             pin_memory=device.type == "cuda", generator=torch.Generator()))

    def to_device(x, y):
        """A batch on the device: uint8 pixels -> [-1, 1], latents times --latent-scale."""
        x = x.to(device, non_blocking=True).float()
        x = x / 127.5 - 1 if pixels else x * (args.latent_scale or 1.0)
        return x, y.to(device, non_blocking=True)

    # Model: the same initial weights on every rank, then --init's or a resumed run's state
    torch.manual_seed(args.seed)
    raw, ema, opt = build_model(args, first.shape[-3], first.shape[-1], num_classes, device, ckpt)
    ddpm = DDPM(device=device) if raw.cfg.diffusion == "ddpm" else None
    held_out = stage_at(args, 0, raw.has_sparse_path)._replace(path_drop=0.0)   # stage 1's drop
    sparse_path_inputs(1, slice(None), raw.cfg.grid, held_out, device)   # a bad --drop fails here
    model = torch.compile(raw) if args.compile else raw
    if world > 1:              # buffers (RoPE grid, mask token, table) are equal by construction
        model = DDP(model, device_ids=[device] if device.type == "cuda" else None,
                    broadcast_buffers=False)
    evaluate = rank == 0 and args.eval_every and len(eval_idx)
    if evaluate:
        eval_x, eval_y = to_device(*dataset[eval_idx])
        eval_x = eval_x[:, 0] if eval_x.ndim == 5 else eval_x   # each held-out image as it is
    # the EMA sample grid: 4 rows of up to 10 classes, the same noise every time
    classes = np.linspace(0, num_classes - 1, min(num_classes, 10)).round().astype(int).tolist()
    grid_z, grid_y, _ = sample_inputs(range(4 * len(classes)), args.seed, classes, num_classes,
                                      first.shape[-3:], device)
    run_dir = None
    if rank == 0:
        run_dir = os.path.dirname(os.path.dirname(last_ckpt)) if ckpt else run_folder(args)
    log(run_dir, f"{args.model}-{args.size}/{args.patch_size}: {raw.num_params() / 1e6:.2f}M "
        f"parameters, {raw.training_flops(held_out.drop) / 1e9:.3g} GFLOPs/image as trained; "
        f"{len(train_idx)} + {len(eval_idx)} held out; {world} process(es) x {L}; {run_dir}")

    pending = []                                # each step's (loss, grad norm) on the device
    pbar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for step in range(start, total + 1):
            # After every log interval, stage end, evaluation, grid or checkpoint: one read of the
            # device, the log, and what is due (a resumed run did its start's already)
            stage_end = step in (0, args.steps, total)
            due = {k: every and step % every == 0 for k, every in (("eval", args.eval_every),
                   ("sample", args.sample_every), ("ckpt", args.ckpt_every))}
            n = len(pending)
            read = step > start and (n == args.log_every or stage_end or any(due.values()))
            if read:
                vals = torch.stack(pending)
                pending = []
                if world > 1:
                    dist.all_reduce(vals)
                vals = vals.cpu() / world
                seconds = time.perf_counter() - t0
                train_s += seconds                          # training only: evaluations come after
                if not vals.isfinite().all():
                    i = int((~vals.isfinite().all(1)).nonzero()[0, 0])
                    raise FloatingPointError(f"step {step - n + i + 1}: non-finite loss; stopped, "
                                             f"the last checkpoint is {last_ckpt or 'none'}")
                flops = 3 * raw.training_flops(stage.drop) * n * G / seconds / world   # a process
                figures = {"loss": vals[:, 0].mean().item(), "img/s": n * G / seconds,
                           "TFLOP/s": flops / 1e12}
                pbar.set_postfix({k: f"{v:.4g}" for k, v in figures.items()})
                log(run_dir, step=step, stage=1 + (step > args.steps), train_s=train_s,
                    lr=stage.lr, grad_norm=vals[:, 1].mean().item(), **figures)
            if evaluate and (step == 0 or step > start) and (stage_end or due["eval"]):
                # all tokens (what sampling sees) and the stage-1 drop: the gap stage 2 closes
                all_tokens = held_out._replace(drop=0.0)
                losses = {"eval_loss": held_out_loss(raw, eval_x, eval_y, all_tokens, ddpm)}
                if held_out.drop:
                    losses["eval_loss_drop"] = held_out_loss(raw, eval_x, eval_y, held_out, ddpm)
                text = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
                log(run_dir, f"step {step}: held-out {text}", step=step, train_s=train_s, **losses)
            if run_dir and step > start and args.sample_every and (step == total or due["sample"]):
                with autocast(device):
                    imgs = sample(ema, grid_z, grid_y, "ddpm" if ddpm else "euler", 25,
                                  cfg_scale=4.0)
                if not pixels:                      # latents: channels 0-2, scaled, without a VAE
                    imgs = (imgs[:, :3] / (2 * imgs.std())).clamp(-1, 1)
                save_grid(imgs, f"{run_dir}/samples/{step:07d}.png", nrow=len(classes))
            if run_dir and step > start and (stage_end or due["ckpt"]):
                last_ckpt = save_checkpoint(run_dir, step, raw, ema, opt, args, train_s)
            if read or step == start:
                t0 = time.perf_counter()
            if step == total:
                break

            stage = stage_at(args, step, raw.has_sparse_path)    # the next read logs its lr, FLOPs
            if step == args.steps and step > 0:
                # stage 2 starts from the stage-1 EMA weights with a fresh optimizer, as --init
                raw.load_state_dict(ema.state_dict())
                opt = make_optimizer(raw, stage.lr, device)
            for group in opt.param_groups:
                group["lr"] = stage.lr
            # every random draw of this step, on every rank, from (seed, step)
            torch.manual_seed(int(np.random.SeedSequence([args.seed, step]).generate_state(1)[0]))
            x, y = to_device(*next(loader))
            flip = (torch.rand(G, device=device) < 0.5)[rows]     # SiT's flips (or their latents)
            if x.ndim == 5:                                       # (B, V, C, H, W): view 0 or 1
                x = x[torch.arange(L, device=device), flip.long() % x.shape[1]]
            elif pixels:
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            draws = draw(y, x.shape[1:], G, rows, stage, raw.cfg)
            loss, grad_norm = train_step(model, raw, ema, opt, x, draws, stage.ema_decay, ddpm)
            pending.append(torch.stack([loss, grad_norm]))
            pbar.update()
    finally:                     # also on an error: its message then starts on a line of its own
        pbar.close()
        if hasattr(loader, "_shutdown_workers"):  # workers end with the run, not seconds later
            loader._shutdown_workers()
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
