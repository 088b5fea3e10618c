"""
SparseDiT on the backbone of sprint.py, and the DiT paper's diffusion (DDPM) that SparseDiT's paper
converts a released DiT from and fine-tunes with.

SparseDiT ("SparseDiT: Token Sparsification for Efficient Diffusion Transformer", NeurIPS 2025,
arXiv 2412.06028) cuts a DiT's depth into three segments:

    Poolingformers   bottom: attention without Q and K, every token gets W_o · mean_j(W_v · x_j)
    SDTMs            middle: pool the N tokens to s x s sparse tokens, run blocks on them, recover
    dense blocks     top: all N tokens, for high-frequency detail

and grows the sparse grid as denoising proceeds: 6 x 6 on the noisiest quarter of the trajectory,
then linearly to 10 x 10 at the data (16 x 16 tokens). As the paper runs it, the released DiT-XL/2
is converted (`from_dit`) and fine-tuned with DiT's loss (`DDPM.losses`); on SPRINT's backbone, a
DiT train.py trained. References: DiT (Peebles & Xie, 2023), SiT (Ma et al.), changsn/SparseDiT.
"""
import itertools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sprint import DDPM_STEPS, SPRINT, Attention, Backbone, Block, DiT, block_macs, modulate


#################################################################################
#   Layouts (the tri-segment architecture) and the timestep-adaptive density    #
#################################################################################

# depth: [P Poolingformers, S SDTMs of K sparse blocks, T dense], P + S (K + 3) + T = depth; XL's is
# the paper's, L and S/B keep its proportions and >= 2 SDTMs (1 collapses, its ablation); 4: toy's
LAYOUTS = {4: (1, 1, 0, 0), 12: (1, 2, 2, 1), 24: (2, 4, 2, 2), 28: (2, 4, 3, 2)}
DENSITY = (6, 10)          # sparse grid sides for 16 x 16 tokens (256 px), scaled for other grids
SPARSEST_FROM = 0.75       # noise levels in [0.75, 1], sampling's first quarter: the smallest grid


def parse_layout(cfg):
    """cfg.extra["layout"] (or the depth's default) as (P, S, K, T), checked against the depth."""
    depth = sum(cfg.depths)
    if "layout" not in cfg.extra and depth not in LAYOUTS:
        raise ValueError(f"--layout: no default layout for depth {depth}; give --layout P,S,K,T "
                         f"with P + S*(K+3) + T = {depth}")
    layout = tuple(int(n) for n in cfg.extra.get("layout", LAYOUTS.get(depth)))
    if len(layout) != 4 or min(layout) < 0 or layout[1] < 1:
        raise ValueError(f"--layout {layout}: give four counts P,S,K,T >= 0 with at least one SDTM")
    P, S, K, T = layout
    if P + S * (K + 3) + T != depth:
        raise ValueError(f"--layout {P},{S},{K},{T} has depth {P + S * (K + 3) + T} "
                         f"(P + S*(K+3) + T) but --size {cfg.size} has depth {depth}")
    return layout


def parse_density(cfg):
    """cfg.extra["density"] (or 6 -> 10 scaled to the token grid) as (min_side, max_side)."""
    g = cfg.grid
    lo, hi = cfg.extra.get("density", [max(1, round(s * g / 16)) for s in DENSITY])
    if not 1 <= lo <= hi <= g:
        raise ValueError(f"--density {lo} {hi}: sparse grid sides need 1 <= MIN <= MAX <= {g}, "
                         f"the token grid's side")
    return int(lo), int(hi)


def density_schedule(level, min_side, max_side):
    """Sparse grid side for noise levels (tensor, 1 = pure noise): min_side on [0.75, 1], growing
    linearly to max_side at 0 (the paper's timestep-adaptive density; DDPM: timesteps >= 750)."""
    frac = (level.float() / SPARSEST_FROM).clamp(0, 1)             # 1 while noisiest, 0 at the data
    return torch.round(max_side - (max_side - min_side) * frac).long()


