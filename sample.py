"""
Sampling from DiT / SPRINT / SparseDiT: SDE, Euler and Heun samplers, classifier-free guidance
(CFG) and path-drop guidance (PDG, SPRINT Sec. 3.4), a grid in one process, 50,000-sample .npz
files for fid.py under torchrun. Reads our checkpoints and the official SPRINT .safetensors.

    # a grid from the newest SPRINT checkpoint in results/
    python sample.py --pdg
    python sample.py --ckpt ckpt.pt --classes 207 360 387 974 --sampler heun --steps 50
    torchrun --nproc_per_node=8 sample.py --ckpt ckpt.pt --pdg --cfg-scale 3 --num-samples 50000 \\
        --seed 888 --out samples.npz --vae stabilityai/sd-vae-ft-ema     # the papers' evaluation
    python sample.py --ckpt sprint.safetensors --model sprint --size XL       # official weights

The model predicts the velocity v = eps - x of the linear path x_t = (1 - t) x + t eps; sampling
integrates from t = 1 (noise) to t = 0 (data). Guidance mixes a conditional and an unconditional
velocity, v_u + w (v_c - v_u). With CFG v_u is the same network with the null label; with PDG it is
the network with the null label *and its deep sparse path skipped* (mask tokens in its place), which
costs only the dense encoder and decoder blocks. Samples depend on their seed only, not on the
number of GPUs; an .npz is in ADM's layout (arr_0 uint8 N x H x W x 3, arr_1 labels), written shard
by shard, which fid.py reads.

The file reads: guidance and samplers -> their cost -> checkpoint files -> flags and the model ->
a sampling run (per-sample noise, shards, the output) -> main. Speed: tools/benchmark.py.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import re
import shutil
import struct
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from sparsedit import SparseDiT
from sprint import SIZES, SPRINT, DiT, ModelConfig

MODELS = {"dit": DiT, "sprint": SPRINT, "sparsedit": SparseDiT}


#################################################################################
#         Guided velocity (CFG and path-drop guidance) and the samplers          #
#################################################################################

def guided(t, cfg_scale, interval):
    """Whether the step at time t is guided: a scale other than 1 and t inside the guidance
    interval."""
    return cfg_scale != 1.0 and interval[0] <= t <= interval[1]


def guided_velocity(model, x, t, y, cfg_scale=1.0, pdg=False, interval=(0.0, 1.0)):
    """Velocity at the shared time t (a float) for x (B, C, H, W) and labels y (B,), guided for t
    in `interval`.

    Outside it, or at scale 1, one conditional pass. CFG: one forward of 2B (the conditional and
    null-label halves); PDG: the full model on the conditional half, the model without its middle
    blocks (skip_middle) on the null-label half.
    """
    tt = torch.full((x.shape[0],), t, device=x.device)
    kw = model.sampling_kwargs(t)                                 # SparseDiT: this t's grid side
    if not guided(t, cfg_scale, interval):
        return model(x, tt, y, **kw)
    null = torch.full_like(y, model.cfg.num_classes)
    if pdg:
        v_cond = model(x, tt, y, **kw)
        v_uncond = model(x, tt, null, skip_middle=True, **kw)
    else:
        both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]), **kw)
        v_cond, v_uncond = both.chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def time_grid(sampler, steps):
    """The times the sampler visits, from 1 to 0. SDE: linspace(1, 0.04, steps) then a last step
    to 0."""
    if sampler not in ("sde", "euler", "heun"):
        raise ValueError(f"--sampler {sampler!r}: choose sde, euler or heun")
    if sampler == "sde":
        return torch.linspace(1.0, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def randn_per_sample(shape, generators, device):
    """(len(generators), *shape) standard normal noise, one generator per sample, drawn on the CPU:
    the same whatever the batching and the device."""
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in generators])
    if torch.device(device).type == "cuda":        # from pinned memory: the host does not wait
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


@torch.no_grad()
def sample(model, z, y, sampler="sde", steps=250, generators=None, **guidance):
    """Integrate from noise z (B, C, H, W) at t = 1 to data at t = 0 -> (B, C, H, W) float32.

    sde: the official Euler-Maruyama sampler (as in SiT/REPA/SPRINT): diffusion w(t) = 2t, drift
         v - w/2 * score with the score from the velocity, score = -(x + (1 - t) v) / t; the last
         step (0.04 -> 0) is the deterministic mean. `generators` (one per sample) draw its noise.
    euler / heun: the probability-flow ODE dx/dt = v on linspace(1, 0, steps + 1).
    The state is kept in float64, the model runs in float32 (bf16 under autocast on CUDA).
    """
    def velocity(x, t):
        return guided_velocity(model, x.float(), t, y, **guidance).double()

    ts = time_grid(sampler, steps)
    x = z.double()
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t                                           # < 0
        v = velocity(x, t)
        if sampler == "sde":
            score = -(x + (1 - t) * v) / t
            x = x + (v - t * score) * dt                          # w/2 * score with w = 2t
            if t_next > 0:                                        # no noise on the last step, to 0
                if generators:
                    noise = randn_per_sample(x.shape[1:], generators, x.device)
                else:
                    noise = torch.randn_like(x)
                x = x + math.sqrt(2 * t * -dt) * noise
        elif sampler == "heun":
            # the mean of v here and at the Euler step's end
            x = x + 0.5 * (v + velocity(x + v * dt, t_next)) * dt
        else:
            x = x + v * dt
    return x.float()


#### Cost: the forward passes a step and a whole run make, and their FLOPs ####

def guided_passes(t, cfg_scale=1.0, pdg=False, interval=(0.0, 1.0)):
    """The forward passes one step costs per image: [(t, skip_middle), ...]."""
    if guided(t, cfg_scale, interval):
        return [(t, False), (t, pdg)]
    return [(t, False)]


def trajectory_passes(sampler="sde", steps=250, **guidance):
    """Every forward pass one image costs in a whole sampling run: [(t, skip_middle), ...]."""
    ts = time_grid(sampler, steps)
    # Heun also evaluates each step's end
    evals = ts[:-1] + (ts[1:] if sampler == "heun" else [])
    return [p for t in evals for p in guided_passes(t, **guidance)]


def trajectory_flops(model, sampler="sde", steps=250, **guidance):
    """Forward FLOPs per image of one whole sampling run (every model pass the sampler makes)."""
    passes = trajectory_passes(sampler, steps, **guidance)
    return sum(model.pass_flops(t, skip) for t, skip in passes)


#################################################################################
#            Checkpoint files: ours, which carry their config, and the          #
#            official SPRINT .safetensors, whose names are mapped to ours       #
#################################################################################

OFFICIAL_NAMES = {
    "encoder_blocks.": "encoder.",
    "middle_blocks.": "middle.",
    "decoder_blocks.": "decoder.",
    "renoise_linear.": "fuse.",
}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# the config fields that decide a model's parameters (what two checkpoints must share to be swapped)
# (SparseDiT's layout and density show in its parameter names, which are checked key by key)
ARCHITECTURE = ("model", "hidden_size", "num_heads", "depths", "mlp_ratio", "patch_size",
                "input_size", "in_channels", "num_classes")


def create_model(cfg):
    """Build dit / sprint / sparsedit from a ModelConfig or its dict (as stored in checkpoints)."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig(**cfg)
    if cfg.model not in MODELS:
        raise ValueError(f"--model {cfg.model!r}: choose {', '.join(MODELS)}")
    return MODELS[cfg.model](cfg)


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}: 8-byte little-endian header length, JSON header, raw
    data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; supported: "
                                 f"F32, F16, BF16")
            begin, end = info["data_offsets"]
            f.seek(8 + n + begin)
            data = bytearray(f.read(end - begin))
            if len(data) != end - begin:                                # the file ends early
                raise EOFError(name)
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            tensors[name] = torch.frombuffer(data, dtype=dtype).reshape(info["shape"])
    return tensors


