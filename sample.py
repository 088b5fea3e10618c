"""
Sampling from DiT / SPRINT / SparseDiT: SDE, Euler and Heun for flow matching, DiT's DDPM sampler
for the DiT paper's models; classifier-free (CFG) and path-drop guidance (PDG, SPRINT Sec. 3.4),
u + w (c - u) with u at the null label and, for PDG, without the middle blocks; a grid, or 50,000
samples in an .npz for fid.py. Reads train.py's checkpoints and the released SPRINT and DiT files.

    python sample.py --pdg                       # a grid, the newest SPRINT checkpoint in results/
    torchrun --nproc_per_node=8 sample.py --ckpt ckpt.pt --pdg --cfg-scale 3 --num-samples 50000 \
        --seed 888 --out samples.npz                                     # the papers' evaluation
    python sample.py --ckpt DiT-XL-2-256x256.pt --cfg-scale 1.5     # released files, by name

Sample i draws its label and noise from seed + i on any number of GPUs; an .npz is ADM's layout
(arr_0 uint8 N x H x W x 3, arr_1 labels). Precision, VAE and pixels follow the papers' (SAMPLING).
"""
import argparse
import glob
import hashlib
import itertools
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

from sparsedit import DDPM, MODELS, space_timesteps
from sprint import DDPM_STEPS, DIT_PAPER, SIZES, ModelConfig


#################################################################################
#        Guidance (CFG and path-drop guidance) and the flow-matching samplers    #
#################################################################################

def guided(level, cfg_scale, interval):
    """Whether a step at this noise level is guided: a scale other than 1, inside the interval."""
    return cfg_scale != 1.0 and interval[0] <= level <= interval[1]


def guided_velocity(model, x, t, y, cfg_scale=1.0, pdg=False, interval=(0.0, 1.0)):
    """The model's prediction at the shared time t (a number) for x (B, C, H, W) and labels y (B,).
    Unguided (scale 1, or outside the interval): one pass. CFG: one forward of the conditional and
    null-label halves (2B); PDG: the full model on the first, without its middle on the second."""
    tt = torch.full((x.shape[0],), t, device=x.device)
    kw = model.sampling_kwargs(t)                                 # SparseDiT: this t's grid side
    if not guided(model.noise_level(t), cfg_scale, interval):
        return model(x, tt, y, **kw)
    null = torch.full_like(y, model.cfg.num_classes)
    if pdg:
        v_cond = model(x, tt, y, **kw)
        v_uncond = model(x, tt, null, skip_middle=True, **kw)
    else:
        both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]), **kw)
        v_cond, v_uncond = both.chunk(2)
    out = v_uncond + cfg_scale * (v_cond - v_uncond)
    if model.cfg.diffusion == "ddpm":     # DiT's forward_with_cfg guides the first 3 of 8 channels
        out = torch.cat([out[:, :3], v_cond[:, 3:]], dim=1)       # ("for exact reproducibility")
    return out


def time_grid(sampler, steps):
    """The times the sampler visits, noise first: SDE linspace(1, 0.04, steps) and 0; Euler, Heun
    linspace(1, 0, steps + 1); DDPM DiT's respaced timesteps, 999 to 0."""
    if sampler == "ddpm":
        return space_timesteps(steps)[::-1]
    if sampler == "sde":
        return torch.linspace(1.0, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def noise_like(x, generators=None):
    """N(0, 1) noise like x (B, ...): from each sample's generator if given, in float64 on the CPU
    (the same whatever the batching and the device)."""
    if not generators:
        return torch.randn_like(x)
    noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64)
                         for g in generators])
    noise = noise.pin_memory() if x.is_cuda else noise   # pinned: the host does not wait
    return noise.to(x.device, x.dtype, non_blocking=True)


