"""
Train DiT, SPRINT or SparseDiT with flow matching: one plain DDP loop for both stages of SPRINT.

    # one process, CPU or GPU; without --data the
    python train.py --model sprint --drop 0.75
                                                        # embedded toy data and a small model
    torchrun --nproc_per_node=8 train.py --model sprint --drop 0.75 --data /path/to/imagenet/train
    torchrun --nnodes=4 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$HEAD \\
        --master_port=29500 train.py --model sprint --data latents.npz --latent-scale 0.18215
    python train.py --benchmark --model sprint --size XL --drop 0.75 --compile   # ms/step, MFU

Stage 1 is masked pre-training at --drop; stage 2 (--finetune-steps) trains on all tokens from the
stage-1 EMA weights with a fresh optimizer and its own lr, warm-up and EMA (SPRINT Sec. 3.3), as the
official code does: lr from 1% up over the warm-up's optimizer steps (LinearLR), EMA decay 0.999
meanwhile. `--init ckpt.pt --drop 0` runs stage 2 on its own. Path drop stays on in both stages.
`--resume RUN` continues a run exactly (runs.py writes what that needs).

The file reads in the order of a run: flags -> data (data.py) -> model -> the training step -> the
loop. Data: an image folder in ImageNet layout, an .npz of images or of float latents (SD-VAE
latents with --latent-scale 0.18215: the papers' setting), or nothing: ten classes of coloured
shapes drawn in code, with a small model.
"""
import argparse
import copy
import glob
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import setup_data
from devices import autocast, cleanup_distributed, matmul_peak, setup_distributed, time_ms
from flags import agree, at_least, fill
from models import MODELS, create_model, init_from, read_checkpoint
from runs import load_run_state, log, restore_rngs, run_folder, save_checkpoint
from sample import sample, save_grid
from sprint import SIZES, ModelConfig, TokenDrop


#################################################################################
#                  Flags, and where a flag left out takes its value             #
#################################################################################

# Defaults of the flags left out (None until then, so that --resume tells them apart).
# Real data: the papers' SiT-B/2 recipe.
PAPER = dict(model="sprint", size="B", patch_size=2, mask_type="structured",
             global_batch_size=256, lr=1e-4, warmup=0, ema_decay=0.9999, steps=400_000,
             finetune_steps=0, ft_lr=2e-4, ft_warmup=5000, ft_ema_decay=0.9999, seed=0,
             log_every=50, ckpt_every=50_000, sample_every=10_000, eval_every=5_000)
# The embedded toy data: a small model and schedule, so that a plain `python train.py` shows every
# part of the loop on a laptop CPU in a few minutes.
TOY = dict(size="S", image_size=16, hidden_size=96, num_heads=4, depths=[1, 2, 1], lr=1e-3,
           ema_decay=0.995, ft_ema_decay=0.995, global_batch_size=32, steps=2000, ft_lr=1e-3,
           ft_warmup=100, log_every=25, ckpt_every=500, sample_every=250, eval_every=250)
# SPRINT's token drop and path drop; a model without a sparse path trains at 0 and 0
SPARSE = dict(drop=0.75, path_drop=0.1)
# what a resumed run may change: its length (--steps while in stage 1), its lr, logging and speed
RESUME_MAY_CHANGE = {"steps", "finetune_steps", "lr", "ft_lr", "log_every", "ckpt_every",
                     "eval_every", "sample_every", "num_workers", "compile", "results_dir"}


