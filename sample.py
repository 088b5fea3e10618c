"""
Sampling from DiT / SPRINT / SparseDiT: SDE, Euler and Heun samplers for flow matching, DiT's DDPM
sampler for the DiT paper's models, classifier-free (CFG) and path-drop guidance (PDG, SPRINT Sec.
3.4); a grid, or 50,000 samples in an .npz for fid.py under torchrun. Reads train.py's checkpoints
and the released SPRINT (.safetensors) and DiT (.pt) files.

    python sample.py --pdg                       # a grid, the newest SPRINT checkpoint in results/
    torchrun --nproc_per_node=8 sample.py --ckpt ckpt.pt --pdg --cfg-scale 3 --num-samples 50000 \
        --seed 888 --out samples.npz --vae stabilityai/sd-vae-ft-ema     # the papers' evaluation
    python sample.py --ckpt sprint_XL_imagenet512.safetensors --image-size 512 --pdg
    python sample.py --ckpt DiT-XL-2-256x256.pt --cfg-scale 1.5 --vae stabilityai/sd-vae-ft-ema

Guidance mixes a conditional and an unconditional prediction, u + w (c - u): with CFG u is the
network at the null label; with PDG, at the null label *with its deep sparse path skipped* (mask
tokens in its place), which costs only the dense blocks. Sample i draws its label and noise from
seed + i on any number of GPUs; an .npz is ADM's layout (arr_0 uint8 N x H x W x 3, arr_1 labels).
"""
import argparse
import glob
import hashlib
import itertools
import json
import math
import os
import shutil
import struct
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from sparsedit import MODELS
from sprint import DDPM_STEPS, SIZES, ModelConfig


#################################################################################
#        Guidance (CFG and path-drop guidance) and the flow-matching samplers    #
#################################################################################

def guided(level, cfg_scale, interval):
    """Whether a step at this noise level is guided: a scale other than 1, inside the interval."""
    return cfg_scale != 1.0 and interval[0] <= level <= interval[1]


def guided_velocity(model, x, t, y, cfg_scale=1.0, pdg=False, interval=(0.0, 1.0)):
    """The model's prediction at the shared time t (a number) for x (B, C, H, W) and labels y (B,).
    Unguided (scale 1, or outside the interval): one conditional pass. CFG: one forward of 2B, the
    conditional and null-label halves; PDG: the full model on the conditional half, the model
    without its middle blocks (skip_middle) on the null-label half."""
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
    """Standard normal noise shaped like x (B, ...): from each sample's own generator where given,
    drawn on the CPU in float64 (the same whatever the batching and the device)."""
    if not generators:
        return torch.randn_like(x)
    noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64)
                         for g in generators])
    noise = noise.pin_memory() if x.is_cuda else noise   # pinned: the host does not wait
    return noise.to(x.device, x.dtype, non_blocking=True)


@torch.no_grad()
def sample(model, z, y, sampler="sde", steps=250, generators=None, **guidance):
    """From noise z (B, C, H, W) to data (float32). sde: the official Euler-Maruyama sampler (SiT,
    REPA, SPRINT): diffusion w(t) = 2t, drift v - w/2 * score, score -(x + (1 - t) v) / t, a last
    deterministic step from 0.04 to 0, its noise from `generators` (one per sample). euler, heun:
    the ODE dx/dt = v; ddpm: DiT's (ddpm_sample). The flow state is float64, the model float32."""
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
        elif sampler == "heun":
            # the mean of v here and at the Euler step's end
            x = x + 0.5 * (v + velocity(x + v * dt, t_next)) * dt
        else:
            x = x + v * dt
    return x.float()


#################################################################################
#      The DiT paper's diffusion: DDPM, learned variance, respaced sampling     #
#################################################################################

def space_timesteps(steps, num_timesteps=DDPM_STEPS):
    """DiT's space_timesteps(1000, str(steps)): evenly strided over 0..999, rounded as DiT rounds
    a running float sum."""
    if steps > num_timesteps:
        raise ValueError(f"--steps {steps}: DDPM keeps at most its {num_timesteps} timesteps")
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1
    return [round(position) for position in itertools.accumulate([0.0] + [stride] * (steps - 1))]