@torch.no_grad()
def sample(model, z, y, sampler="sde", steps=250, generators=None, **guidance):
    """From noise z (B, C, H, W) to data (float32). sde: the official Euler-Maruyama sampler (SiT,
    SPRINT): diffusion w(t) = 2t, drift v - w/2 * score, score -(x + (1 - t) v) / t, noise from
    `generators` (one per sample), then a step 0.04 -> 0 without; euler, heun: the ODE dx/dt = v;
    ddpm: DiT's. The state is float64; the model runs in float32 or the caller's autocast."""
    if sampler == "ddpm":
        return ddpm_sample(model, z, y, steps, generators, **guidance)

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
                x = x + math.sqrt(2 * t * -dt) * noise_like(x, generators)
        elif sampler == "heun":                                   # v's mean here and at the end
            x = x + 0.5 * (v + velocity(x + v * dt, t_next)) * dt
        else:
            x = x + v * dt
    return x.float()


#### The DiT paper's sampler: ancestral DDPM over respaced timesteps (sparsedit.DDPM) ####

@torch.no_grad()
def ddpm_sample(model, z, y, steps=250, generators=None, **guidance):
    """DiT's p_sample_loop over space_timesteps(steps): mean + sigma * noise, none at the end."""
    ddpm = DDPM(space_timesteps(steps), z.device)
    x = z.float()
    for i in reversed(range(steps)):
        out = guided_velocity(model, x, ddpm.timesteps[i], y, **guidance).float()
        index = torch.full((len(x),), i, device=x.device)
        mean, log_variance, _ = ddpm.p_mean_variance(out, x, index)
        x = mean + torch.exp(0.5 * log_variance) * noise_like(x, generators) if i else mean
    return x


#### Cost: the forward passes a whole run makes, and their FLOPs ####

def trajectory_passes(sampler="sde", steps=250, cfg_scale=1.0, pdg=False, interval=(0.0, 1.0)):
    """Every forward pass one image costs in a whole sampling run: [(t, skip_middle), ...]."""
    ts = time_grid(sampler, steps)
    # each step's start (Heun also its end); DDPM every timestep it keeps
    evaluated = ts if sampler == "ddpm" else ts[:-1] + (ts[1:] if sampler == "heun" else [])
    passes = []
    for t in evaluated:
        passes.append((t, False))                        # the conditional (or only) pass
        level = t / DDPM_STEPS if sampler == "ddpm" else t
        if guided(level, cfg_scale, interval):
            passes.append((t, pdg))                      # the unconditional: PDG skips the middle
    return passes


def trajectory_flops(model, sampler="sde", steps=250, **guidance):
    """Forward FLOPs per image of one whole sampling run (every model pass the sampler makes)."""
    passes = trajectory_passes(sampler, steps, **guidance)
    return sum(model.pass_flops(t, skip) for t, skip in passes)


#################################################################################
#      Checkpoints: ours carry their config; released files are read off        #
#      their tensors (the official SPRINT .safetensors, DiT's .pt)              #
#################################################################################

OFFICIAL_NAMES = {"encoder_blocks.": "encoder.", "middle_blocks.": "middle.",
                  "decoder_blocks.": "decoder.", "renoise_linear.": "fuse."}
TRAINING_ONLY = "projectors."          # sprint_XL_REPA_imagenet256's REPA head (D -> 2048 -> 768)
# SD-VAE latents are multiplied by this for training (LDM); undone to decode
LATENT_SCALE = 0.18215
SD_VAE = "stabilityai/sd-vae-ft-ema"                  # the papers' VAE (diffusers' AutoencoderKL)
# the papers' released checkpoints, fetched by name from their official links
RELEASED = {**{f"sprint_XL_{name}.safetensors": "https://huggingface.co/snap-research/SPRINT/"
               "resolve/main/" for name in ("imagenet256", "REPA_imagenet256", "imagenet512")},
            **{f"DiT-XL-2-{side}x{side}.pt": "https://dl.fbaipublicfiles.com/DiT/models/"
               for side in (256, 512)}}


