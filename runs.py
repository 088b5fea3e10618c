"""
A training run on disk, for train.py: its numbered folder, its logs, its checkpoints (written
atomically, with everything needed to continue: model, EMA, optimizer, every rank's RNG state, the
data position, the training seconds so far), and the state a resumed run restores. A first reading
of train.py can skip this file.

    results/000-sprint-B-2/
        log.txt, log.jsonl          text for people, one JSON record per line for programs
        checkpoints/0050000.pt      see save_checkpoint
        samples/0010000.png         EMA sample grids
"""
import hashlib
import json
import os
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

from models import load_weights


def run_folder(args, resumed=None):
    """A resumed checkpoint's run folder, else results/NNN-model-size-patch: never an existing one,
    even when two runs start at once."""
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
    checkpoints/<step>.pt atomically -> its path."""
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
