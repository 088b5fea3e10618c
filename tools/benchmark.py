"""
Speed on this device, on synthetic SD-VAE latents (no data, no checkpoint): the cost of train.py's
training step, or of sample.py's guided sampling step with CFG and with PDG, as a Markdown table.

    python tools/benchmark.py train --model sprint --size XL --drop 0.75 --batch 64 --compile
    python tools/benchmark.py train --model dit --size XL --batch 64 --compile
    python tools/benchmark.py train --model sprint --size XL --batch 64 --activation-checkpointing
    python tools/benchmark.py sample --model sprint --size XL --batch 64 --compile

Times are the median of --reps calls after 3 warm-up calls (compilation happens there), timed with
CUDA events on a GPU, in the precision the scripts use there (the model's paper's: training as
ModelConfig.paper_recipe, sampling as sample.SAMPLING; fp32 on a CPU). FLOPs come from
the models' own counts (a training step is about three forwards); MFU is against a matmul peak
measured here (bf16 8192^3 on CUDA, fp32 1024^3 on a CPU), not a datasheet figure. Peak memory:
CUDA's allocator's high-water mark; on a CPU (Linux) the process's resident high-water mark above
its size before the steps (one setting per process: the allocator keeps what it has freed). A
model whose cost follows t (SparseDiT's density schedule) is timed at 8 spread t and averaged.
"""
import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import train                                                                     # noqa: E402
from sample import SAMPLING, autocast, guided_velocity, trajectory_passes        # noqa: E402
from sparsedit import MODELS                                                     # noqa: E402
from sprint import SIZES, ModelConfig                                            # noqa: E402


def time_ms(fn, device, reps=20, warmup=3):
    """Median time of fn() in ms over `reps` calls after `warmup` ones."""
    times = []
    for _ in range(warmup + reps):
        if device.type == "cuda":                    # events time the GPU's work, not the launches
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(times[warmup:]))