def find_checkpoint(path):
    """A file as it is; a released checkpoint's name (RELEASED) not on disk: the copy in torch's hub
    cache, downloaded there once (to a temporary file, renamed when whole)."""
    if os.path.exists(path) or path not in RELEASED:
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", path)
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(RELEASED[path] + path, cached)
        except OSError as e:                              # no network (URLError), a full disk
            raise ValueError(f"{path}: cannot download {RELEASED[path] + path} to {cached} "
                             f"({' '.join(str(e).split())}); without network, put it there by "
                             f"hand") from None
    return cached


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}: its header's length (8 bytes), the JSON, the data."""
    tensors = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            f.seek(8 + n + begin)
            data = bytearray(f.read(end - begin))
            if len(data) != end - begin:                                # the file ends early
                raise EOFError(name)
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
            tensors[name] = torch.frombuffer(data, dtype=dtype[info["dtype"]]).reshape(info["shape"])
    return tensors


def read_checkpoint(path):
    """train.py's checkpoint as saved; a released file (.safetensors, or a bare state dict) as
    {"model": weights}. A file cut short, damaged or of other objects is a ValueError naming it."""
    try:
        with open(path, "rb") as f:
            safetensors = f.read(9)[8:] == b"{"               # its JSON header, after its length
        ckpt = {"model": read_safetensors(path)} if safetensors else torch.load(
            path, map_location="cpu", weights_only=True)
    except Exception as e:           # torch.load and a damaged header raise anything: say which
        raise ValueError(f"{path}: not a readable checkpoint (cut short, damaged, or not one: "
                         f"{type(e).__name__})") from None
    weights = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise ValueError(f"{path}: neither train.py's checkpoint nor a released SPRINT or DiT file "
                         f"(it holds no weights)")
    return ckpt if "model" in ckpt else {"model": ckpt}


