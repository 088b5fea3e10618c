"""
Train DiT, SPRINT or SparseDiT with flow matching: one plain DDP loop for both stages of SPRINT.

    python train.py --model sprint --drop 0.75          # one process, CPU or GPU; without --data: the embedded
                                                        # toy data and a small model, the whole loop in minutes
    torchrun --nproc_per_node=8 train.py --model sprint --drop 0.75 --data /path/to/imagenet/train
    torchrun --nnodes=4 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$HEAD --master_port=29500 \\
        train.py --model sprint --drop 0.75 --data latents.npz --latent-scale 0.18215     # the same on each node
    python train.py --benchmark --model sprint --size XL --drop 0.75 --compile           # ms/step, TFLOP/s, MFU

Stage 1 is masked pre-training at --drop; stage 2 (--finetune-steps) trains on all tokens from the stage-1 EMA
weights with a fresh optimizer and its own lr, warm-up and EMA (SPRINT Sec. 3.3), as the official code: lr from 1%
up over the warm-up's optimizer steps (LinearLR), EMA decay 0.999 meanwhile. `--init ckpt.pt --drop 0` runs stage 2
on its own; `--resume RUN` continues a run exactly: checkpoints hold the model, EMA, optimizer, every rank's RNG
state, the data position and the whole config, which fills the flags left out. Path drop stays on in both stages.

Data: an image folder in ImageNet layout (pixels, center-cropped as ADM/DiT, 64 px unless --image-size), an .npz
with x and y (uint8 images N x H x W x C, or float latents N x C x H x W such as SD-VAE latents with --latent-scale
0.18215: the paper's setting), or nothing: ten classes of coloured shapes drawn in code, with a small model.
"""
import argparse
import copy
import glob
import hashlib
import json
import os
import time
import zipfile
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from models import (autocast, create_model, init_from, load_weights, matmul_peak, read_checkpoint, setup_distributed,
                    time_ms)
from sample import agree, at_least, sample, save_grid
from sprint import SIZES, ModelConfig

# Defaults of the flags left out (None until then, so --resume tells them apart). Real data: the paper's SiT-B/2
# recipe. The embedded toy data: a small model and schedule, so that a plain `python train.py` shows every part of
# the loop on a laptop CPU in a few minutes.
PAPER = dict(model="sprint", size="B", patch_size=2, mask_type="structured", global_batch_size=256, lr=1e-4,
             warmup=0, ema_decay=0.9999, steps=400_000, finetune_steps=0, ft_lr=2e-4, ft_warmup=5000,
             ft_ema_decay=0.9999, seed=0, log_every=50, ckpt_every=50_000, sample_every=10_000, eval_every=5_000)
TOY = dict(size="S", image_size=16, hidden_size=96, num_heads=4, depths=[1, 2, 1], lr=1e-3, ema_decay=0.995,
           ft_ema_decay=0.995, global_batch_size=32, steps=2000, ft_lr=1e-3, ft_warmup=100, log_every=25, ckpt_every=500,
           sample_every=250, eval_every=250)
SPARSE = dict(drop=0.75, path_drop=0.1)     # SPRINT's defaults; a model without a sparse path trains at 0 and 0
LABEL_DROP = 0.1                            # labels -> the null label, for classifier-free guidance
GRID = dict(sampler="euler", steps=25, cfg_scale=4.0)    # the EMA sample grids
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# what a resumed run may change: its length (--steps while in stage 1), its lr, logging and speed
RESUME_MAY_CHANGE = {"steps", "finetune_steps", "lr", "ft_lr", "log_every", "ckpt_every", "eval_every",
                     "sample_every", "num_workers", "compile", "results_dir"}


#################################################################################
#                                     Data                                      #
#################################################################################