def pooled_grid(grid, side):
    """Adaptive average pooling of grid x grid tokens to side x side -> the averaging matrix pool
    (side², grid²), the cells' centres pos (side², 2) (pooled tokens' RoPE positions), up (grid²,)
    the cell each dense token reads in nearest upsampling. Cells: F.adaptive_avg_pool2d's, [floor(i
    g / s), ceil((i + 1) g / s)); F.interpolate's nearest reads cell floor(r s / g), with row r."""
    i = torch.arange(side)
    start = (i * grid) // side
    end = -((-(i + 1) * grid) // side)
    r = torch.arange(grid)
    inside = (r >= start[:, None]) & (r < end[:, None])                   # (side, grid)
    avg = inside / (end - start)[:, None]
    centre = (start + end - 1) / 2                                        # (side,)
    pos = torch.stack(torch.meshgrid(centre, centre, indexing="ij"), dim=-1).reshape(-1, 2)
    cell = (r * side) // grid
    return torch.kron(avg, avg), pos, (cell[:, None] * side + cell).flatten()


class SparseGrid(NamedTuple):
    """The sparse tokens' pooling, upsampling, RoPE and padding mask of a forward."""
    pool: torch.Tensor       # (B, S, N) or (S, N): X_s = pool @ X
    up: torch.Tensor         # (B, N, 1): sparse token read by each dense token
    rope: tuple              # (cos, sin) at the cell centres
    mask: torch.Tensor       # (B, 1, 1, S): False marks padded sparse tokens; None without padding


#################################################################################
#     Poolingformer and the Sparse-Dense Token Module (SDTM) of the paper       #
#################################################################################

class PoolingAttention(nn.Module):
    """The paper's Poolingformer attention: self-attention with Q and K removed (the bottom layers'
    attention maps are near uniform), so every token gets W_o · mean_j(W_v · x_j)."""
    def __init__(self, dim):
        super().__init__()
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None, mask=None):
        # W_v is linear, so mean_j(W_v x_j) = W_v mean_j(x_j): O(N D + D²), never an N x N matrix;
        # the (B, 1, D) result broadcasts to all tokens
        return self.proj(self.v(x.mean(dim=1, keepdim=True)))