def from_released(sd, input_size=32):
    """A released checkpoint's (config, weights under our names), read off its tensors: DiT's (it
    has a position table) or SPRINT's. SD-VAE latents: 4 channels."""
    sd = dict(sd)
    D = sd["x_embedder.proj.weight"].shape[0]
    p = math.isqrt(sd["x_embedder.proj.weight"][0].numel() // 4)
    sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"].flatten(1)   # Conv2d's: (c, p1, p2)
    classes = len(sd["y_embedder.embedding_table.weight"]) - 1
    if "pos_embed" in sd:
        return released_dit(sd, D, p, classes)
    return released_sprint(sd, D, p, classes, input_size)


def released_dit(sd, D, p, num_classes):
    """facebookresearch/DiT's file: the DiT paper's model, the latent side from its position table,
    the final Linear's outputs reordered from (p1, p2, c) to ours, (c, p1, p2), heads by width."""
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        sd[key] = sd[key].unflatten(0, (p, p, -1)).movedim(2, 0).flatten(0, 2)
    depth = len({name.split(".")[1] for name in sd if name.startswith("blocks.")})
    size, heads = next(((name, h) for name, (w, h, _) in SIZES.items() if w == D), (D, 0))
    if not heads:
        raise ValueError(f"cannot tell the attention heads of a released width-{D} model")
    side = math.isqrt(sd["pos_embed"].shape[1]) * p
    cfg = ModelConfig("dit", size, p, side, 4, num_classes, D, heads, (0, depth, 0), **DIT_PAPER)
    return cfg, sd


def released_sprint(sd, D, p, num_classes, input_size):
    """snap-research/Sprint's .safetensors: names made ours (OFFICIAL_NAMES), REPA's head set aside,
    heads from the q/k norm's width; the side is input_size (RoPE: the file does not say)."""
    if any(name.startswith(TRAINING_ONLY) for name in sd):
        print("ignored projectors.* of the checkpoint: REPA's projector head, for training only")
    sd = {name: tensor for name, tensor in sd.items() if not name.startswith(TRAINING_ONLY)}
    for official, ours in OFFICIAL_NAMES.items():
        sd = {name.replace(official, ours): tensor for name, tensor in sd.items()}
    depths = [len({name.split(".")[1] for name in sd if name.startswith(f"{part}.")})
              for part in ("encoder", "middle", "decoder")]
    heads = D // len(sd["encoder.0.attn.q_norm.weight"])
    size = next((name for name, (w, h, _) in SIZES.items() if (w, h) == (D, heads)), D)
    return ModelConfig("sprint", size, p, input_size, 4, num_classes, D, heads, depths), sd


def checkpoint_weights(ckpt, path, ema=True, input_size=32):
    """(config, weights) of a read checkpoint: ours (EMA if asked and there) or a released one."""
    if "config" in ckpt:
        return ModelConfig(**ckpt["config"]), ckpt["ema" if ema and "ema" in ckpt else "model"]
    try:
        return from_released(ckpt["model"], input_size)
    except KeyError as e:
        raise ValueError(f"{path}: neither train.py's checkpoint nor a released SPRINT or DiT "
                         f"file (no {e})") from None
    except (IndexError, TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise ValueError(f"{path}: cannot read a released SPRINT or DiT model off its tensors "
                         f"({type(e).__name__}: {' '.join(str(e).split())})") from None


def load_weights(model, sd, path):
    """load_state_dict(strict=True): a file that does not fit is its report, on one line."""
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit this {model.cfg.model} model: "
                         f"{' '.join(str(e).split())}") from None
    return model


def load_model(path, ema=True, input_size=32):
    """The model of a checkpoint file, rebuilt and strictly loaded, in eval mode."""
    cfg, sd = checkpoint_weights(read_checkpoint(path), path, ema, input_size)
    return load_weights(MODELS[cfg.model](cfg), sd, path).eval()


#################################################################################
#                       Flags, processes, precision                             #
#################################################################################

def number(low, high=math.inf, kind=int):
    """An argparse type for numbers in [low, high]: argparse names the flag in its error."""
    def parse(text):
        if not low <= kind(text) <= high:
            bounds = f"lie in [{low}, {high}]" if high < math.inf else f"be at least {low}"
            raise argparse.ArgumentTypeError(f"{text}: must {bounds}")
        return kind(text)
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--ckpt", help="default: the newest in --results-dir (with --pdg: SPRINT's)")
    p.add_argument("--results-dir", default="results", help="where train.py's runs are")
    p.add_argument("--image-size", type=int, default=256, help="released SPRINT files: 256 or 512")
    p.add_argument("--sampler", choices=["sde", "euler", "heun", "ddpm"], help="default: sde, ddpm")
    p.add_argument("--steps", type=number(1), default=250)
    p.add_argument("--cfg-scale", type=float, default=4.0, help="1: no guidance")
    p.add_argument("--pdg", action="store_true", help="path-drop guidance (SPRINT)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=[0.0, 1.0],
                   metavar=("LOW", "HIGH"), help="noise levels to guide at (1 is noise)")
    p.add_argument("--classes", type=int, nargs="+", help="labels, cycled (default: random)")
    p.add_argument("--num-samples", type=number(1), help="default: 16 (or --classes), 50000 .npz")
    p.add_argument("--seed", type=int, default=0, help="sample i is seeded seed + i")
    p.add_argument("--per-proc-batch-size", type=number(1), default=64)
    p.add_argument("--out", help="a grid (.png, .jpg) or an .npz (default: a new samples/*.png)")
    p.add_argument("--vae", default=SD_VAE, help="a latent model's decoder; none: the latents")
    p.add_argument("--precision", choices=list(PRECISIONS), help="the paper's on CUDA (SAMPLING)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)
    if not 0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
        p.error(f"--guidance-interval {args.guidance_interval}: need 0 <= LOW <= HIGH <= 1")
    if args.out and not args.out.lower().endswith((".npz", ".png", ".jpg")):
        p.error(f"--out {args.out}: give an .npz (samples for fid.py) or a .png/.jpg (a grid)")
    return args


def setup_distributed():
    """(rank, world size, device) from torchrun's environment (`python`: 0 of 1); TF32 allowed."""
    cuda = torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# how each paper's official code samples (README's recipes), by the model's diffusion: the model's
# and VAE's precision on CUDA, and an image in [-1, 1] to pixels (clamped to 0..255, truncated)
SAMPLING = {"flow": ("bf16", lambda x: 255 * ((x + 1) / 2)),    # SPRINT's sample_ddp.py
            "ddpm": ("fp32", lambda x: 127.5 * x + 128)}         # DiT's and SparseDiT's (TF32)


def autocast(device, precision):
    """Mixed precision in bf16 or fp16 (autocast); fp32: none."""
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


#################################################################################
#         A sampling run: the model, per-sample noise, shards, the output       #
#################################################################################

def sampling_model(args, device):
    """(model, sampler, latent scale, output path) for the flags, each checked where it enters."""
    if args.ckpt is None:                                  # run folders: NNN-model-size-patch
        pattern = f"{args.results_dir}/*-{'sprint' if args.pdg else '*'}-*/checkpoints/*.pt"
        if not glob.glob(pattern):
            raise ValueError(f"no checkpoint in {pattern}: train one with train.py, or give --ckpt")
        run = re.compile(r".*/(\d+)-[^/]*/checkpoints/[^/]*$")      # the newest run, its last step
        args.ckpt = max(glob.glob(pattern), key=lambda p: (int(run.match(p).group(1)), p))
    args.ckpt = find_checkpoint(args.ckpt)
    if not os.path.isfile(args.ckpt):
        raise ValueError(f"--ckpt {args.ckpt}: no such file")
    ckpt = read_checkpoint(args.ckpt)
    cfg, sd = checkpoint_weights(ckpt, args.ckpt, input_size=args.image_size // 8)
    model = load_weights(MODELS[cfg.model](cfg), sd, args.ckpt).eval()
    ddpm = cfg.diffusion == "ddpm"
    sampler = args.sampler or ("ddpm" if ddpm else "sde")
    if (sampler == "ddpm") != ddpm:
        raise ValueError(f"--sampler {sampler}: this {cfg.diffusion} model samples with "
                         f"{'--sampler ddpm' if ddpm else 'sde, euler or heun'}")
    if args.pdg and not model.has_sparse_path:
        raise ValueError(f"--pdg needs a model with a sparse path to drop (SPRINT), not this "
                         f"{cfg.model}: guide it with CFG (leave --pdg out)")
    if any(not 0 <= c < cfg.num_classes for c in args.classes or []):
        raise ValueError(f"--classes: class ids must lie in 0..{cfg.num_classes - 1}")
    latents = cfg.in_channels == 4 and args.vae == "none"       # kept, decoded later

    def output(out):
        return os.path.splitext(out)[0] + ".latents.npz" if latents else out
    if args.out is None:                          # samples/<run>-<step>-<guidance>[-k].png, new
        folder, name = os.path.split(os.path.splitext(args.ckpt)[0])
        if os.path.basename(folder) == "checkpoints":            # results/NNN-.../checkpoints
            name = f"{os.path.basename(os.path.dirname(folder))}-{name}"
        base = f"samples/{name}-{'pdg' if args.pdg else 'cfg'}{args.cfg_scale:g}"
        names = (f"{base}-{k}.png" if k > 1 else f"{base}.png" for k in itertools.count(1))
        args.out = next(out for out in names if not os.path.exists(output(out)))
    if os.path.exists(output(args.out)):
        raise ValueError(f"--out {output(args.out)} exists: choose another --out (nothing is "
                         f"overwritten)")
    # train.py's runs store theirs (runs older than the flag's default trained at 1); else SD-VAE's
    scale = (ckpt["args"].get("latent_scale") or 1.0) if "args" in ckpt else LATENT_SCALE
    return model.to(device), sampler, scale, output(args.out)


def load_vae(path, device, precision="fp32"):
    """The SD VAE from diffusers, an optional extra imported only here, in this precision."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError(f"the SD-VAE {path} needs the optional package diffusers: pip install "
                         f"diffusers") from None
    try:
        return AutoencoderKL.from_pretrained(path).to(device, PRECISIONS[precision]).eval()
    except (OSError, ValueError) as e:                   # no such folder, no network, not a VAE
        message = " ".join(str(e).split())
        raise ValueError(f"--vae {path}: not an AutoencoderKL ({message})") from None


def sample_inputs(indices, seed, classes, num_classes, shape, device):
    """Noise (B, *shape), labels (B,), generators of the samples with these global indices: sample
    i's label, noise (whatever the label), sampler's noise from a generator seeded seed + i."""
    gens = [torch.Generator().manual_seed(seed + i) for i in indices]
    labels = [int(torch.randint(num_classes, (1,), generator=g)) for g in gens]
    if classes:
        labels = [classes[i % len(classes)] for i in indices]
    z = noise_like(torch.empty(len(gens), *shape, dtype=torch.float64, device=device), gens)
    return z, torch.tensor(labels, device=device), gens


def to_uint8(x, diffusion="flow"):
    """Images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as the papers' code does (SAMPLING),
    in the images' own dtype (the VAE's: SPRINT's bf16 rounds each operation)."""
    pixels = SAMPLING[diffusion][1](x).clamp(0, 255).byte()              # byte() truncates
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def generate(model, indices, seed, classes, sampler, steps, precision, vae, latent_scale,
             **guidance):
    """(what is stored of them (finish), labels) of the samples with these global indices."""
    cfg = model.cfg
    device = next(model.parameters()).device
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    z, y, gens = sample_inputs(indices, seed, classes, cfg.num_classes, shape, device)
    with autocast(device, precision):
        x = sample(model, z, y, sampler, steps, gens, **guidance)
    return finish(x, vae, latent_scale, cfg.diffusion), y


def sample_grid(model, path, seed, sampler, steps, precision, vae, latent_scale):
    """train.py's samples/STEP.png: ten classes spread over the model's, the same noise each time,
    a row each unguided, with CFG 4 and (SPRINT) with PDG 4."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = min(10, model.cfg.num_classes)
    classes = [k * model.cfg.num_classes // n for k in range(n)]
    rows = [{}, {"cfg_scale": 4.0}] + [{"cfg_scale": 4.0, "pdg": True}] * model.has_sparse_path
    images = [generate(model, range(n), seed, classes, sampler, steps, precision, vae,
                       latent_scale, **guidance)[0]["arr_0"] for guidance in rows]
    save_grid(np.concatenate(images), path, nrow=n)


@torch.no_grad()
def finish(x, vae=None, latent_scale=LATENT_SCALE, diffusion="flow"):
    """Sampler output -> what is stored: {"arr_0": uint8 images}, or {"latents": ...} (no VAE)."""
    if x.shape[1] != 4:                                  # pixel space: the image in [-1, 1]
        return {"arr_0": to_uint8(x, diffusion)}
    z = x.float() / latent_scale                         # SD-VAE latents, (B, 4, H/8, W/8)
    if vae is None:                    # and how tools/decode_latents.py makes pixels of them
        return {"latents": z.cpu().numpy(), "diffusion": np.full(len(z), diffusion)}
    return {"arr_0": to_uint8(vae.decode(z.to(vae.dtype)).sample, diffusion)}   # VAE's precision


def save_grid(imgs, path, nrow=None):
    """uint8 images (B, H, W, 3) -> a grid file, nrow a row."""
    B, H, W, C = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    grid = np.full((math.ceil(B / nrow) * (H + 2) + 2, nrow * (W + 2) + 2, C), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        grid[2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = img
    Image.fromarray(grid.squeeze(-1) if C == 1 else grid).save(path)


def write_npz(f, arrays):
    """An uncompressed .npz as np.savez lays it out, from {name: (shape, dtype, blocks)}: a header,
    then the rows block by block, so memory holds one block whatever the number of rows."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, (shape, dtype, blocks) in arrays.items():
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                      "fortran_order": False, "shape": tuple(shape)}
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for block in blocks:
                    member.write(np.ascontiguousarray(block, dtype).tobytes())


def merge_shards(shards, path, num_samples, nrow=None):
    """The shards, in order, into `path`, an .npz streamed shard by shard (50,000 images of 512 px
    are 39 GB) or a grid image, written to a temporary file and renamed: `path` is always whole."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.tmp{os.path.splitext(name)[1]}")

    def blocks(key):
        for shard in shards:
            with np.load(shard) as f:
                yield f[key]

    if path.endswith(".npz"):
        with np.load(shards[0]) as first, open(temporary, "wb") as f:
            write_npz(f, {key: ((num_samples, *first[key].shape[1:]), first[key].dtype, blocks(key))
                          for key in first.files})
    else:
        save_grid(np.concatenate(list(blocks("arr_0"))), temporary, nrow)
    os.replace(temporary, path)


def main(argv=None):
    """Sample as the flags say: batch k (samples kB..kB+B-1) on rank k % world, into its shard in
    PATH.parts-<settings>/ once whole (a rerun samples only the missing ones); rank 0 merges."""
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    guidance = dict(cfg_scale=args.cfg_scale, pdg=args.pdg, interval=tuple(args.guidance_interval))
    # a sample set for fid.py when --out asks for one; otherwise a grid of 16 (or of the classes)
    fid_set = args.out is not None and args.out.endswith(".npz")
    N = args.num_samples or (50_000 if fid_set else len(args.classes or [0] * 16))
    try:
        model, sampler, latent_scale, path = sampling_model(args, device)
        flops = trajectory_flops(model, sampler, args.steps, **guidance)    # DDPM: --steps <= 1000
        cfg_flops = trajectory_flops(model, sampler, args.steps, **{**guidance, "pdg": False})
        cfg = model.cfg
        cuda = device.type == "cuda"
        precision = args.precision or (SAMPLING[cfg.diffusion][0] if cuda else "fp32")
        decodes = cfg.in_channels == 4 and args.vae != "none"
        vae = load_vae(args.vae, device, precision) if decodes else None
    except ValueError as e:
        raise SystemExit(f"sample.py: error: {e}")
    net = torch.compile(model, dynamic=False) if args.compile else model
    B = args.per_proc_batch_size
    settings = json.dumps([os.path.abspath(args.ckpt), sampler, args.steps, guidance, args.classes,
                           args.seed, N, B, args.vae, latent_scale, precision]).encode()
    parts = f"{path}.parts-{hashlib.sha1(settings).hexdigest()[:10]}"
    shards = [os.path.join(parts, f"{k:06d}.npz") for k in range(math.ceil(N / B))]
    if rank == 0:
        print(f"{args.ckpt}: {cfg.model}-{cfg.size}/{cfg.patch_size}, {sampler}-{args.steps}, "
              f"{'PDG' if args.pdg else 'CFG'} {args.cfg_scale:g}, {precision}: "
              f"{len(trajectory_passes(sampler, args.steps, **guidance))} model passes, "
              f"{flops / 1e12:.4g} forward TFLOPs per image (CFG's: {cfg_flops / 1e12:.4g})")
    os.makedirs(parts, exist_ok=True)
    start = time.perf_counter()
    todo = [k for k in range(rank, len(shards), world) if not os.path.exists(shards[k])]
    for k in tqdm(todo, desc=f"rank 0 of {world}, batches of {B}", disable=rank != 0):
        stored, y = generate(net, range(k * B, min(k * B + B, N)), args.seed, args.classes,
                             sampler, args.steps, precision, vae, latent_scale, **guidance)
        np.savez(shards[k] + ".tmp.npz", **stored, arr_1=y.cpu().numpy())
        os.replace(shards[k] + ".tmp.npz", shards[k])
    if world > 1:
        dist.barrier()                                            # every rank's shards are whole
    if rank == 0:
        merge_shards(shards, path, N, len(args.classes or []) or None)
        shutil.rmtree(parts)
        n, seconds = sum(min(B, N - k * B) for k in todo), time.perf_counter() - start
        print(f"wrote {path}; {n} images here in {seconds:.1f} s: {n / seconds:.3g} img/s, "
              f"{flops * n / seconds / 1e12:.3g} forward TFLOP/s a process")
        if path.endswith(".latents.npz"):
            print(f"{path} holds latents, not images (--vae none): decode them with "
                  f"tools/decode_latents.py (pip install diffusers)")
    if world > 1:
        dist.barrier()                                            # the merge, before the group ends
        dist.destroy_process_group()
    return path


if __name__ == "__main__":
    main()