class DDPM:
    """DiT's create_diffusion: 1000 linear betas from 1e-4 to 0.02, of which `timesteps` are kept
    (respacing: the kept steps' betas follow from alpha_bar there; the network still sees the
    original timestep). Coefficients are computed in float64 and used in float32, as DiT does."""
    def __init__(self, timesteps=range(DDPM_STEPS), device="cpu"):
        self.timesteps = list(timesteps)
        alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, DDPM_STEPS))[self.timesteps]
        prev = np.append(1.0, alpha_bar[:-1])
        betas = 1 - alpha_bar / prev
        beta_tilde = betas * (1 - prev) / (1 - alpha_bar)                     # the posterior's
        coefficients = dict(sqrt_alpha_bar=np.sqrt(alpha_bar),
                            sqrt_one_minus_alpha_bar=np.sqrt(1 - alpha_bar),
                            recip=np.sqrt(1 / alpha_bar), recipm1=np.sqrt(1 / alpha_bar - 1),
                            coef1=betas * np.sqrt(prev) / (1 - alpha_bar),    # posterior mean
                            coef2=(1 - prev) * np.sqrt(1 - betas) / (1 - alpha_bar),
                            # log beta tilde (clipped at step 0, where it is 0) and log beta
                            min_log=np.log(np.append(beta_tilde[1], beta_tilde[1:])),
                            max_log=np.log(betas))
        self.coef = {k: torch.tensor(v, dtype=torch.float32, device=device)
                     for k, v in coefficients.items()}

    def at(self, name, i):
        """Coefficient `name` at respaced indices i (B,), shaped to broadcast over (B, C, H, W)."""
        return self.coef[name][i].view(-1, 1, 1, 1)

    def posterior_mean(self, x0, x, i):
        """The mean of q(x_{i-1} | x_i = x, x_0 = x0)."""
        return self.at("coef1", i) * x0 + self.at("coef2", i) * x

    def p_mean_variance(self, out, x, i):
        """DiT's p_mean_variance (clip_denoised=False) of the output out = [eps, v] (B, 2C, H, W)
        at x (B, C, H, W) -> (mean, log variance, predicted x0): v in [-1, 1] interpolates the log
        variance between log beta tilde and log beta (the learned range)."""
        eps, v = out.chunk(2, dim=1)
        frac = (v + 1) / 2
        log_variance = frac * self.at("max_log", i) + (1 - frac) * self.at("min_log", i)
        x0 = self.at("recip", i) * x - self.at("recipm1", i) * eps
        return self.posterior_mean(x0, x, i), log_variance, x0


@torch.no_grad()
def ddpm_sample(model, z, y, steps=250, generators=None, **guidance):
    """DiT's p_sample_loop over space_timesteps(steps): x <- mean + sigma * noise from x = z, no
    noise at the last step, the state in float32."""
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
    # Heun also evaluates each step's end; DDPM every timestep it keeps
    evals = ts if sampler == "ddpm" else ts[:-1] + (ts[1:] if sampler == "heun" else [])
    scale = DDPM_STEPS if sampler == "ddpm" else 1                # the times' noise levels
    return [(t, skip) for t in evals
            for skip in ((False, pdg) if guided(t / scale, cfg_scale, interval) else (False,))]


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
            tensor = torch.frombuffer(data, dtype=dtype[info["dtype"]])
            tensors[name] = tensor.reshape(info["shape"])
    return tensors


def read_checkpoint(path):
    """train.py's checkpoint as saved; a released file (.safetensors, or a bare state dict) as
    {"model": weights}. A file that is not one, or is cut short, is a ValueError naming it."""
    try:
        with open(path, "rb") as f:
            safetensors = f.read(9)[8:] == b"{"               # its JSON header, after its length
        ckpt = {"model": read_safetensors(path)} if safetensors else torch.load(
            path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, KeyError, struct.error, UnicodeDecodeError,
            json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable checkpoint (cut short? {type(e).__name__})"
                         ) from None
    return ckpt if "model" in ckpt else {"model": ckpt}


