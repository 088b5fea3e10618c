"""
The model registry and checkpoints: what train.py writes and sample.py reads, and official SPRINT weights; train.py's
run folders, logs and resumed state; and what both scripts share around them (processes, autocast, timing, the
matmul peak that MFU is measured against, and the handling of flags: defaults, ranges, agreement with a checkpoint).

    model = create_model(ModelConfig(model="sprint", size="XL"))          # dit | sprint | sparsedit, by name
    model = load_model("results/000-sprint-B-2/checkpoints/0400000.pt")   # config and EMA weights from the file
    load_weights(model, "sprint_xl.safetensors")                          # official names mapped to ours

sprint.py and sparsedit.py are pure model code; this file sits above both, so neither knows the other's config,
registry or loaders.
"""
import hashlib
import json
import os
import re
import struct
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from sparsedit import SparseDiT
from sprint import SIZES, DiT, SPRINT

MODELS = {"dit": DiT, "sprint": SPRINT, "sparsedit": SparseDiT}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model, of any of the MODELS; stored in every checkpoint. Unset fields come
    from `size` (sprint.SIZES)."""
    model: str = "sprint"            # dit | sprint | sparsedit
    size: str = "B"                  # mini | S | B | L | XL
    patch_size: int = 2
    input_size: int = 32             # side of the (latent) image, e.g. 32 for 256 px SD-VAE latents
    in_channels: int = 4
    num_classes: int = 1000
    hidden_size: int = 0             # 0: from size
    num_heads: int = 0               # 0: from size
    depths: tuple = ()               # (encoder, middle, decoder); dit runs sum(depths) dense blocks
    mlp_ratio: float = 4.0
    extra: dict = field(default_factory=dict)  # model-specific settings (sparsedit's layout and density)

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"--model {self.model!r}: choose {', '.join(MODELS)}")
        if self.size not in SIZES:
            raise ValueError(f"--size {self.size!r}: choose one of {', '.join(SIZES)}")
        D, H, depths = SIZES[self.size]
        self.hidden_size = self.hidden_size or D
        self.num_heads = self.num_heads or H
        self.depths = tuple(self.depths or depths)
        if self.input_size % self.patch_size:
            raise ValueError(f"--patch-size {self.patch_size} does not divide the input side {self.input_size}")
        if self.hidden_size % (4 * self.num_heads):
            raise ValueError("2D RoPE needs a head dimension divisible by 4")

    @property
    def grid(self):                  # token grid side: N = grid**2 tokens
        return self.input_size // self.patch_size


def create_model(cfg):
    """Build dit / sprint / sparsedit from a ModelConfig or its dict (as stored in checkpoints)."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig(**cfg)
    return MODELS[cfg.model](cfg)


#################################################################################
#                 Loading our checkpoints and official SPRINT ones              #
#################################################################################

OFFICIAL_NAMES = {"encoder_blocks.": "encoder.", "middle_blocks.": "middle.", "decoder_blocks.": "decoder.",
                  "renoise_linear.": "fuse."}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}: 8-byte little-endian header length, JSON header, raw data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; supported: F32, F16, BF16")
            begin, end = info["data_offsets"]
            f.seek(8 + n + begin)
            data = bytearray(f.read(end - begin))
            if len(data) != end - begin:                                    # the file ends early
                raise EOFError(name)
            tensors[name] = torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def read_checkpoint(path):
    """Our .pt checkpoint as train.py saves it; a .safetensors file or a bare state dict becomes {"model": ...}.
    A file that is cut short or damaged is a ValueError naming it (callers add their flag)."""
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":            # torch.save (zip or legacy pickle)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            return ckpt if isinstance(ckpt, dict) and "model" in ckpt else {"model": ckpt}
        if len(head) >= 9 and head[8:9] == b"{":
            return {"model": read_safetensors(path)}
    except (RuntimeError, EOFError, struct.error, UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a readable checkpoint (truncated?)") from None
    raise ValueError(f"{path}: neither a PyTorch checkpoint (.pt) nor a .safetensors file")


def checkpoint_weights(ckpt, ema=True):
    """The EMA (if asked and present) or raw weights of a read checkpoint, named as in our models."""
    sd = {}
    for name, tensor in ckpt["ema" if ema and "ema" in ckpt else "model"].items():
        name = re.sub(r"^(module\.|_orig_mod\.)+", "", name)                 # DDP / torch.compile wrappers
        for official, ours in OFFICIAL_NAMES.items():
            name = name.replace(official, ours)
        sd[name] = tensor
    return sd


def load_weights(model, path, ema=True, ckpt=None):
    """Load our checkpoints (EMA weights if asked and present) or official SPRINT ones, checked key by key."""
    sd = checkpoint_weights(ckpt or read_checkpoint(path), ema)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
        raise ValueError(f"{path} does not fit this {model.cfg.model}-{model.cfg.size} model "
                         f"(check --model/--size/--patch-size/--image-size):"
                         + (f"\n  missing: {show(missing)}" if missing else "")
                         + (f"\n  unexpected: {show(unexpected)}" if unexpected else "")
                         + (f"\n  shape mismatch: {show(mismatched)}" if mismatched else ""))
    model.load_state_dict(sd)
    return model


def load_model(path, cfg=None, ema=True, ckpt=None):
    """A model rebuilt from the config our checkpoints carry (or from cfg, for official files), weights loaded."""
    ckpt = ckpt or read_checkpoint(path)
    if "config" in ckpt:
        cfg = ckpt["config"]
    elif cfg is None:
        raise ValueError(f"{path} carries no model config: give the architecture (--model, --size, --patch-size, "
                         f"--image-size, --num-classes)")
    return load_weights(create_model(cfg), path, ema, ckpt)


def init_from(model, path, ema=True):
    """train.py --init: a SparseDiT from a dense DiT checkpoint (mapped by SparseDiT.from_dit), else this model's
    own weights (EMA if asked and present). Every error names --init and the file."""
    if not os.path.isfile(path):
        raise ValueError(f"--init {path}: no such file")
    try:
        ckpt = read_checkpoint(path)
        if not (isinstance(model, SparseDiT) and ckpt.get("config", {}).get("model") == "dit"):
            return load_weights(model, path, ema, ckpt)
        try:
            dense = model.from_dit(ModelConfig(**ckpt["config"]), checkpoint_weights(ckpt, ema))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return load_weights(model, path, ema=False, ckpt={"model": dense})
    except ValueError as e:
        raise ValueError(f"--init {e}") from None


#################################################################################
#       Runs on disk: folders, logs, checkpoints, resumed state (train.py)      #
#################################################################################

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


def weights_digest(*models):
    """A short hash of the per-tensor float64 sums of the weights: equal on all ranks if DDP works."""
    sums = torch.stack([p.detach().double().sum() for m in models for p in m.parameters()]).cpu()
    return hashlib.sha256(sums.numpy().tobytes()).hexdigest()[:16]


def save_checkpoint(run_dir, done, raw, ema, opt, args, data_position, train_s, rank, world, device):
    """Every rank's RNG state and a check that DDP kept the ranks equal; rank 0 writes atomically -> the path."""
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    states = [({"cpu": torch.get_rng_state(), "cuda": cuda_rng}, weights_digest(raw, ema))] * world
    if world > 1:
        dist.all_gather_object(states, states[0])
    rngs, digests = map(list, zip(*states))
    path = os.path.join(run_dir or "", "checkpoints", f"{done:07d}.pt")
    if rank == 0:
        if len(set(digests)) > 1:
            raise RuntimeError(f"step {done}: the weights differ across ranks ({digests})")
        torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "config": asdict(raw.cfg), "args": vars(args), "step": done, "rng": rngs,
                    "data": data_position, "train_s": train_s}, path + ".tmp")
        os.replace(path + ".tmp", path)                  # atomic: a kill at any moment leaves every file whole
        log(run_dir, step=done, train_s=train_s, checkpoint=path, rank_weights=digests)
    return path