def read_checkpoint(path):
    """Our .pt checkpoint as train.py saves it; a .safetensors file or a bare state dict becomes
    {"model": ...}. A file that is cut short or damaged is a ValueError naming it (callers add their
    flag)."""
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":            # torch.save (zip or pickle)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            return ckpt if isinstance(ckpt, dict) and "model" in ckpt else {"model": ckpt}
        if len(head) >= 9 and head[8:9] == b"{":                       # safetensors' JSON header
            return {"model": read_safetensors(path)}
    except (RuntimeError, EOFError, struct.error, UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a readable checkpoint (truncated?)") from None
    raise ValueError(f"{path}: neither a PyTorch checkpoint (.pt) nor a .safetensors file")


def checkpoint_weights(ckpt, ema=True):
    """The EMA (if asked and present) or raw weights of a read checkpoint, named as in our
    models."""
    sd = {}
    for name, tensor in ckpt["ema" if ema and "ema" in ckpt else "model"].items():
        # DDP / torch.compile wrappers
        name = re.sub(r"^(module\.|_orig_mod\.)+", "", name)
        for official, ours in OFFICIAL_NAMES.items():
            name = name.replace(official, ours)
        sd[name] = tensor
    return sd


def load_weights(model, path, ema=True, ckpt=None):
    """Load our checkpoints (EMA weights if asked and present) or official SPRINT ones into model,
    checked: by the stored config where the file has one, else key by key."""
    ckpt = ckpt or read_checkpoint(path)
    cfg = model.cfg
    stored = ckpt.get("config")
    if stored:
        if stored["model"] != cfg.model:
            raise ValueError(f"{path} holds a {stored['model']}-{stored.get('size')} model, not a "
                             f"{cfg.model} one: use --model {stored['model']}")
        differ = []
        for key in ARCHITECTURE:
            saved = stored.get(key, getattr(cfg, key))
            saved = tuple(saved) if key == "depths" else saved
            if saved != getattr(cfg, key):
                differ.append(f"{key} {saved} vs {getattr(cfg, key)}")
        if differ:
            raise ValueError(f"{path} does not fit this {cfg.model}-{cfg.size} model (file vs "
                             f"model: {', '.join(differ)}); check --size/--hidden-size/--depths/"
                             f"--patch-size/--image-size")
    sd = checkpoint_weights(ckpt, ema)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        def show(items):
            more = f" ... ({len(items)} in all)" if len(items) > 8 else ""
            return ", ".join(items[:8]) + more
        problems = [f"\n  {name}: {show(items)}"
                    for name, items in (("missing", missing), ("unexpected", unexpected),
                                        ("shape mismatch", mismatched)) if items]
        raise ValueError(f"{path} does not fit this {cfg.model}-{cfg.size} model (check --model/"
                         f"--size/--patch-size/--image-size):" + "".join(problems))
    model.load_state_dict(sd)
    return model


def load_model(path, cfg=None, ema=True, ckpt=None):
    """A model rebuilt from the config our checkpoints carry (or from cfg, for official files),
    weights loaded."""
    ckpt = ckpt or read_checkpoint(path)
    if "config" in ckpt:
        cfg = ckpt["config"]
    elif cfg is None:
        raise ValueError(f"{path} carries no model config: give the architecture (--model, --size, "
                         f"--patch-size, --image-size, --num-classes)")
    return load_weights(create_model(cfg), path, ema, ckpt)


#################################################################################
#                  Flags, and the model they ask to sample from                 #
#################################################################################

# SD-VAE latents are multiplied by this for training (LDM); undone to decode
LATENT_SCALE = 0.18215
# the architecture flags: a checkpoint's config fills those left out (and given ones must agree
# with it); their defaults build files without a config, such as the official SPRINT ones
ARCH = ("model", "size", "patch_size", "image_size", "in_channels", "num_classes")


def parse_args(argv=None):
    """The command line -> (flags, the set of flags given on it: a checkpoint's config fills the
    architecture flags left out)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--ckpt", help="train.py's .pt or an official .safetensors (default: the newest "
                   "in --results-dir of --model if given; with --pdg, of sprint)")
    p.add_argument("--results-dir", default="results", help="where train.py wrote its run folders "
                   "(default %(default)s)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="sample with "
                   "the EMA weights where present (--no-ema: the raw ones)")
    p.add_argument("--model", choices=list(MODELS), default="sprint", help="default %(default)s; "
                   "these architecture flags build files without a config (official SPRINT ones); "
                   "with a config they may be left out, and must agree with it")
    p.add_argument("--size", choices=list(SIZES), default="B", help="default %(default)s")
    p.add_argument("--patch-size", type=int, default=2, help="default %(default)s")
    p.add_argument("--image-size", type=int, default=256, help="in pixels (default %(default)s); a "
                   "latent model sees image-size / 8")
    p.add_argument("--in-channels", type=int, default=4, help="4: SD-VAE latents (default), "
                   "3: pixels")
    p.add_argument("--num-classes", type=int, default=1000, help="default %(default)s")
    p.add_argument("--sampler", choices=["sde", "euler", "heun"], default="sde",
                   help="default %(default)s (the official)")
    p.add_argument("--steps", type=int, default=250, help="sampling steps (default %(default)s)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale w (default "
                   "%(default)s); 1: no guidance")
    p.add_argument("--pdg", action="store_true", help="path-drop guidance: the unconditional pass "
                   "skips the middle blocks")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=[0.0, 1.0],
                   metavar=("LOW", "HIGH"), help="guide only for t in [LOW, HIGH] (t = 1 is noise)")
    p.add_argument("--classes", type=int, nargs="+", help="labels, cycled over the samples "
                   "(default: random)")
    p.add_argument("--num-samples", type=int, help="default: 16 (or one per --classes) for a "
                   "grid, 50000 for .npz")
    p.add_argument("--seed", type=int, default=0, help="sample i draws its label and noise from "
                   "seed + i")
    p.add_argument("--per-proc-batch-size", type=int, default=64, help="samples per forward pass "
                   "in each process (default %(default)s; keep it to resume)")
    p.add_argument("--out", help="a grid (.png) or an ADM .npz for fid.py (default: "
                   "samples/<ckpt>-<settings>.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--vae", help="diffusers AutoencoderKL (folder or hub id) for latent models; "
                   "without: save latents (tools/decode_latents.py decodes them later)")
    p.add_argument("--latent-scale", type=float, help=f"default: the checkpoint's, else "
                   f"{LATENT_SCALE}")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 autocast on CUDA, "
                   "fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)
    # parsed again into a namespace that already holds every flag: only the given ones change
    left_out = object()
    given = vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), left_out))))
    return args, {key for key, value in given.items() if value is not left_out}


def check_args(args):
    """Reject bad flags before a model is loaded, saying what to change; fill in --num-samples."""
    for name in ("steps", "per_proc_batch_size", "num_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.num_samples is None:
        grid_size = len(args.classes or []) or 16
        args.num_samples = 50000 if str(args.out).endswith(".npz") else grid_size
    lo, hi = args.guidance_interval
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"--guidance-interval {lo} {hi}: need 0 <= LOW <= HIGH <= 1 (t = 1 is "
                         f"noise, 0 data)")
    if args.ckpt and not os.path.isfile(args.ckpt):
        raise ValueError(f"--ckpt {args.ckpt}: no such file")
    if args.out and not args.out.lower().endswith((".npz", ".png", ".jpg", ".jpeg", ".webp")):
        raise ValueError(f"--out {args.out}: give an .npz (samples for fid.py) or a "
                         f".png/.jpg/.webp (a grid)")


def find_checkpoint(args, given):
    """--ckpt, or the newest checkpoint of --model (if given; with --pdg: sprint; else any model)
    in --results-dir, as an absolute path."""
    if args.ckpt is not None:
        return os.path.abspath(args.ckpt)
    model_name = args.model if "model" in given or args.pdg else "*"   # NNN-model-size-patch
    pattern = os.path.join(args.results_dir, f"*-{model_name}-*", "checkpoints", "*.pt")
    found = glob.glob(pattern)
    if not found:
        hint = " (--pdg needs a sprint model)" if args.pdg else ""
        raise ValueError(f"no checkpoint in {pattern}{hint}: train one with train.py, or give "
                         f"--ckpt PATH")
    return os.path.abspath(max(found, key=os.path.getmtime))


def sampling_model(args, given, device):
    """(model in eval mode, latent scale) from the checkpoint, whose config fills the architecture
    flags left out and must agree with those given."""
    given_ckpt = args.ckpt is not None
    try:
        args.ckpt = find_checkpoint(args, given)
        ckpt = read_checkpoint(args.ckpt)
        c = ckpt.get("config")
        if c:
            stored = {key: c[key] for key in ARCH if key != "image_size"}
            stored["image_size"] = c["input_size"] * (8 if c["in_channels"] == 4 else 1)
            differ = [f"--{key.replace('_', '-')} {getattr(args, key)} differs from the "
                      f"checkpoint's {value}" for key, value in stored.items()
                      if key in given and getattr(args, key) != value]
            if differ:
                raise ValueError(f"{args.ckpt} does not fit the flags given: {'; '.join(differ)}; "
                                 f"leave them out to use the checkpoint's")
            for key, value in stored.items():
                setattr(args, key, value)
        side = args.image_size // 8 if args.in_channels == 4 else args.image_size
        cfg = ModelConfig(args.model, args.size, args.patch_size, side, args.in_channels,
                          args.num_classes)
        model = load_model(args.ckpt, cfg, args.ema, ckpt)
    except ValueError as e:
        raise ValueError(f"--ckpt {e}" if given_ckpt else str(e)) from None
    scale = args.latent_scale or ckpt.get("args", {}).get("latent_scale") or LATENT_SCALE
    if args.pdg and not model.has_sparse_path:
        raise ValueError(f"--pdg needs a model with a sparse path to drop (SPRINT); this "
                         f"{model.cfg.model} model has none: guide it with CFG (--cfg-scale "
                         f"without --pdg)")
    n = model.cfg.num_classes
    if any(not 0 <= c < n for c in args.classes or []):
        raise ValueError(f"--classes {' '.join(map(str, args.classes))}: class ids must lie in "
                         f"0..{n - 1} (this model has {n} classes)")
    return model.to(device).eval(), scale


def load_vae(path, device):
    """The SD VAE from diffusers, an optional extra imported only here."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        message = "--vae needs the optional diffusers package: pip install diffusers"
        raise ValueError(message) from None
    try:
        return AutoencoderKL.from_pretrained(path).to(device).eval()
    except (OSError, ValueError) as e:                   # no such folder, no network, not a VAE
        raise ValueError(f"--vae {path}: could not load an AutoencoderKL ({e}); give a local "
                         f"diffusers folder or a Hugging Face id such as "
                         f"stabilityai/sd-vae-ft-ema") from None


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


#################################################################################
#        A sampling run: per-sample labels and noise, shards, the output        #
#################################################################################

# the settings that decide the samples: a re-run continues an earlier run's shards only if they
# all agree
RUN_KEYS = ("ckpt", "ema", "sampler", "steps", "cfg_scale", "pdg", "guidance_interval", "classes",
            "seed", "per_proc_batch_size", "num_samples", "precision", "latent_scale", "vae")


def sample_inputs(indices, seed, classes, num_classes, shape, device):
    """Noise (B, *shape), labels (B,) and generators of the samples with these global indices.

    Sample i draws its label, its initial noise, then its SDE noise from a generator seeded
    seed + i, so it comes out the same in any batch on any rank (the label is drawn even with
    --classes: the noise does not depend on it).
    """
    gens = [torch.Generator().manual_seed(seed + i) for i in indices]
    labels = [int(torch.randint(num_classes, (1,), generator=g)) for g in gens]
    if classes:
        labels = [classes[i % len(classes)] for i in indices]
    return randn_per_sample(shape, gens, device), torch.tensor(labels, device=device), gens


def output_path(args, model, vae):
    """--out (default samples/<checkpoint>-<settings>.png, every setting that changes the grid in
    its name); latents without a VAE go to <out>.latents.npz."""
    if args.out is None:
        folder, name = os.path.split(os.path.splitext(args.ckpt)[0])
        # results/NNN-model-size-patch/checkpoints
        if os.path.basename(folder) == "checkpoints":
            name = f"{os.path.basename(os.path.dirname(folder))}-{name}"
        lo, hi = args.guidance_interval
        settings = [name, f"{args.sampler}{args.steps}",
                    f"{'pdg' if args.pdg else 'cfg'}{args.cfg_scale:g}", f"seed{args.seed}",
                    f"n{args.num_samples}"]
        if args.classes:
            classes = "_".join(map(str, args.classes))
            if len(classes) >= 40:
                classes = hashlib.sha1(classes.encode()).hexdigest()[:8]
            settings.append(f"classes{classes}")
        if (lo, hi) != (0, 1):
            settings.append(f"interval{lo:g}_{hi:g}")
        if not args.ema:
            settings.append("raw")
        args.out = os.path.join("samples", "-".join(settings) + ".png")
    path = args.out
    if model.cfg.in_channels == 4 and vae is None:
        path = os.path.splitext(args.out)[0] + ".latents.npz"
    if os.path.exists(path) and not args.overwrite:
        raise ValueError(f"--out {path} exists: pass --overwrite to replace it, or choose another "
                         f"--out")
    return path


def to_uint8(x):
    """Images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy (the ADM .npz layout)."""
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def finish(x, vae=None, latent_scale=LATENT_SCALE):
    """Sampler output -> what is stored: {"arr_0": uint8 images}, or {"latents": ...} for latents
    without a VAE."""
    # pixel space: the output is the image in [-1, 1]
    if x.shape[1] != 4:
        return {"arr_0": to_uint8(x)}
    # 4 channels: SD-VAE latents, (B, 4, H/8, W/8)
    z = x.float() / latent_scale
    if vae is None:
        return {"latents": z.cpu().numpy()}
    with torch.autocast(x.device.type, enabled=False):   # decode in float32, as DiT does
        return {"arr_0": to_uint8(vae.decode(z).sample)}


def shard_path(parts, k):
    """Batch k's shard file."""
    return os.path.join(parts, f"{k:06d}.npz")


def open_parts(path, run, rank, world):
    """The shard folder PATH.parts/, created with the run's settings, or checked against them on a
    re-run."""
    parts = path + ".parts"
    meta = os.path.join(parts, "run.json")
    if rank == 0 and not os.path.exists(meta):
        os.makedirs(parts, exist_ok=True)
        with open(meta, "w") as f:
            json.dump(run, f, indent=1)
    if world > 1:
        dist.barrier()
    with open(meta) as f:
        changed = [k for k, v in json.load(f).items() if run.get(k) != v]
    if changed:
        raise ValueError(f"{parts} holds the shards of a run with other settings "
                         f"({', '.join(changed)}): delete it to start afresh, or give the same "
                         f"settings to continue it")
    return parts


def sample_shards(net, args, guidance, parts, rank, world, device, vae=None):
    """Sample this rank's missing batches into shard files -> how many images it sampled.

    Batch k holds the samples [kB, (k+1)B) and goes to rank k % world, so every batch is computed
    the same whatever the number of GPUs. A shard is renamed into place only once complete: a re-run
    skips it safely.
    """
    B = args.per_proc_batch_size
    N = args.num_samples
    cfg = net.cfg
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    todo = [k for k in range(rank, math.ceil(N / B), world)
            if not os.path.exists(shard_path(parts, k))]
    batches = [range(k * B, min(k * B + B, N)) for k in todo]
    total = sum(map(len, batches))
    with tqdm(total=total, unit="img", desc=f"rank 0/{world}", disable=rank != 0) as bar:
        for k, indices in zip(todo, batches):
            z, y, gens = sample_inputs(indices, args.seed, args.classes, cfg.num_classes, shape,
                                       device)
            with autocast(device, args.precision):
                x = sample(net, z, y, args.sampler, args.steps, gens, **guidance)
            with open(shard_path(parts, k) + ".tmp", "wb") as f:
                np.savez(f, **finish(x, vae, args.latent_scale), arr_1=y.cpu().numpy())
            os.replace(shard_path(parts, k) + ".tmp", shard_path(parts, k))
            bar.update(len(indices))
    return total


def save_grid(x, path, nrow=None):
    """Images (B, 3, H, W) in [-1, 1] (or uint8 (B, H, W, 3)) -> one image file, nrow per row
    (default: square), 2 px white borders."""
    imgs = to_uint8(x) if torch.is_tensor(x) else x
    B, H, W, C = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = np.full((rows * (H + 2) + 2, nrow * (W + 2) + 2, C), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        top = 2 + r * (H + 2)
        left = 2 + c * (W + 2)
        grid[top: top + H, left: left + W] = img
    Image.fromarray(grid.squeeze(-1) if C == 1 else grid).save(path)


def write_npz(f, arrays):
    """An uncompressed .npz, laid out as np.savez lays it out (with version 2.0 .npy headers, which
    np.load and fid.py read alike), from {name: (shape, dtype, blocks)}: each array's header, then
    its rows block by block, so memory holds one block whatever the number of rows."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, (shape, dtype, blocks) in arrays.items():
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                      "fortran_order": False, "shape": tuple(shape)}
            rows = 0
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for block in blocks:
                    member.write(np.ascontiguousarray(block, dtype).tobytes())
                    rows += len(block)
            if rows != shape[0]:                    # the header would promise other rows
                raise ValueError(f"{name}: {rows} rows written, the header says {shape[0]}")


def merge_shards(parts, num_batches, path, num_samples, nrow=None):
    """The shards, in order, into `path`, then remove them: an .npz streamed shard by shard (memory
    holds one shard of 50,000 images at 512 px, not 39 GB), or a grid image (nrow per row). Written
    to a temporary file and renamed, so that a file at `path` is always whole."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.tmp{os.path.splitext(name)[1]}")
    rows = {}                                       # each array's row shape and dtype
    with np.load(shard_path(parts, 0)) as first:
        for key in first.files:
            array = first[key]
            rows[key] = array.shape[1:], array.dtype

    def blocks(key):
        for k in range(num_batches):
            with np.load(shard_path(parts, k)) as shard:
                yield shard[key]

    if path.endswith(".npz"):
        with open(temporary, "wb") as f:
            write_npz(f, {key: ((num_samples, *shape), dtype, blocks(key))
                          for key, (shape, dtype) in rows.items()})
    else:
        save_grid(np.concatenate(list(blocks("arr_0"))), temporary, nrow)
    os.replace(temporary, path)
    shutil.rmtree(parts)


#################################################################################
#                                 The sampling run                              #
#################################################################################

def main(argv=None):
    """Sample as the flags say: a grid or an .npz (rank 0 merges every rank's shards)."""
    args, given = parse_args(argv)
    rank, world, device = setup_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    guidance = dict(cfg_scale=args.cfg_scale, pdg=args.pdg, interval=tuple(args.guidance_interval))
    try:
        check_args(args)
        model, args.latent_scale = sampling_model(args, given, device)
        vae = None
        if args.vae and model.cfg.in_channels == 4:
            vae = load_vae(args.vae, device)
        path = output_path(args, model, vae)
        run = json.loads(json.dumps({k: getattr(args, k) for k in RUN_KEYS}))
        parts = open_parts(path, run, rank, world)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"sample.py: error: {e}")
    net = torch.compile(model, dynamic=False) if args.compile else model

    cfg = model.cfg
    passes = trajectory_passes(args.sampler, args.steps, **guidance)
    flops = trajectory_flops(model, args.sampler, args.steps, **guidance)
    weights = "EMA" if args.ema else "raw"
    guide = "no guidance"
    if args.cfg_scale != 1:
        kind = "PDG" if args.pdg else "CFG"
        guide = f"{kind} {args.cfg_scale:g} for t in {list(guidance['interval'])}"
    say(f"{args.ckpt}: {cfg.model}-{cfg.size}/{cfg.patch_size}, {weights} weights; "
        f"{args.sampler}-{args.steps}, {guide}")
    saving = ""
    if args.pdg:
        cfg_flops = trajectory_flops(model, args.sampler, args.steps, **{**guidance, "pdg": False})
        saving = f" (CFG: {cfg_flops / 1e12:.4g}, PDG saves {1 - flops / cfg_flops:.0%})"
    dropped = sum(skip for _, skip in passes)
    say(f"cost per image: {len(passes)} model passes ({dropped} with the path dropped), "
        f"{flops / 1e12:.4g} forward TFLOPs{saving}")

    start = time.perf_counter()
    count = sample_shards(net, args, guidance, parts, rank, world, device, vae)
    count = torch.tensor(count, device=device)
    if world > 1:
        # also waits for every rank's shards before the merge
        dist.all_reduce(count)
    if rank == 0:
        batches = math.ceil(args.num_samples / args.per_proc_batch_size)
        merge_shards(parts, batches, path, args.num_samples, len(args.classes or []) or None)
        secs = time.perf_counter() - start
        n = int(count)
        say(f"sampled {n} images in {secs:.1f} s on {world} process(es): {n / secs:.3g} img/s, "
            f"{n * flops / secs / 1e12:.3g} forward TFLOP/s; wrote {path}")
    # never silently: say what was saved and how to decode
    if path.endswith(".latents.npz"):
        say(f"this latent model had no --vae: {path} holds latents, not images; decode them with "
            f"tools/decode_latents.py (pip install diffusers)")
    if world > 1:            # every rank waits for the merge before the process group closes
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