def from_released(sd, input_size=32):
    """A released checkpoint's (config, weights under our names), read off its tensors: released
    models take SD-VAE latents (4 channels). DiT's file has a position table (the DiT paper's model;
    it gives the latent side), a Conv2d patch embedding (flattened: our (c, p1, p2) order) and a
    final Linear in (p1, p2, c) order (reordered); SPRINT's has RoPE: the side is `input_size`.
    The heads: the q/k norm's width gives them, else the size of this width (SIZES)."""
    if any(name.startswith(TRAINING_ONLY) for name in sd):
        print(f"ignored {TRAINING_ONLY}* of the checkpoint: REPA's projector head, for training "
              f"only")
        sd = {name: tensor for name, tensor in sd.items() if not name.startswith(TRAINING_ONLY)}
    for official, ours in OFFICIAL_NAMES.items():
        sd = {name.replace(official, ours): tensor for name, tensor in sd.items()}
    D = sd["x_embedder.proj.weight"].shape[0]
    p = math.isqrt(sd["x_embedder.proj.weight"][0].numel() // 4)
    sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"].flatten(1)
    table = "pos_embed" in sd
    if table:
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            sd[key] = sd[key].unflatten(0, (p, p, -1)).movedim(2, 0).flatten(0, 2)
        input_size = math.isqrt(sd["pos_embed"].shape[1]) * p

    depths = [len({name.split(".")[1] for name in sd if name.startswith(part + ".")})
              for part in ("encoder", "middle", "decoder", "blocks")]         # blocks: a DiT's
    size, heads = next(((name, h) for name, (w, h, _) in SIZES.items() if w == D), (D, 0))
    if "encoder.0.attn.q_norm.weight" in sd:
        heads = D // len(sd["encoder.0.attn.q_norm.weight"])
    if not heads:
        raise ValueError(f"cannot tell the attention heads of a released width-{D} model")
    cfg = ModelConfig("dit" if table else "sprint", size, p, input_size, 4,
                      len(sd["y_embedder.embedding_table.weight"]) - 1, D, heads,
                      (0, depths[3], 0) if table else depths[:3], diffusion="ddpm" if table
                      else "flow", positions="table" if table else "rope", qk_norm=not table)
    return cfg, sd


def checkpoint_weights(ckpt, path, ema=True, input_size=32):
    """(config, weights) of a read checkpoint: ours (EMA if asked and there) or a released one."""
    if "config" in ckpt:
        return ModelConfig(**ckpt["config"]), ckpt["ema" if ema and "ema" in ckpt else "model"]
    try:
        return from_released(ckpt["model"], input_size)
    except KeyError as e:
        raise ValueError(f"{path}: neither train.py's checkpoint nor a released SPRINT or DiT "
                         f"file (no {e})") from None


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

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--ckpt", help="default: the newest in --results-dir (with --pdg: SPRINT's)")
    p.add_argument("--results-dir", default="results", help="where train.py's runs are")
    p.add_argument("--image-size", type=int, default=256, help="released SPRINT files: 256 or 512")
    p.add_argument("--sampler", choices=["sde", "euler", "heun", "ddpm"], help="default: the "
                   "model's (sde, the official, for flow; ddpm for the DiT paper's)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=4.0, help="1: no guidance")
    p.add_argument("--pdg", action="store_true", help="path-drop guidance (SPRINT)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=[0.0, 1.0],
                   metavar=("LOW", "HIGH"), help="noise levels to guide at (1 is noise)")
    p.add_argument("--classes", type=int, nargs="+", help="labels, cycled (default: random)")
    p.add_argument("--num-samples", type=int, help="default: 16 (or --classes) or 50000 (.npz)")
    p.add_argument("--seed", type=int, default=0, help="sample i is seeded seed + i")
    p.add_argument("--per-proc-batch-size", type=int, default=64)
    p.add_argument("--out", help="a grid (.png, .jpg) or an .npz (default: samples/<ckpt>-<w>.png)")
    p.add_argument("--vae", help="diffusers AutoencoderKL (without: latents, for tools/)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)
    for name in ("steps", "per_proc_batch_size", "num_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not 0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
        p.error(f"--guidance-interval {args.guidance_interval}: need 0 <= LOW <= HIGH <= 1")
    if args.out and not args.out.lower().endswith((".npz", ".png", ".jpg")):
        p.error(f"--out {args.out}: give an .npz (samples for fid.py) or a .png/.jpg (a grid)")
    return args


def setup_distributed():
    """(rank, world size, device) from torchrun's environment; plain `python`: rank 0 of 1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def autocast(device):
    """bf16 autocast on CUDA; plain float32 on a CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


#################################################################################
#         A sampling run: the model, per-sample noise, shards, the output       #
#################################################################################

def sampling_model(args, device):
    """(model, sampler, latent scale, output path) for the flags, each checked where it enters."""
    if args.ckpt is None:                                  # run folders: NNN-model-size-patch
        pattern = f"{args.results_dir}/*-{'sprint' if args.pdg else '*'}-*/checkpoints/*.pt"
        if not glob.glob(pattern):
            raise ValueError(f"no checkpoint in {pattern}: train one with train.py, or give --ckpt")
        args.ckpt = max(glob.glob(pattern), key=os.path.getmtime)
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
    if args.out is None:
        folder, name = os.path.split(os.path.splitext(args.ckpt)[0])
        if os.path.basename(folder) == "checkpoints":            # results/NNN-.../checkpoints
            name = f"{os.path.basename(os.path.dirname(folder))}-{name}"
        args.out = f"samples/{name}-{'pdg' if args.pdg else 'cfg'}{args.cfg_scale:g}.png"
    path = args.out
    if cfg.in_channels == 4 and not args.vae:                   # latents, decoded later
        path = os.path.splitext(args.out)[0] + ".latents.npz"
    if os.path.exists(path):
        raise ValueError(f"--out {path} exists: choose another --out (nothing is overwritten)")
    scale = ckpt.get("args", {}).get("latent_scale") or LATENT_SCALE    # train.py's, else SD-VAE's
    return model.to(device), sampler, scale, path


def load_vae(path, device):
    """The SD VAE from diffusers, an optional extra imported only here."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError("--vae needs the optional package diffusers: pip install diffusers"
                         ) from None
    try:
        return AutoencoderKL.from_pretrained(path).to(device).eval()
    except (OSError, ValueError) as e:                   # no such folder, no network, not a VAE
        message = " ".join(str(e).split())
        raise ValueError(f"--vae {path}: not an AutoencoderKL ({message})") from None


def sample_inputs(indices, seed, classes, num_classes, shape, device):
    """Noise (B, *shape), labels (B,) and generators of the samples with these global indices:
    sample i draws its label, its initial noise, then its sampler's noise from a generator seeded
    seed + i, the same in any batch on any rank (and the noise whatever the label)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in indices]
    labels = [int(torch.randint(num_classes, (1,), generator=g)) for g in gens]
    if classes:
        labels = [classes[i % len(classes)] for i in indices]
    z = noise_like(torch.empty(len(gens), *shape, dtype=torch.float64, device=device), gens)
    return z, torch.tensor(labels, device=device), gens


def to_uint8(x):
    """Images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy (the ADM .npz layout)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def finish(x, vae=None, latent_scale=LATENT_SCALE):
    """Sampler output -> what is stored: {"arr_0": uint8 images}, or {"latents": ...} (no VAE)."""
    if x.shape[1] != 4:                                  # pixel space: the image in [-1, 1]
        return {"arr_0": to_uint8(x)}
    z = x.float() / latent_scale                         # SD-VAE latents, (B, 4, H/8, W/8)
    if vae is None:
        return {"latents": z.cpu().numpy()}
    with torch.autocast(x.device.type, enabled=False):   # decode in float32, as DiT does
        return {"arr_0": to_uint8(vae.decode(z).sample)}


def save_grid(x, path, nrow=None):
    """Images (B, 3, H, W) in [-1, 1] or uint8 (B, H, W, 3) -> a grid file, nrow a row."""
    imgs = to_uint8(x) if torch.is_tensor(x) else x
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
    try:
        model, sampler, latent_scale, path = sampling_model(args, device)
        flops = trajectory_flops(model, sampler, args.steps, **guidance)    # DDPM: --steps <= 1000
        cfg_flops = trajectory_flops(model, sampler, args.steps, **{**guidance, "pdg": False})
        vae = load_vae(args.vae, device) if args.vae and model.cfg.in_channels == 4 else None
    except ValueError as e:
        raise SystemExit(f"sample.py: error: {e}")
    net = torch.compile(model, dynamic=False) if args.compile else model
    cfg = model.cfg
    N = args.num_samples or (50_000 if path.endswith(".npz") else len(args.classes or [0] * 16))
    B = args.per_proc_batch_size
    settings = json.dumps([os.path.abspath(args.ckpt), sampler, args.steps, guidance, args.classes,
                           args.seed, N, B, args.vae, latent_scale]).encode()
    parts = f"{path}.parts-{hashlib.sha1(settings).hexdigest()[:10]}"
    shards = [os.path.join(parts, f"{k:06d}.npz") for k in range(math.ceil(N / B))]
    if rank == 0:
        print(f"{args.ckpt}: {cfg.model}-{cfg.size}/{cfg.patch_size}, {sampler}-{args.steps}, "
              f"{'PDG' if args.pdg else 'CFG'} {args.cfg_scale:g}: "
              f"{len(trajectory_passes(sampler, args.steps, **guidance))} model passes, "
              f"{flops / 1e12:.4g} forward TFLOPs per image (CFG's: {cfg_flops / 1e12:.4g})")
    os.makedirs(parts, exist_ok=True)
    start = time.perf_counter()
    todo = [k for k in range(rank, len(shards), world) if not os.path.exists(shards[k])]
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    for k in tqdm(todo, desc=f"rank 0 of {world}, batches of {B}", disable=rank != 0):
        z, y, gens = sample_inputs(range(k * B, min(k * B + B, N)), args.seed, args.classes,
                                   cfg.num_classes, shape, device)
        with autocast(device):
            x = sample(net, z, y, sampler, args.steps, gens, **guidance)
        np.savez(shards[k] + ".tmp.npz", **finish(x, vae, latent_scale), arr_1=y.cpu().numpy())
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
            print(f"{path} holds latents, not images (no --vae): decode them with "
                  f"tools/decode_latents.py (pip install diffusers)")
    if world > 1:
        dist.barrier()                                            # the merge, before the group ends
        dist.destroy_process_group()
    return path


if __name__ == "__main__":
    main()