class Poolingformer(Block):
    """A Block whose attention is pooling attention; adaLN-Zero and MLP unchanged."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=True):
        super().__init__(dim, num_heads, mlp_ratio, qk_norm)
        self.attn = PoolingAttention(dim)


class CrossAttention(Attention):
    """Queries from x, keys and values from ctx, each sequence with its own RoPE positions."""
    def __init__(self, dim, num_heads, qk_norm=True):
        super().__init__(dim, num_heads, qk_norm)
        del self.qkv                                           # q and kv see different sequences
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)

    def forward(self, x, ctx, rope, ctx_rope, mask=None):
        (q,) = self.heads(self.q(x), 1)                                    # (B, H, n, d)
        k, v = self.heads(self.kv(ctx), 2)                                 # 2 x (B, H, n_kv, d)
        return self.attend(q, k, v, rope, ctx_rope, mask)


class CrossBlock(Block):
    """A Block attending from x to ctx, both through its LayerNorm and adaLN (SDTM's ends)."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=True):
        super().__init__(dim, num_heads, mlp_ratio, qk_norm)
        self.attn = CrossAttention(dim, num_heads, qk_norm)

    def forward(self, x, ctx, c, rope, ctx_rope, mask=None):
        modulation = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        # what the DiT's K, V slices were fed: the modulated, normalised context
        ctx = modulate(self.norm1(ctx), shift_msa, scale_msa)
        query = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa * self.attn(query, ctx, rope, ctx_rope, mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class SDTM(nn.Module):
    """The paper's Sparse-Dense Token Module: sparse token generation (X_s = AvgPool(X) attends to
    X) -> K sparse blocks -> recovery (X_m = Up(X_s) W1 + X W2 attends to X_s) -> a dense block."""
    def __init__(self, new_block, dim, n_sparse):
        super().__init__()
        self.generation = new_block(CrossBlock)
        self.sparse = nn.ModuleList(new_block() for _ in range(n_sparse))
        self.recovery = new_block(CrossBlock)
        # X_m = Up(X_s) W1 + X W2, with biases (the official merged_layer1 and merged_layer2)
        self.W1 = nn.Linear(dim, dim)
        self.W2 = nn.Linear(dim, dim)
        self.dense = new_block()

    def forward(self, x, c, rope, grid: SparseGrid):
        xs = grid.pool @ x                                         # X_s = AvgPool(X): (B, S, D)
        xs = self.generation(xs, x, c, grid.rope, rope)            # Q = X_s, K = V = X
        for block in self.sparse:
            xs = block(xs, c, grid.rope, grid.mask)                # padded tokens are no keys
        up = torch.take_along_dim(xs, grid.up, dim=1)              # Up(X_s), nearest: (B, N, D)
        xm = self.W1(up) + self.W2(x)                              # X_m
        x = self.recovery(xm, xs, c, rope, grid.rope, grid.mask)   # Q = X_m, K = V = X_s
        return self.dense(x, c, rope)


#################################################################################
#                               The SparseDiT model                             #
#################################################################################

class SparseDiT(Backbone):
    """Poolingformers -> SDTMs -> dense top blocks, with a sparse grid side that follows t."""
    def __init__(self, cfg):
        super().__init__(cfg)
        P, S, K, T = self.layout = parse_layout(cfg)
        self.min_side, self.max_side = parse_density(cfg)
        self.poolingformers = nn.ModuleList(self.new_block(Poolingformer) for _ in range(P))
        self.sdtms = nn.ModuleList(SDTM(self.new_block, cfg.hidden_size, K) for _ in range(S))
        self.top = nn.ModuleList(self.new_block() for _ in range(T))
        # every side of the schedule, stacked and padded to the largest (S_max = max_side² tokens)
        sides = range(self.min_side, self.max_side + 1)
        pools, positions, ups = zip(*(pooled_grid(cfg.grid, s) for s in sides))
        n = self.max_side**2
        pool = torch.stack([F.pad(a, (0, 0, 0, n - len(a))) for a in pools])
        pos = torch.stack([F.pad(a, (0, 0, 0, n - len(a))) for a in positions])
        real = torch.arange(n) < torch.tensor([len(p) for p in positions])[:, None]
        self.register_buffer("grid_pool", pool, persistent=False)         # (sides, S_max, N)
        self.register_buffer("grid_pos", pos, persistent=False)           # (sides, S_max, 2)
        self.register_buffer("grid_up", torch.stack(ups), persistent=False)   # (sides, N)
        self.register_buffer("grid_real", real, persistent=False)         # False: padding
        self.initialize_weights()
        for sdtm in self.sdtms:              # X_m = X at first: the SDTM starts as the identity
            nn.init.zeros_(sdtm.W1.weight)
            nn.init.eye_(sdtm.W2.weight)
            nn.init.zeros_(sdtm.W1.bias)
            nn.init.zeros_(sdtm.W2.bias)

    def grid_side(self, t):
        """The sparse grid side of each sample, (B,) long, from its own t (B,)."""
        return density_schedule(self.noise_level(t), self.min_side, self.max_side)

    def sampling_kwargs(self, t):
        """A sampling batch shares one t (a number): run that t's grid unpadded, with no mask."""
        return {"side": int(self.grid_side(torch.tensor([t])))}

    def sparse_grid(self, t, side=None):
        """Each sample's own grid from its t, padded to the largest side (static shapes, no host
        sync; exact: padded sparse tokens are masked out as keys and no dense token reads them), at
        the largest grid's cost (training_flops); or one unpadded `side` (a sampler's batch)."""
        if side is None:
            k = self.grid_side(t) - self.min_side              # (B,) index into the stacked grids
            pool, pos, up = self.grid_pool[k], self.grid_pos[k], self.grid_up[k]
            mask = self.grid_real[k][:, None, None, :] if self.max_side > self.min_side else None
        else:
            k = side - self.min_side
            pool, pos = self.grid_pool[k, :side * side], self.grid_pos[k, :side * side]
            up, mask = self.grid_up[k].expand(len(t), -1), None
        return SparseGrid(pool, up[..., None], self.rope(pos), mask)

    def forward(self, x, t, y, side=None):
        """The prediction for x (B, C, H, W) at times t (B,) and labels y (B,); side: one grid side
        for the batch."""
        h, c = self.embed(x, t, y)                                         # (B, N, D), (B, D)
        cos_sin = self.rope(self.pos)
        grid = self.sparse_grid(t, side)
        for block in self.poolingformers:
            h = block(h, c, cos_sin)
        for sdtm in self.sdtms:
            h = sdtm(h, c, cos_sin, grid)
        for block in self.top:
            h = block(h, c, cos_sin)
        return self.unembed(h, c)

    #### FLOPs ####

    def macs(self, side):
        """Multiply-adds per image with a side x side sparse grid (the paper's "FLOPs")."""
        N, D, r = self.num_tokens, self.cfg.hidden_size, self.cfg.mlp_ratio
        P, S, K, T = self.layout
        n = side * side

        def cross(q, kv):
            """A CrossBlock, q tokens attending to kv; its K, V projections run on the kv tokens."""
            return block_macs(q, D, r, n_kv=kv) + 2 * (kv - q) * D * D

        pooling = (6 * D * D                           # adaLN D -> 6D, per image
                   + N * D                             # the mean over the N tokens
                   + 2 * D * D                         # W_v and W_o on that one mean token
                   + 2 * r * N * D * D)                # MLP D -> rD -> D, per token
        sdtm = (N * D                                  # AvgPool: each dense token added once
                + cross(n, N)                          # sparse token generation, Q = X_s
                + K * block_macs(n, D, r)              # K sparse blocks on n = side² tokens
                + 2 * N * D * D                        # X_m = Up(X_s) W1 + X W2
                + cross(N, n)                          # sparse-dense recovery, Q = X_m
                + block_macs(N, D, r))                 # the dense block
        top = T * block_macs(N, D, r)                  # the dense top blocks
        return self.embed_macs() + P * pooling + S * sdtm + top

    def training_flops(self, drop=0.0):
        """What a training step runs: every sample padded to the largest grid."""
        return 2 * self.macs(self.max_side)

    def pass_flops(self, t, skip_middle=False):
        return self.flops(t)

    def flops(self, t=None):
        """Forward FLOPs per image (2 per multiply-add) at time t, or their mean over times t (1-D);
        None: over 1000 uniform noise levels, a sampling trajectory (the paper's figure)."""
        cpu = torch.device("cpu")                      # also for a model built on "meta"
        if t is None:
            level = torch.linspace(0, 1, 1000, device=cpu)
        else:
            level = self.noise_level(torch.as_tensor(t, device=cpu).float().reshape(-1))
        schedule = density_schedule(level, self.min_side, self.max_side)
        sides, counts = torch.unique(schedule, return_counts=True)
        total = sum(c * self.macs(s) for s, c in zip(sides.tolist(), counts.tolist()))
        return 2 * total / len(level)

    #### Initialisation from a dense DiT ####

    # thirds of a DiT's fused qkv (Q, K, V) that initialise Poolingformers' and cross-attention's
    QKV_PARTS = {"attn.v.": slice(2, 3), "attn.q.": slice(0, 1), "attn.kv.": slice(1, 3)}

    def layers(self):
        """(name prefix, block) of the blocks in depth order: DiT block i initialises layer i."""
        return [(name + ".", m) for name, m in self.named_modules() if isinstance(m, Block)]

    def from_dit(self, dit):
        """A dense DiT's state dict (sprint.DiT's names) mapped onto this model: blocks in order,
        Q/K/V slices, W1 = 0, W2 = I; depths checked here, the rest by load_state_dict."""
        depth = len({key.split(".")[1] for key in dit if key.startswith("blocks.")})
        if depth != len(self.layers()):
            raise ValueError(f"a DiT of depth {depth} cannot initialise a SparseDiT of depth "
                             f"{len(self.layers())}: give the DiT's --size (or --depths)")
        # the embedders and the final layer as they are
        sd = {k: v for k, v in dit.items() if not k.startswith("blocks.")}
        for i, (prefix, layer) in enumerate(self.layers()):
            for key in layer.state_dict():
                part = next((p for p in self.QKV_PARTS if key.startswith(p)), None)
                if part is None:
                    sd[prefix + key] = dit[f"blocks.{i}.{key}"]
                else:                                  # e.g. attn.kv.weight <- qkv.weight[D:]
                    qkv = dit[f"blocks.{i}.attn.qkv.{key[len(part):]}"]
                    thirds = qkv.unflatten(0, (3, -1))
                    sd[prefix + key] = thirds[self.QKV_PARTS[part]].flatten(0, 1)
        # the recovery linears as a new model has them: W1 = 0, W2 = I, zero biases
        sd.update({k: v for k, v in self.state_dict().items() if ".W1." in k or ".W2." in k})
        return sd


#################################################################################
#   The DiT paper's diffusion: SparseDiT's paper fine-tunes and samples with it #
#################################################################################

def space_timesteps(steps, num_timesteps=DDPM_STEPS):
    """DiT's space_timesteps(1000, str(steps)): strided over 0..999, a running float sum rounded."""
    if steps > num_timesteps:
        raise ValueError(f"--steps {steps}: DDPM keeps at most its {num_timesteps} timesteps")
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1
    return [round(position) for position in itertools.accumulate([0.0] + [stride] * (steps - 1))]


class DDPM:
    """DiT's create_diffusion: 1000 linear betas from 1e-4 to 0.02, `timesteps` of them kept (their
    betas follow from alpha_bar there; the network sees the original timestep); x_t = sqrt(alpha_
    bar) x_0 + sqrt(1 - alpha_bar) eps. Coefficients in float64, used in float32, as DiT's are."""
    def __init__(self, timesteps=range(DDPM_STEPS), device="cpu"):
        self.timesteps = list(timesteps)
        alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, DDPM_STEPS))[self.timesteps]
        prev = np.append(1.0, alpha_bar[:-1])
        beta = 1 - alpha_bar / prev
        beta_tilde = beta * (1 - prev) / (1 - alpha_bar)
        coefficients = dict(sqrt_alpha_bar=np.sqrt(alpha_bar),
                            sqrt_one_minus_alpha_bar=np.sqrt(1 - alpha_bar),
                            sqrt_recip_alpha_bar=np.sqrt(1 / alpha_bar),
                            sqrt_recip_alpha_bar_minus_1=np.sqrt(1 / alpha_bar - 1),
                            posterior_x0=beta * np.sqrt(prev) / (1 - alpha_bar),
                            posterior_xt=(1 - prev) * np.sqrt(1 - beta) / (1 - alpha_bar),
                            log_beta_tilde=np.log(np.append(beta_tilde[1], beta_tilde[1:])),
                            log_beta=np.log(beta))
        self.coef = {k: torch.tensor(v, dtype=torch.float32, device=device)
                     for k, v in coefficients.items()}

    def at(self, name, i):
        """Coefficient `name` at respaced indices i (B,), shaped to broadcast over (B, C, H, W)."""
        return self.coef[name][i].view(-1, 1, 1, 1)

    def posterior_mean(self, x0, x, i):
        """The mean of q(x_{i-1} | x_i = x, x_0 = x0)."""
        return self.at("posterior_x0", i) * x0 + self.at("posterior_xt", i) * x

    def p_mean_variance(self, out, x, i):
        """DiT's p_mean_variance (clip_denoised=False) of the output out = [eps, v] (B, 2C, H, W)
        at x (B, C, H, W) -> (mean, log variance, predicted x0): v in [-1, 1] interpolates the log
        variance between log beta tilde and log beta (the learned range)."""
        eps, v = out.chunk(2, dim=1)
        frac = (v + 1) / 2
        log_variance = frac * self.at("log_beta", i) + (1 - frac) * self.at("log_beta_tilde", i)
        x0 = (self.at("sqrt_recip_alpha_bar", i) * x
              - self.at("sqrt_recip_alpha_bar_minus_1", i) * eps)
        return self.posterior_mean(x0, x, i), log_variance, x0

    def losses(self, model, x, y, t, eps):
        """DiT's training_losses per sample at timesteps t (B,) -> (the noise's mse, vb: the learned
        variance's KL(q(x_{t-1} | x_t, x) || p(x_{t-1} | x_t)), the mean frozen, bits per dim)."""
        x_t = self.at("sqrt_alpha_bar", t) * x + self.at("sqrt_one_minus_alpha_bar", t) * eps
        eps_pred, v = model(x_t, t, y).float().chunk(2, dim=1)
        mean, log_var, _ = self.p_mean_variance(torch.cat([eps_pred.detach(), v], 1), x_t, t)
        true_log_var = self.at("log_beta_tilde", t)
        kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (self.posterior_mean(x, x_t, t) - mean) ** 2 * torch.exp(-log_var))

        def cdf(v):                              # the tanh approximation of the normal CDF
            return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v.pow(3))))
        inv_std = torch.exp(-0.5 * log_var)
        upper = cdf(inv_std * (x - mean + 1 / 255))
        lower = cdf(inv_std * (x - mean - 1 / 255))
        # the probability of x's bin of width 2/255; the outermost bins reach to infinity
        p = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1 - lower, upper - lower))
        nll = -torch.log(p.clamp(min=1e-12))
        vb = torch.where(t == 0, nll.mean((1, 2, 3)), kl.mean((1, 2, 3))) / math.log(2.0)
        return (eps - eps_pred).pow(2).mean((1, 2, 3)), vb


#################################################################################
#                  The models of both papers, by name (--model)                 #
#################################################################################

MODELS = {"dit": DiT, "sprint": SPRINT, "sparsedit": SparseDiT}