def embedded_dataset(size=16, n=4000, seed=0):
    """Ten classes of coloured shapes drawn in numpy (no download): uint8 (n, size, size, 3), labels (n,). A class
    is a shape and a hue; position, radius, hue and background vary, so a model must learn what a class looks like."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    r, cy, cx = rng.uniform(0.2, 0.32, (n, 1, 1)), *rng.uniform(0.35, 0.65, (2, n, 1, 1))
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size                       # pixel centres in (0, 1)
    dy, dx = yy - cy, xx - cx
    d, box, thin = np.hypot(dy, dx), np.maximum(abs(dx), abs(dy)), 0.3 * r
    shapes = [d < r, box < r, abs(dx) + abs(dy) < r, abs(d - r) < thin,                 # disc, square, diamond, ring
              (np.minimum(abs(dx), abs(dy)) < thin) & (box < r),                        # plus
              (abs(abs(dx) - abs(dy)) < thin) & (box < r),                              # cross
              (dy < 0.8 * r) & (abs(dx) < 0.6 * (dy + r)),                              # triangle
              np.sin(yy * 40 + cy * 9) > 0, np.sin(xx * 40 + cx * 9) > 0,             # horizontal, vertical stripes
              (np.sin(xx * 30 + cx * 9) > 0) ^ (np.sin(yy * 30 + cy * 9) > 0)]         # checkerboard
    mask = np.stack(shapes)[y, np.arange(n)][..., None]                  # (n, size, size, 1)
    hue = y[:, None] / 10 + rng.uniform(-0.03, 0.03, (n, 1)) + np.array([0, 1 / 3, 2 / 3])
    fg = 0.5 + 0.5 * np.cos(2 * np.pi * hue)                             # a point on the colour wheel, (n, 3)
    bg = rng.uniform(0.0, 0.35, (n, 1)) * np.ones(3)
    return (255 * np.where(mask, fg[:, None, None], bg[:, None, None])).round().astype(np.uint8), y


def center_crop_arr(img, size):
    """ADM's preprocessing (DiT's too): halve with a box filter while large, resize bicubic, crop the centre."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    arr = np.asarray(img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


class ImageFolder:
    """ImageNet layout, root/<class>/<image>; data[indices] decodes one batch (in a DataLoader worker)."""
    def __init__(self, root, size, upscale=True):
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.files = [(os.path.join(root, c, f), k) for k, c in enumerate(classes)
                      for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTS)]
        if not self.files:
            raise ValueError(f"--data {root}: no images found (looked for {'/'.join(IMAGE_EXTS)} in one sub-folder "
                             f"per class)")
        for path, _ in tqdm(self.files, f"checking {root}", disable=len(self.files) < 10_000, leave=False):
            self.load(path, verify=True)                 # a broken file fails here, named, not later in a worker
        self.size, self.upscale, self.num_classes = size, upscale, len(classes)

    def __len__(self):
        return len(self.files)

    def load(self, path, verify=False):
        """The image's pixels; verify=True: only a check of what PIL reads without decoding (cheap)."""
        try:
            with Image.open(path) as img:
                img = img.verify() if verify else img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:                  # PIL's ways of saying "not an image"
            raise ValueError(f"--data: cannot decode {path} ({e})") from None
        if verify:
            return None
        if not self.upscale and min(img.size) < self.size:
            raise ValueError(f"--data: {path} is {img.width}x{img.height}, smaller than --image-size {self.size} "
                             f"(without --no-upscale it would be upscaled)")
        return center_crop_arr(img, self.size)

    def __getitem__(self, idx):
        x = np.stack([self.load(self.files[i][0]) for i in idx])
        return torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([self.files[i][1] for i in idx])