def resume(path, ckpt, raw, ema, opt):
    """Load a read checkpoint's whole state -> (its path, step, data position, RNG states, training seconds so far)."""
    try:
        load_weights(raw, path, ema=False, ckpt=ckpt)
        load_weights(ema, path, ema=True, ckpt=ckpt)
    except ValueError as e:
        raise ValueError(f"--resume {e}") from None
    opt.load_state_dict(ckpt["opt"])
    return path, ckpt["step"], ckpt["data"], ckpt["rng"], ckpt.get("train_s", 0.0)


def restore_rngs(rngs, args, rank, world, device, run_dir):
    """Noise, t, drop patterns and flips differ across ranks; a resumed run continues every rank's own stream."""
    torch.manual_seed(args.seed * world + rank)
    if rngs is not None and len(rngs) != world:
        log(run_dir, f"warning: saved by {len(rngs)} processes, resumed on {world}: not the saved noise stream")
    elif rngs is not None:
        torch.set_rng_state(rngs[rank]["cpu"])
        if device.type == "cuda" and rngs[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rngs[rank]["cuda"], device)


#################################################################################
#            Run-time shared by train.py and sample.py: processes, speed          #
#################################################################################

def setup_distributed():
    """(rank, world_size, device) from torchrun's environment; a plain `python` run is rank 0 of 1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed(world):
    """Wait for every rank, then close the process group: a rank that leaves while another still works (rank 0
    writing its last checkpoint) can abort the other's gloo threads at exit."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def autocast(device, precision):
    """bf16 autocast, or plain float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def time_ms(fn, device, reps=20, warmup=3):
    """Median time of fn() in ms over `reps` calls after `warmup` ones (compilation happens there)."""
    times = []
    for _ in range(warmup + reps):
        if device.type == "cuda":                        # events time the GPU's work, not the launches
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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
    """Measured matmul FLOP/s, the MFU reference: bf16 8192^3 on CUDA, fp32 1024^3 on CPU (measured, not a spec)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (time_ms(lambda: a @ b, device, reps=10) / 1e3)


#################################################################################
#                   Flags: defaults, ranges, agreeing with a file               #
#################################################################################

def at_least(args, low, *names):
    """A flag given below `low` -> a ValueError naming it (flags left out, None, pass)."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {low}")


def fill(args, defaults):
    """The flags left out (None) take these defaults."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def agree(args, stored, source, whose, free=()):
    """Flags left out (None) take the stored values; flags given with other values (outside `free`) -> one
    ValueError naming each. A checkpoint's config, or a resumed run's flags, decide what was left out."""
    def show(v):
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    differ = []
    for key, value in stored.items():
        given = getattr(args, key, None)
        if given is None or given is False:                             # left out (a store_true flag: not given)
            setattr(args, key, value)
        elif given != value and key not in free:
            differ.append(f"--{key.replace('_', '-')} {show(given)} differs from {whose} {show(value)}")
    if differ:
        raise ValueError(f"{source} does not fit the flags given: {'; '.join(differ)}; leave them out to use "
                         f"{whose}")