def parse_args(argv=None):
    """The command line; flags left out stay None until resolve_flags fills them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--model", choices=list(MODELS), help="default sprint")
    p.add_argument("--size", choices=list(SIZES), help="default B (embedded data: S, narrowed); "
                   "mini: hidden 128, 2/8/2 blocks, for CPU experiments")
    p.add_argument("--patch-size", type=int, help="pixels (or latent cells) per token side "
                   "(default 2)")
    p.add_argument("--image-size", type=int, help="pixels (folders: 64, embedded: 16); an .npz "
                   "has its own")
    p.add_argument("--hidden-size", type=int, help="for small experiments: overrides the size")
    p.add_argument("--num-heads", type=int, help="for small experiments: overrides the size")
    p.add_argument("--depths", type=int, nargs=3, metavar=("E", "M", "D"),
                   help="for small experiments: encoder, middle, decoder blocks (dit: their sum)")
    p.add_argument("--layout", type=lambda s: [int(v) for v in s.split(",")], metavar="P,S,K,T",
                   help="sparsedit: Poolingformers, SDTMs, sparse blocks per SDTM, top blocks")
    p.add_argument("--density", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="sparsedit: sparse grid sides at t = 1 and t = 0")
    p.add_argument("--data", help="image folder (a sub-folder per class) or .npz with x, y; "
                   "default: embedded toy data")
    p.add_argument("--latent-scale", type=float, help="multiplies float latents (raw SD-VAE: "
                   "0.18215); default: already scaled (sample.py then assumes SD-VAE's 0.18215)")
    p.add_argument("--no-upscale", action="store_true", help="an image smaller than --image-size "
                   "is an error")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default: 8 for folders, "
                   "0 for arrays)")
    p.add_argument("--drop", type=float, help="stage-1 token drop in [0, 1) (default: 0.75 with a "
                   "sparse path, else 0)")
    p.add_argument("--mask-type", choices=["structured", "random"], help="kept tokens: k per "
                   "n x n group (default) or anywhere")
    p.add_argument("--path-drop", type=float, help="share of samples, in [0, 1], that skip the "
                   "sparse path (default: 0.1 if it exists)")
    p.add_argument("--global-batch-size", type=int, help="images per step, all processes "
                   "(default 256)")
    p.add_argument("--lr", type=float, help="default 1e-4")
    p.add_argument("--warmup", type=int, help="stage-1 lr warm-up from 1%%, EMA 0.999 during it "
                   "(default 0)")
    p.add_argument("--ema-decay", type=float, help="EMA decay (default 0.9999; embedded data: "
                   "0.995)")
    p.add_argument("--steps", type=int, help="stage-1 steps (default 400000)")
    p.add_argument("--finetune-steps", type=int, help="stage-2 steps at 0%% drop after stage 1 "
                   "(default 0)")
    p.add_argument("--ft-lr", type=float, help="stage-2 lr (default 2e-4)")
    p.add_argument("--ft-warmup", type=int, help="stage-2 lr warm-up from 1%% (default 5000), "
                   "EMA 0.999 during it")
    p.add_argument("--ft-ema-decay", type=float, help="stage-2 EMA decay after its warm-up "
                   "(default 0.9999)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", help="start from this checkpoint's EMA weights with a fresh "
                       "optimizer (e.g. stage 2; a SparseDiT from a DiT)")
    may_change = ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_MAY_CHANGE))
    start.add_argument("--resume", help="continue a run exactly (a run folder: its newest "
                       "checkpoint); flags left out are the run's, given ones must agree except "
                       + may_change)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (one graph "
                   "per stage)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 autocast on CUDA, "
                   "fp32 on CPU")
    p.add_argument("--seed", type=int, help="seeds the weights, data order, noise and sample grids "
                   "(default 0)")
    p.add_argument("--results-dir", default="results", help="where numbered run folders are "
                   "created")
    p.add_argument("--log-every", type=int, help="loss, img/s and TFLOP/s every N >= 1 steps "
                   "(default 50)")
    p.add_argument("--ckpt-every", type=int, help="every N steps, 0: only at the end of stages "
                   "(default 50000)")
    p.add_argument("--sample-every", type=int, help="EMA sample grid every N steps, 0: never "
                   "(default 10000)")
    p.add_argument("--eval-every", type=int, help="held-out loss every N steps, 0: never "
                   "(default 5000)")
    p.add_argument("--benchmark", action="store_true", help="time training steps on synthetic "
                   "SD-VAE latents of an --image-size (256) image, print one table row")
    p.add_argument("--benchmark-steps", type=int, default=20, help="timed steps (the median), "
                   "after 3 warm-up steps")
    return p.parse_args(argv)


def resolve_flags(args, world):
    """Fill the flags left out (None), each from one place, in this order: the resumed run's flags
    (--resume), the data's defaults (TOY for the embedded data, PAPER otherwise), the model's
    (SPARSE with a sparse path, else no drop); then check them -> --resume's (path, checkpoint),
    or None."""
    resumed = read_run(args) if args.resume else None
    toy = args.data is None and not args.benchmark
    fill(args, {**PAPER, **(TOY if toy else {})})
    has_sparse_path = MODELS[args.model].has_sparse_path
    fill(args, SPARSE if has_sparse_path else dict(drop=0.0, path_drop=0.0))
    check_args(args, 1 if args.benchmark else world)
    return resumed


def read_run(args):
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
    run = ckpt.get("args", {})
    step = ckpt.get("step", 0)
    stored = {k: v for k, v in run.items() if k not in ("resume", "init", "benchmark")}
    agree(args, stored, f"--resume {found[-1]}", "the run's", free=RESUME_MAY_CHANGE)
    if args.steps != run.get("steps", args.steps) and step > min(args.steps, run["steps"]):
        raise ValueError(f"--steps {args.steps}: stage 1 ({run['steps']} steps) can change its "
                         f"length only while the run is in it, and not below its checkpoint's "
                         f"step {step}")
    return found[-1], ckpt


def check_args(args, world):
    """Flags out of range -> a ValueError naming the flag, before anything is read or written."""
    at_least(args, 1, "global_batch_size", "log_every", "benchmark_steps")
    at_least(args, 0, "steps", "finetune_steps", "warmup", "ft_warmup", "ckpt_every",
             "eval_every", "sample_every", "num_workers")
    if not args.benchmark and args.steps + args.finetune_steps == 0:
        raise ValueError(f"--steps {args.steps} --finetune-steps {args.finetune_steps}: nothing "
                         f"to train; give --steps N (stage 1) or --finetune-steps N")
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
#                      The model, its EMA and the optimizer                     #
#################################################################################

def build_model(args, device, in_channels, num_classes, input_size, init=None):
    """(model, its EMA, AdamW, its TokenDrop) for these flags and data, from --init's weights if
    given."""
    # SparseDiT's layout and density, where given
    extra = {k: getattr(args, k) for k in ("layout", "density") if getattr(args, k) is not None}
    cfg = ModelConfig(args.model, args.size, args.patch_size, input_size, in_channels,
                      num_classes, args.hidden_size or 0, args.num_heads or 0,
                      tuple(args.depths or ()), extra=extra)
    raw = create_model(cfg).to(device)
    token_drop = TokenDrop(args.drop, args.mask_type, path_drop_prob=args.path_drop)
    raw.training_kwargs(2, token_drop, device)     # a drop the model cannot do: its flag's error
    if init:
        init_from(raw, init, ema=True)
    ema = copy.deepcopy(raw).requires_grad_(False)
    return raw, ema, make_optimizer(raw, args.lr, device), token_drop


def make_optimizer(model, lr, device):
    """AdamW with weight decay 0 (SiT); the fused kernel on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0,
                             fused=device.type == "cuda")