def load_data(args):
    """(dataset, number of classes) for --data, an image folder or an .npz (checked), or the embedded toy data."""
    if args.data is None:
        x, y = embedded_dataset(args.image_size)
    elif not os.path.exists(args.data):
        raise ValueError(f"--data {args.data}: no such file or folder")
    elif os.path.isdir(args.data):
        folder = ImageFolder(args.data, args.image_size or 64, upscale=not args.no_upscale)
        return folder, folder.num_classes
    elif not zipfile.is_zipfile(args.data):                             # an .npz is a zip of .npy files
        raise ValueError(f"--data {args.data}: neither an image folder nor an .npz file (with arrays x and y)")
    else:
        try:
            with np.load(args.data) as f:
                if not {"x", "y"} <= set(f.files):
                    raise ValueError(f"--data {args.data}: needs arrays 'x' and 'y' (found: {', '.join(f.files)})")
                x, y = f["x"], f["y"]
        except (OSError, EOFError) as e:
            raise ValueError(f"--data {args.data}: neither an image folder nor a readable .npz ({e})") from None
        if not (len(x) == len(y) > 0 and x.ndim in (3, 4) and np.issubdtype(y.dtype, np.integer)) or y.min() < 0:
            raise ValueError(f"--data {args.data}: x must hold N > 0 images, y their N labels (integers >= 0); got "
                             f"x {x.shape} {x.dtype}, y {y.shape} {y.dtype}")
        side = x.shape[1] if x.dtype == np.uint8 else x.shape[2]
        if args.image_size and args.image_size != side and x.dtype != np.uint8:
            raise ValueError(f"--image-size {args.image_size}: {args.data} holds {side}x{side} latents, which cannot "
                             f"be resized; leave --image-size out")
        if args.image_size and args.image_size != side:                 # pixels: ADM's antialiased resize and crop
            x = np.stack([center_crop_arr(Image.fromarray(img), args.image_size) for img in x])
    x = torch.from_numpy(x[..., None] if x.ndim == 3 else x)    # uint8 pixels (N, H, W[, C]) or latents (N, C, H, W)
    x = x.permute(0, 3, 1, 2) if x.dtype == torch.uint8 else x          # (N, C, H, W); data[indices] is a batch
    return TensorDataset(x, torch.from_numpy(y).long()), int(y.max()) + 1


