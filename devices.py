"""
Where train.py and sample.py run: one process per GPU under torchrun (or one plain process), the
precision, and how fast: the median time of a piece of work and the measured matmul peak that MFU is
reported against.

    rank, world, device = setup_distributed()      # torchrun's environment, or rank 0 of 1
    with autocast(device, "bf16"): ...             # bf16 matmuls on CUDA; "fp32": plain float32
    ms = time_ms(lambda: step(), device)           # median of 20 timed calls after 3 warm-up calls
"""
import os
import time

import numpy as np
import torch
import torch.distributed as dist


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


def cleanup_distributed(world):
    """Wait for every rank, then close the process group: a rank that leaves while another still
    works (rank 0 writing its last checkpoint) can abort the other's gloo threads at exit."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def autocast(device, precision):
    """bf16 autocast, or plain float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def time_ms(fn, device, reps=20, warmup=3):
    """Median time of fn() in ms over `reps` calls after `warmup` ones (compilation happens
    there)."""
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
    """Measured matmul FLOP/s, the MFU reference: bf16 8192^3 on CUDA, fp32 1024^3 on CPU
    (measured, not a datasheet figure)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (time_ms(lambda: a @ b, device, reps=10) / 1e3)