#################################################################################
#                    Flow matching and the training step                        #
#################################################################################

LABEL_DROP = 0.1               # labels -> the null label, for classifier-free guidance


def velocity_loss(model, x, y, t, eps, **kwargs):
    """Linear path x_t = (1 - t) x + t eps; MSE between the predicted and the true velocity
    v = eps - x."""
    tt = t.view(-1, 1, 1, 1)
    v = model((1 - tt) * x + tt * eps, t, y, **kwargs)
    return (v.float() - (eps - x)).pow(2).mean()


def train_step(model, raw, ema, opt, x, y, token_drop, precision, decay):
    """One AdamW step -> (loss, grad norm) as device tensors: nothing in here waits for the GPU."""
    B = x.shape[0]
    t = torch.sigmoid(torch.randn(B, device=x.device))          # logit-normal t = s/(1+s), s = e^n
    null = torch.rand(B, device=x.device) < LABEL_DROP
    y = torch.where(null, raw.cfg.num_classes, y)
    kwargs = raw.training_kwargs(B, token_drop, x.device)       # SPRINT: ids_keep and path_drop
    with autocast(x.device, precision):
        loss = velocity_loss(model, x, y, t, torch.randn_like(x), **kwargs)
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
        (0.9999; the embedded toy data's short run uses 0.995)."""
        if step - self.begin < self.warmup:
            return min(self.ema_decay, 0.999)
        return self.ema_decay


def stages(args, token_drop):
    """Stage 1 at --drop; stage 2 (--finetune-steps) at 0% drop with its own lr, warm-up and EMA
    (SPRINT Sec. 3.3)."""
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
                kwargs = model.training_kwargs(len(xb), token_drop, x.device)
                with autocast(x.device, precision):
                    loss = velocity_loss(model, xb, yb, t.expand(len(xb)), torch.randn_like(xb),
                                         **kwargs)
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
#                                 The training loop                             #
#################################################################################

def main(args):
    """Train as the flags say -> the run folder (rank 0; None on the other ranks)."""
    rank, world, device = setup_distributed()
    resumed = resolve_flags(args, world)
    cuda = device.type == "cuda"
    G = args.global_batch_size
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = True           # fp32 matmuls in TF32 on the GPU
    torch.backends.cudnn.allow_tf32 = True
    if args.benchmark:
        return benchmark(args, device)

    # Data: a fixed held-out subset for evaluation, the rest to train on
    data = setup_data(args)

    # Model: the same initial weights on every rank, then --init's weights or a whole --resume state
    torch.manual_seed(args.seed)
    raw, ema, opt, token_drop = build_model(args, device, data.channels, data.num_classes,
                                            data.side, args.init)
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
    if rank == 0 and len(data.eval_idx):
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
        f"{raw.training_flops(token_drop) / 1e9:.3g} at drop {args.drop}; "
        f"{args.data or 'embedded toy data'}: {len(data.train_idx)} + {len(data.eval_idx)} held "
        f"out, {data.channels}x{data.side}x{data.side}, {data.num_classes} classes; "
        f"{world} process(es) x {G // world}; {run_dir}")

    schedule = stages(args, token_drop)
    total = args.steps + args.finetune_steps
    peak = matmul_peak(device) if cuda else None
    # per-step (loss, grad norm), read at log time
    buf = torch.zeros(args.log_every, 2, device=device)
    n = 0
    pbar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
    if start == 0 and args.eval_every and eval_data is not None:
        evaluate(raw, eval_data, args, token_drop, run_dir, 0, train_s)
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
            flops_per_s = 3 * raw.training_flops(stage.token_drop) * images / seconds / world
            figures = {
                "loss": vals[:, 0].mean().item(),
                "img/s": images / seconds,
                "TFLOP/s": flops_per_s / 1e12,               # a step is about 3 forward passes
            }
            if peak:
                figures["MFU"] = raw.estimate_mfu(flops_per_s, peak)
            pbar.set_postfix({k: f"{v:.4g}" for k, v in figures.items()})
            log(run_dir, step=done, stage=1 + (step >= args.steps), train_s=train_s,
                lr=opt.param_groups[0]["lr"], grad_norm=vals[:, 1].mean().item(), **figures)
            if eval_now and eval_data is not None:
                evaluate(raw, eval_data, args, token_drop, run_dir, done, train_s)
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
    log(run_dir, f"done: {total} steps, checkpoints in {run_dir}/checkpoints")
    cleanup_distributed(world)
    return run_dir


