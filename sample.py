"""
Sampling from SiT / SPRINT / SparseDiT models: SDE, Euler and Heun samplers, classifier-free guidance (CFG)
and path-drop guidance (PDG, SPRINT Sec. 3.4).

The model predicts the velocity v = eps - x of the linear path x_t = (1 - t) x + t eps; sampling integrates
from t = 1 (noise) to t = 0 (data). Guidance mixes a conditional and an unconditional velocity,
v_u + w (v_c - v_u). With CFG v_u is the same network with the null label; with PDG it is the network with the
null label *and its deep sparse path skipped* (mask tokens in its place), which costs only the dense encoder
and decoder blocks.
"""
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


#################################################################################
#                      Distributed setup and image output                       #
#################################################################################

def setup_distributed():
    """(rank, world_size, device) from torchrun's environment; a plain `python` run is rank 0 of 1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def to_uint8(x):
    """Images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy (the ADM .npz layout)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x, path, nrow=None):
    """Images (B, 3, H, W) in [-1, 1] -> one PNG with nrow images per row (default: about square)."""
    imgs = to_uint8(x)
    B, H, W, C = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = np.full((rows * (H + 2) + 2, nrow * (W + 2) + 2, C), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        grid[2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = img
    Image.fromarray(grid.squeeze(-1) if C == 1 else grid).save(path)


#################################################################################
#                  Guided velocity: CFG and path-drop guidance                  #
#################################################################################

def guided_velocity(model, x, t, y, cfg_scale=1.0, pdg=False, interval=(0.0, 1.0)):
    """Velocity at the shared time t (a float) for x (B, C, H, W) and labels y (B,).

    Guidance applies only for t inside `interval`; outside it, or at scale 1, one conditional pass.
    CFG batches the conditional and unconditional inputs in one forward of 2B; PDG runs the full model on
    the conditional half and the model without its middle blocks (path_drop=True) on the null-label half.
    """
    tt = torch.full((x.shape[0],), t, device=x.device)
    if cfg_scale == 1.0 or not interval[0] <= t <= interval[1]:
        return model(x, tt, y)
    null = torch.full_like(y, model.cfg.num_classes)
    if pdg:
        v_cond, v_uncond = model(x, tt, y), model(x, tt, null, path_drop=True)
    else:
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])).chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def guided_passes(t, cfg_scale=1.0, pdg=False, interval=(0.0, 1.0)):
    """The forward passes one step costs per image: [(t, path_drop), ...] (for FLOPs accounting)."""
    if cfg_scale == 1.0 or not interval[0] <= t <= interval[1]:
        return [(t, False)]
    return [(t, False), (t, pdg)]


#################################################################################
#                                   Samplers                                    #
#################################################################################

def time_grid(sampler, steps):
    """The times the sampler visits, from 1 to 0. SDE: linspace(1, 0.04, steps) then a last step to 0."""
    if sampler == "sde":
        return torch.linspace(1.0, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def randn_per_sample(shape, generators, device):
    """(len(generators), *shape) standard normal noise, one generator per sample: batching-independent."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in generators]).to(device)


@torch.no_grad()
def sample(model, z, y, sampler="sde", steps=250, generators=None, **guidance):
    """Integrate from noise z (B, C, H, W) at t = 1 to data at t = 0 -> (B, C, H, W) float32.

    sde: the official Euler-Maruyama sampler (as in SiT/REPA/SPRINT): diffusion w(t) = 2t, drift
         v - w/2 * score with the score from the velocity, score = -(x + (1 - t) v) / t; the last step
         (0.04 -> 0) is the deterministic mean. `generators` (one per sample) draw its noise.
    euler / heun: the probability-flow ODE dx/dt = v on linspace(1, 0, steps + 1).
    The state is kept in float64, the model runs in float32 (bf16 under autocast on CUDA).
    """
    if sampler not in ("sde", "euler", "heun"):
        raise ValueError(f"--sampler {sampler!r}: choose sde, euler or heun")

    def velocity(x, t):
        return guided_velocity(model, x.float(), t, y, **guidance).double()

    ts = time_grid(sampler, steps)
    x = z.double()
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t                                                   # < 0
        v = velocity(x, t)
        if sampler == "sde":
            score = -(x + (1 - t) * v) / t
            x = x + (v - t * score) * dt                                   # w/2 * score with w = 2t
            if i < len(ts) - 2:                                            # no noise on the last step
                noise = randn_per_sample(x.shape[1:], generators, x.device) if generators else torch.randn_like(x)
                x = x + math.sqrt(2 * t * -dt) * noise
        elif sampler == "heun":
            x_euler = x + v * dt
            x = x + 0.5 * (v + velocity(x_euler, t_next)) * dt
        else:
            x = x + v * dt
    return x.float()


def trajectory_flops(model, sampler="sde", steps=250, **guidance):
    """Forward FLOPs per image of one whole sampling run (every model pass the sampler makes)."""
    ts = time_grid(sampler, steps)
    evals = [(t, t_next) for t, t_next in zip(ts[:-1], ts[1:])]
    times = [t for t, _ in evals] + ([t_next for _, t_next in evals] if sampler == "heun" else [])
    return sum(model.flops(path_drop=pd, t=tp) for t in times for tp, pd in guided_passes(t, **guidance))