def split(n):
    """A fixed held-out subset (min(256, n/10) items, the same for every run and seed) and the training rest."""
    perm = np.random.default_rng(0).permutation(n)
    k = min(256, n // 10)
    return perm[k:], np.sort(perm[:k])


def epoch_batches(indices, global_batch, rank, world, seed, epoch=0, batch=0):
    """This rank's slice of each global batch, endlessly, from (epoch, batch) on. An epoch is a permutation
    seeded by (seed, epoch), the same on every rank, so the ranks together see every item once per epoch."""
    G, L = global_batch, global_batch // world
    while True:
        perm = indices[np.random.default_rng((seed, epoch)).permutation(len(indices))]
        for b in range(batch, len(indices) // G):
            yield perm[b * G + rank * L: b * G + (rank + 1) * L]
        epoch, batch = epoch + 1, 0


#################################################################################
#              Flow matching, the training step, evaluation, speed              #
#################################################################################

def velocity_loss(model, x, y, t, eps, **kwargs):
    """Linear path x_t = (1 - t) x + t eps; MSE between the predicted and the true velocity v = eps - x."""
    tt = t.view(-1, 1, 1, 1)
    v = model((1 - tt) * x + tt * eps, t, y, **kwargs)
    return (v.float() - (eps - x)).pow(2).mean()


def train_step(model, raw, ema, opt, x, y, drop, precision, ema_decay):
    """One AdamW step -> (loss, grad norm) as device tensors: nothing in here waits for the GPU."""
    B = x.shape[0]
    t = torch.sigmoid(torch.randn(B, device=x.device))                  # logit-normal t = s/(1+s), s = e^n
    y = torch.where(torch.rand(B, device=x.device) < LABEL_DROP, raw.cfg.num_classes, y)
    kwargs = raw.training_kwargs(B, **drop, device=x.device)            # SPRINT: ids_keep and path_drop
    with autocast(x.device, precision):
        loss = velocity_loss(model, x, y, t, torch.randn_like(x), **kwargs)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_ema(ema, raw, ema_decay)
    return loss.detach(), grad_norm


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, one fused kernel for all parameters."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def lr_at(lr, s, warmup):
    """lr at step s of a stage: the official LinearLR warm-up (start_factor 0.01) over `warmup` steps, then lr."""
    return lr * (0.01 + 0.99 * min(1.0, s / warmup)) if warmup else lr


def ema_decay_at(target, s, warmup):
    """EMA decay at step s of a stage: at most 0.999 during the lr warm-up, as the official fine-tuning does, then
    the target (0.9999; the embedded toy data's short run uses 0.995)."""
    return min(target, 0.999) if s < warmup else target


@torch.no_grad()
def held_out_loss(model, x, y, precision, drop=0.0, mask_type="structured", batch=64, grid=8):
    """Velocity loss on the held-out set, averaged over t = (i + 0.5)/grid with fixed noise and a fixed drop
    pattern: every evaluation sees the same inputs, and the training RNG is left alone (resume stays exact)."""
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(0)
        total = 0.0
        for t in (torch.arange(grid, device=x.device) + 0.5) / grid:
            for xb, yb in zip(x.split(batch), y.split(batch)):
                kwargs = model.training_kwargs(len(xb), drop=drop, mask_type=mask_type, path_drop=0.0, device=x.device)
                with autocast(x.device, precision):
                    total += len(xb) * velocity_loss(model, xb, yb, t.expand(len(xb)), torch.randn_like(xb), **kwargs)
    return total.item() / (grid * len(x))


def benchmark(args, device):
    """Timed training steps on synthetic latents already on the device (SD-VAE shape, 1000 classes): one row."""
    raw, ema, opt, drop = build_model(args, device, 4, 1000, (args.image_size or 256) // 8)
    B, S = args.global_batch_size, raw.cfg.input_size
    x, y = torch.randn(B, 4, S, S, device=device), torch.randint(0, 1000, (B,), device=device)
    model = torch.compile(raw) if args.compile else raw
    ms = time_ms(lambda: train_step(model, raw, ema, opt, x, y, drop, args.precision, 0.9999), device,
                 reps=args.benchmark_steps, warmup=3)                   # median; compilation in the warm-up
    tflops, peak = 3 * raw.flops(drop=args.drop) * B / ms / 1e9, matmul_peak(device) / 1e12   # step = 3 forwards
    memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
    print(f"| model | drop | batch | compile | ms/step | img/s | TFLOP/s | MFU (measured "
          f"{'bf16' if device.type == 'cuda' else 'fp32'} matmul peak) | peak memory |\n"
          f"| {args.model}-{args.size}/{args.patch_size} | {args.drop} | {B} | {args.compile} | {ms:.1f} | "
          f"{B / ms * 1e3:.1f} | {tflops:.3g} | {tflops / peak:.1%} of {peak:.3g} TFLOP/s | {memory} |")


#################################################################################
#                       Model, optimizer, checkpoints, logs                     #
#################################################################################

def build_model(args, device, in_channels, num_classes, input_size, init=None):
    """(model, its EMA, AdamW, training_kwargs' arguments) for these flags and data, from --init's weights if given."""
    extra = {k: getattr(args, k) for k in ("layout", "density") if getattr(args, k) is not None}   # SparseDiT's
    cfg = ModelConfig(args.model, args.size, args.patch_size, input_size, in_channels, num_classes,
                      args.hidden_size or 0, args.num_heads or 0, tuple(args.depths or ()), extra=extra)
    raw = create_model(cfg).to(device)
    for key, value in (SPARSE if raw.has_sparse_path else dict(drop=0.0, path_drop=0.0)).items():   # flags left out
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    drop = dict(drop=args.drop, mask_type=args.mask_type, path_drop=args.path_drop)
    raw.training_kwargs(2, **drop, device=device)      # raises a ValueError naming the flag (--drop 0.3: no pattern)
    if init:
        init_from(raw, init, ema=True)
    return raw, copy.deepcopy(raw).requires_grad_(False), make_optimizer(raw, args.lr, device), drop


def make_optimizer(model, lr, device):
    """AdamW with weight decay 0 (SiT); the fused kernel on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0, fused=device.type == "cuda")


def run_folder(args, resumed=None):
    """A resumed checkpoint's run folder, else results/NNN-model-size-patch: never an existing one, even in a race."""
    if resumed and os.path.basename(os.path.dirname(resumed)) == "checkpoints":
        return os.path.dirname(os.path.dirname(resumed))
    os.makedirs(args.results_dir, exist_ok=True)
    while True:
        taken = [int(d.split("-")[0]) for d in os.listdir(args.results_dir) if d.split("-")[0].isdigit()]
        name = f"{max(taken, default=-1) + 1:03d}-{args.model}-{args.size}-{args.patch_size}"
        path = os.path.join(args.results_dir, name)
        try:
            os.makedirs(os.path.join(path, "checkpoints"))              # fails if another run took the number
        except FileExistsError:
            continue
        os.makedirs(os.path.join(path, "samples"))
        return path


def read_run(args):
    """--resume's checkpoint (a run folder: its newest) -> (path, checkpoint). The run's flags fill those left out;
    a flag given with another value is refused, unless RESUME_MAY_CHANGE holds it."""
    found = sorted(glob.glob(os.path.join(args.resume, "checkpoints", "*.pt"))) if os.path.isdir(args.resume) \
        else [args.resume]
    if not found or not os.path.isfile(found[-1]):
        raise ValueError(f"--resume {args.resume}: no such checkpoint, nor a run folder with checkpoints")
    try:
        ckpt = read_checkpoint(found[-1])
    except ValueError as e:
        raise ValueError(f"--resume {e}") from None
    run, step = ckpt.get("args", {}), ckpt.get("step", 0)
    agree(args, {k: v for k, v in run.items() if k not in ("resume", "init", "benchmark")}, f"--resume {found[-1]}",
          "the run's", free=RESUME_MAY_CHANGE)
    if args.steps != run.get("steps", args.steps) and step > min(args.steps, run["steps"]):
        raise ValueError(f"--steps {args.steps}: stage 1 ({run['steps']} steps) can change its length only while the "
                         f"run is in it, and not below its checkpoint's step {step}")
    return found[-1], ckpt


def resume(path, ckpt, raw, ema, opt):
    """Load a read checkpoint's whole state -> (its path, step, data position, RNG states, training seconds so far)."""
    try:
        load_weights(raw, path, ema=False, ckpt=ckpt)
        load_weights(ema, path, ema=True, ckpt=ckpt)
    except ValueError as e:
        raise ValueError(f"--resume {e}") from None
    opt.load_state_dict(ckpt["opt"])
    return path, ckpt["step"], ckpt["data"], ckpt["rng"], ckpt.get("train_s", 0.0)


def check_args(args, world):
    """Flags out of range -> a ValueError naming the flag, before anything is read or written."""
    at_least(args, 1, "global_batch_size", "log_every", "benchmark_steps")
    at_least(args, 0, "steps", "finetune_steps", "warmup", "ft_warmup", "ckpt_every", "eval_every", "sample_every",
             "num_workers")
    if args.drop is not None and not 0 <= args.drop < 1:
        raise ValueError(f"--drop {args.drop}: must lie in [0, 1)")
    if args.path_drop is not None and not 0 <= args.path_drop <= 1:
        raise ValueError(f"--path-drop {args.path_drop}: must lie in [0, 1]")
    if args.global_batch_size % world:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} processes")


def weights_digest(*models):
    """A short hash of the per-tensor float64 sums of the weights: equal on all ranks if DDP works."""
    sums = torch.stack([p.detach().double().sum() for m in models for p in m.parameters()]).cpu()
    return hashlib.sha256(sums.numpy().tobytes()).hexdigest()[:16]


def log(run_dir, text=None, **record):
    """Rank 0 (the one with a run folder): text to the console and log.txt, a record to log.jsonl."""
    if run_dir is None:
        return
    if text:
        tqdm.write(text)                                                # above the progress bar
    for name, line in (("log.txt", text), ("log.jsonl", record and json.dumps(record))):
        if line:
            with open(os.path.join(run_dir, name), "a") as f:
                f.write(line + "\n")                                    # one write: a kill leaves whole lines


#################################################################################
#                                 Training loop                                 #
#################################################################################

def main(args):
    rank, world, device = setup_distributed()
    resumed = read_run(args) if args.resume else None                  # first: the run's flags fill those left out
    for key, value in {**PAPER, **(TOY if args.data is None and not args.benchmark else {})}.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    check_args(args, 1 if args.benchmark else world)
    cuda, G = device.type == "cuda", args.global_batch_size
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32 matmuls in TF32 on GPU
    if args.benchmark:
        return benchmark(args, device)

    # Data: a fixed held-out subset for evaluation, the rest for training
    data, num_classes = load_data(args)
    train_idx, eval_idx = split(len(data))
    if len(train_idx) < G:
        raise ValueError(f"--global-batch-size {G}: the data holds only {len(train_idx)} training items")
    first = data[[0]][0]                                                # (1, C, H, W): decodes one item early
    pixels, channels, side = first.dtype == torch.uint8, first.shape[1], first.shape[-1]

    def to_device(x, y):
        """A batch on the device: uint8 pixels -> [-1, 1], latents times --latent-scale (if given)."""
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return (x.float() / 127.5 - 1 if pixels else x.float() * (args.latent_scale or 1.0)), y

    # Model: the same initial weights on every rank, then --init weights or a whole --resume state
    torch.manual_seed(args.seed)
    raw, ema, opt, drop = build_model(args, device, channels, num_classes, side, init=args.init)
    last_ckpt, start, position, rngs, train_s = None, 0, {"epoch": 0, "batch": 0}, None, 0.0
    if resumed:
        last_ckpt, start, position, rngs, train_s = resume(*resumed, raw, ema, opt)
    model = torch.compile(raw) if args.compile else raw
    if world > 1:                      # buffers (RoPE grid, mask token) are equal by construction: no broadcasts
        model = DDP(model, device_ids=[device] if cuda else None, broadcast_buffers=False)

    # This rank's slice of every global batch from the saved position on; the loader never draws from global RNG
    per_epoch = len(train_idx) // G
    workers = args.num_workers if args.num_workers is not None else (8 if isinstance(data, ImageFolder) else 0)
    loader = iter(DataLoader(data, sampler=epoch_batches(train_idx, G, rank, world, args.seed, **position),
                             batch_size=None, num_workers=workers, pin_memory=cuda, generator=torch.Generator()))
    eval_x, eval_y = to_device(*data[eval_idx]) if rank == 0 and len(eval_idx) else (None, None)
    grid_y = torch.linspace(0, num_classes - 1, min(num_classes, 10)).round().long().repeat(4).to(device)
    grid_z = torch.randn(len(grid_y), channels, side, side, generator=torch.Generator().manual_seed(args.seed))
    grid_z = grid_z.to(device)
    run_dir = run_folder(args, last_ckpt) if rank == 0 else None       # rank 0 alone writes

    # Noise, t, drop patterns and flips differ across ranks; a resumed run continues every rank's own stream
    torch.manual_seed(args.seed * world + rank)
    if rngs is not None and len(rngs) != world:
        log(run_dir, f"warning: saved by {len(rngs)} processes, resumed on {world}: not the saved noise stream")
    elif rngs is not None:
        torch.set_rng_state(rngs[rank]["cpu"])
        if cuda and rngs[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rngs[rank]["cuda"], device)
    log(run_dir, f"{args.model}-{args.size}/{args.patch_size}: {raw.num_params() / 1e6:.2f}M parameters, "
        f"{raw.flops() / 1e9:.3g} GFLOPs/image, {raw.flops(drop=args.drop) / 1e9:.3g} at drop {args.drop}; "
        f"{args.data or 'embedded toy data'}: {len(train_idx)} + {len(eval_idx)} held out, {channels}x"
        f"{side}x{side}, {num_classes} classes; {world} process(es) x {G // world}; {run_dir}")

    def evaluate(step):
        """Held-out loss with all tokens (what sampling sees) and with the training drop: stage 2 closes the gap."""
        if rank == 0 and eval_x is not None:
            losses = {"eval_loss": held_out_loss(raw, eval_x, eval_y, args.precision)}
            if args.drop:
                losses["eval_loss_drop"] = held_out_loss(raw, eval_x, eval_y, args.precision, args.drop, args.mask_type)
            log(run_dir, f"step {step}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()),
                step=step, train_s=train_s, **losses)

    # Stage 1 at --drop, stage 2 at 0% drop: (first step, drop, lr, lr warm-up, EMA target)
    stages = [(0, drop, args.lr, args.warmup, args.ema_decay),
              (args.steps, dict(drop, drop=0.0), args.ft_lr, args.ft_warmup, args.ft_ema_decay)]
    total, peak = args.steps + args.finetune_steps, matmul_peak(device) if cuda else None
    buf, n = torch.zeros(args.log_every, 2, device=device), 0    # per-step (loss, grad norm), read at log time
    pbar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
    if start == 0 and args.eval_every:
        evaluate(0)
    t0 = time.perf_counter()
    for step in range(start, total):
        begin, stage_drop, lr, warmup, ema_target = stages[step >= args.steps]
        if step == args.steps > 0:     # stage 2 starts from the stage-1 EMA weights, fresh optimizer: as --init does
            raw.load_state_dict(ema.state_dict())
            opt = make_optimizer(raw, lr, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(lr, step - begin, warmup)
        x, y = to_device(*next(loader))
        if pixels:                                                       # random horizontal flips
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        buf[n] = torch.stack(train_step(model, raw, ema, opt, x, y, stage_drop, args.precision,
                                        ema_decay_at(ema_target, step - begin, warmup)))
        n, done = n + 1, step + 1
        pbar.update()
        ckpt_now = (args.ckpt_every and done % args.ckpt_every == 0) or done in (args.steps, total)
        eval_now = args.eval_every and (done % args.eval_every == 0 or done == total)
        sample_now = args.sample_every and (done % args.sample_every == 0 or done == total)
        if n < args.log_every and not (ckpt_now or eval_now or sample_now):
            continue

        # Once per log interval, and before anything is evaluated or saved: the loop's only wait for the device
        vals = buf[:n].clone()
        if world > 1:
            dist.all_reduce(vals)
        vals, n = vals.cpu() / world, 0
        if not vals.isfinite().all():
            i = (~vals.isfinite().all(1)).nonzero()[0, 0].item()             # the first bad step of the interval
            raise FloatingPointError(f"step {done - len(vals) + i + 1}: non-finite loss {vals[i, 0].item()} (grad norm "
                                     f"{vals[i, 1].item()}); stopped, the last checkpoint is {last_ckpt or 'none'}")
        seconds = time.perf_counter() - t0                              # training only: evaluation, grids and
        train_s += seconds                                               # checkpoints happen after t0 is read
        img_s = len(vals) * G / seconds
        figures = {"loss": vals[:, 0].mean().item(), "img/s": img_s,    # TFLOP/s per device: a step is 3 forwards
                   "TFLOP/s": 3 * raw.flops(drop=stage_drop["drop"]) * img_s / world / 1e12}
        if peak:
            figures["MFU"] = figures["TFLOP/s"] * 1e12 / peak
        pbar.set_postfix({k: f"{v:.4g}" for k, v in figures.items()})
        log(run_dir, step=done, stage=1 + (step >= args.steps), train_s=train_s, lr=opt.param_groups[0]["lr"],
            grad_norm=vals[:, 1].mean().item(), **figures)
        if eval_now:
            evaluate(done)
        if sample_now and rank == 0:                   # EMA samples from fixed noise and classes, a column per class
            with autocast(device, args.precision):
                imgs = sample(ema, grid_z, grid_y, **GRID)
            imgs = imgs if pixels else (imgs[:, :3] / (2 * imgs.std())).clamp(-1, 1)   # latents: channels 0-2, no VAE
            save_grid(imgs, f"{run_dir}/samples/{done:07d}.png", nrow=len(grid_y) // 4)
        if ckpt_now:                     # every rank's RNG state, and a check that DDP kept the ranks equal
            rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None}
            states = [(rng, weights_digest(raw, ema))] * world
            if world > 1:
                dist.all_gather_object(states, states[0])
            rngs, digests = map(list, zip(*states))
            last_ckpt = os.path.join(run_dir or "", "checkpoints", f"{done:07d}.pt")   # written by rank 0 only
            if rank == 0:
                if len(set(digests)) > 1:
                    raise RuntimeError(f"step {done}: the weights differ across ranks ({digests})")
                epoch, batch = divmod(position["epoch"] * per_epoch + position["batch"] + done - start, per_epoch)
                torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                            "config": asdict(raw.cfg), "args": vars(args), "step": done, "rng": rngs,
                            "data": {"epoch": epoch, "batch": batch}, "train_s": train_s}, last_ckpt + ".tmp")
                os.replace(last_ckpt + ".tmp", last_ckpt)    # atomic: a kill at any moment leaves every file whole
                log(run_dir, step=done, train_s=train_s, checkpoint=last_ckpt, rank_weights=digests)
        t0 = time.perf_counter()
    pbar.close()
    log(run_dir, f"done: {total} steps, checkpoints in {run_dir}/checkpoints")
    if world > 1:
        dist.destroy_process_group()
    return run_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--model", choices=["dit", "sprint", "sparsedit"], help="default sprint")
    p.add_argument("--size", choices=list(SIZES), help="default B (embedded data: S, narrowed); mini: "
                   "hidden 128, 2/8/2 blocks, for CPU experiments")
    p.add_argument("--patch-size", type=int, help="pixels (or latent cells) per token side (default 2)")
    p.add_argument("--image-size", type=int, help="pixels (folders: 64, embedded: 16); an .npz has its own")
    p.add_argument("--hidden-size", type=int, help="for small experiments: overrides the size")
    p.add_argument("--num-heads", type=int, help="for small experiments: overrides the size")
    p.add_argument("--depths", type=int, nargs=3, metavar=("E", "M", "D"),
                   help="for small experiments: encoder, middle, decoder blocks (dit: their sum)")
    p.add_argument("--layout", type=lambda s: [int(v) for v in s.split(",")], metavar="P,S,K,T",
                   help="sparsedit: Poolingformers, SDTMs, sparse blocks per SDTM, dense top blocks")
    p.add_argument("--density", type=int, nargs=2, metavar=("MIN", "MAX"), help="sparsedit: token density range")
    p.add_argument("--data", help="image folder (a sub-folder per class) or .npz with x, y; default: embedded toy data")
    p.add_argument("--latent-scale", type=float, help="multiplies float latents (raw SD-VAE: 0.18215); default: "
                   "already scaled (sample.py then assumes SD-VAE's 0.18215)")
    p.add_argument("--no-upscale", action="store_true", help="an image smaller than --image-size is an error")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default: 8 for folders, 0 for arrays)")
    p.add_argument("--drop", type=float, help="stage-1 token drop (default: 0.75 with a sparse path, else 0)")
    p.add_argument("--mask-type", choices=["structured", "random"], help="kept tokens: k per n x n group (default) "
                   "or anywhere")
    p.add_argument("--path-drop", type=float, help="share of samples, in [0, 1], that skip the sparse path "
                   "(default: 0.1 if it exists)")
    p.add_argument("--global-batch-size", type=int, help="images per step, all processes (default 256)")
    p.add_argument("--lr", type=float, help="default 1e-4")
    p.add_argument("--warmup", type=int, help="stage-1 lr warm-up from 1%%, EMA 0.999 during it (default 0)")
    p.add_argument("--ema-decay", type=float, help="EMA decay (default 0.9999; embedded data: 0.995)")
    p.add_argument("--steps", type=int, help="stage-1 steps (default 400000)")
    p.add_argument("--finetune-steps", type=int, help="stage-2 steps at 0%% drop after stage 1 (default 0)")
    p.add_argument("--ft-lr", type=float, help="stage-2 lr (default 2e-4)")
    p.add_argument("--ft-warmup", type=int, help="stage-2 lr warm-up from 1%% (default 5000), EMA 0.999 during it")
    p.add_argument("--ft-ema-decay", type=float, help="stage-2 EMA decay after its warm-up (default 0.9999)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", help="start from this checkpoint's EMA weights, fresh optimizer (e.g. stage 2)")
    start.add_argument("--resume", help="continue a run exactly (a run folder: its newest checkpoint); flags left "
                       "out are the run's, given ones must agree except "
                       + ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_MAY_CHANGE)))
    p.add_argument("--compile", action="store_true", help="torch.compile the model (one graph per stage)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, help="seeds the weights, data order, noise and sample grids (default 0)")
    p.add_argument("--results-dir", default="results", help="where numbered run folders are created")
    p.add_argument("--log-every", type=int, help="loss, img/s and TFLOP/s every N >= 1 steps (default 50)")
    p.add_argument("--ckpt-every", type=int, help="every N steps, 0: only at the end of stages (default 50000)")
    p.add_argument("--sample-every", type=int, help="EMA sample grid every N steps, 0: never (default 10000)")
    p.add_argument("--eval-every", type=int, help="held-out loss every N steps, 0: never (default 5000)")
    p.add_argument("--benchmark", action="store_true", help="time training steps on synthetic SD-VAE latents of "
                   "an --image-size (256) image, print one table row")
    p.add_argument("--benchmark-steps", type=int, default=20, help="timed steps (the median), after 3 warm-up steps")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FloatingPointError) as e:                       # bad input or a diverged run: one message
        raise SystemExit(f"train.py: error: {e}")