#################################################################################
#                   Benchmark: the cost of a training step                      #
#################################################################################

def benchmark(args, device):
    """Timed training steps on synthetic latents already on the device (SD-VAE shape, 1000
    classes): one table row."""
    side = (args.image_size or 256) // 8
    raw, ema, opt, token_drop = build_model(args, device, 4, 1000, side)
    B = args.global_batch_size
    x = torch.randn(B, 4, side, side, device=device)
    y = torch.randint(0, 1000, (B,), device=device)
    model = torch.compile(raw) if args.compile else raw

    def step():
        train_step(model, raw, ema, opt, x, y, token_drop, args.precision, 0.9999)

    # the median step; compilation happens in the warm-up
    ms = time_ms(step, device, reps=args.benchmark_steps, warmup=3)
    flops_per_s = 3 * raw.training_flops(token_drop) * B / ms * 1e3    # a step = 3 forwards
    peak = matmul_peak(device)
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    else:
        memory = "n/a"
    precision = "bf16" if device.type == "cuda" else "fp32"
    mfu = raw.estimate_mfu(flops_per_s, peak)
    print(f"| model | drop | batch | compile | ms/step | img/s | TFLOP/s | MFU (measured "
          f"{precision} matmul peak) | peak memory |")
    print(f"| {args.model}-{args.size}/{args.patch_size} | {args.drop} | {B} | {args.compile} | "
          f"{ms:.1f} | {B / ms * 1e3:.1f} | {flops_per_s / 1e12:.3g} | {mfu:.1%} of "
          f"{peak / 1e12:.3g} TFLOP/s | {memory} |")


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FloatingPointError) as e:        # bad input or a diverged run: one message
        message = str(e)
        # raised in a DataLoader worker: its last line only
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        raise SystemExit(f"train.py: error: {message}")