def matmul_peak(device):
    """This device's matmul FLOP/s, measured: bf16 8192^3 products on CUDA, fp32 1024^3 on a CPU;
    what MFU is reported against, rather than a datasheet figure."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (time_ms(lambda: a @ b, device, reps=10) / 1e3)


def build(args, device):
    """A model of --model and --size for 256 px SD-VAE latents (--image-size / 8), 1000 classes."""
    cfg = ModelConfig(args.model, args.size, args.patch_size, args.image_size // 8, 4, 1000)
    return MODELS[cfg.model](cfg).to(device)


def benchmark_train(args, device):
    """One training step of train.py (forward, backward, AdamW, EMA) -> its median ms."""
    raw = build(args, device)
    ema = copy.deepcopy(raw).requires_grad_(False)
    opt = train.make_optimizer(raw, 1e-4, device)
    if args.drop and not raw.has_sparse_path:
        raise SystemExit(f"benchmark.py: error: --model {args.model} has no sparse path: leave "
                         f"--drop out")
    # train.py's stage 1 at its defaults: SPRINT's drop and path drop, neither without a sparse path
    given = [] if args.drop is None else ["--drop", str(args.drop)]
    flags = train.parser().parse_args([*given, "--mask-type", args.mask_type])
    stage = train.stage_at(flags, 0, raw.has_sparse_path)
    drop = stage.drop
    B = args.batch
    x = torch.randn(B, 4, raw.cfg.input_size, raw.cfg.input_size, device=device)
    y = torch.randint(0, 1000, (B,), device=device)
    if args.activation_checkpointing:
        raw.checkpoint_blocks()
    model = torch.compile(raw) if args.compile else raw
    recipe = raw.cfg.paper_recipe
    precision = recipe.precision if device.type == "cuda" else "fp32"
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        draws = train.draw(y, x.shape[1:], B, slice(None), stage, raw.cfg)
        train.train_step(model, raw, ema, opt, x, draws, accum=args.grad_accum,
                         ema_decay=stage.ema_decay, ddpm=None, precision=precision,
                         grad_clip=recipe.grad_clip, scaler=scaler)

    before = resident_bytes()
    ms = time_ms(step, device, args.reps)
    flops_per_s = 3 * raw.training_flops(drop) * B / ms * 1e3
    if device.type == "cuda":                                # before the peak's own matrices
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:                          # the process's high-water mark above its size before the steps
        import resource                                      # Unix only
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024    # Linux: KiB
        memory = f"{(peak_rss - before) / 2**30:.2f} GiB (RSS)"
    peak = matmul_peak(device)
    kind = "bf16" if device.type == "cuda" else "fp32"
    print(f"| model | drop | batch | checkpointing | compile | ms/step | img/s | TFLOP/s | MFU (of a "
          f"measured {kind} matmul peak) | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.model}-{args.size}/{args.patch_size} | {drop} | {B} = {args.grad_accum} x "
          f"{B // args.grad_accum} | {args.activation_checkpointing} | {args.compile} | "
          f"{ms:.1f} | {B / ms * 1e3:.1f} | {flops_per_s / 1e12:.3g} | "
          f"{flops_per_s / peak:.1%} of {peak / 1e12:.3g} TFLOP/s | {memory} |")
    return ms


def resident_bytes():
    """This process's resident memory now (Linux: /proc/self/statm; elsewhere 0)."""
    if not os.path.exists("/proc/self/statm"):
        return 0
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def benchmark_sample(args, device):
    """One guided sampling step with CFG, and with PDG where the model has a sparse path ->
    {"cfg": ms, "pdg": ms}; img/s is for a whole --sampler/--steps run guided at every step."""
    model = build(args, device).eval()
    net = torch.compile(model, dynamic=False) if args.compile else model
    B = args.batch
    x = torch.randn(B, 4, model.cfg.input_size, model.cfg.input_size, device=device)
    y = torch.randint(1000, (B,), device=device)
    ts = [(k + 0.5) / 8 for k in range(8)]
    if len({model.pass_flops(t) for t in ts}) == 1:         # a cost that does not follow t
        ts = [0.5]
    evals = len(trajectory_passes(args.sampler, args.steps))
    print(f"| model | guidance | batch | compile | ms/step | img/s ({args.sampler}-{args.steps}) | "
          f"TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    ms = {}
    flops = {}
    precision = SAMPLING[model.cfg.diffusion][0] if device.type == "cuda" else "fp32"
    for mode in ["cfg"] + (["pdg"] if model.has_sparse_path else []):
        guidance = dict(cfg_scale=4.0, pdg=mode == "pdg")   # any scale but 1 costs the same
        with autocast(device, precision):
            times = [time_ms(lambda: guided_velocity(net, x, t, y, **guidance), device, args.reps)
                     for t in ts]
        ms[mode] = sum(times) / len(ts)
        # a guided step: the conditional pass and the unconditional one (PDG: without g)
        flops[mode] = B * sum(model.pass_flops(t) + model.pass_flops(t, mode == "pdg")
                              for t in ts) / len(ts)
        print(f"| {args.model}-{args.size}/{args.patch_size} | {mode.upper()} | {B} | "
              f"{args.compile} | {ms[mode]:.2f} | {B * 1e3 / (ms[mode] * evals):.3g} | "
              f"{flops[mode] / ms[mode] / 1e9:.3g} |")
    if "pdg" in ms:
        print(f"\nPDG/CFG speed-up per step: {ms['cfg'] / ms['pdg']:.2f}x (FLOPs allow "
              f"{flops['cfg'] / flops['pdg']:.2f}x)")
    return ms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("what", choices=["train", "sample"], help="a training step or a sampling step")
    p.add_argument("--model", choices=list(MODELS), default="sprint")
    p.add_argument("--size", choices=list(SIZES), default="XL")
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=256, help="pixels: latents of image-size / 8")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--drop", type=float, help="train: the token drop (default: 0.75 for sprint)")
    p.add_argument("--mask-type", choices=["structured", "random"], default="structured")
    p.add_argument("--grad-accum", type=int, default=1, help="train: micro-batches per step")
    p.add_argument("--activation-checkpointing", action="store_true", help="train: recompute "
                   "each block in the backward pass")
    p.add_argument("--sampler", choices=["sde", "euler", "heun"], default="sde",
                   help="sample: the run that img/s is for")
    p.add_argument("--steps", type=int, default=250, help="sample: its steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--reps", type=int, default=20, help="timed calls (the median)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.what == "train":
        return benchmark_train(args, device)
    return benchmark_sample(args, device)


if __name__ == "__main__":
    main()
