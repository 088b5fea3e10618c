"""
SparseDiT: token sparsification across layers and timesteps, on the backbone of sprint.py.

SparseDiT ("SparseDiT: Token Sparsification for Efficient Diffusion Transformer", NeurIPS 2025,
arXiv 2412.06028; first titled FlexDiT) cuts a DiT's depth into three segments, its tri-segment
architecture:

    Poolingformers   bottom: attention without Q and K, every token gets W_o · mean_j(W_v · x_j)
    SDTMs            middle: pool the N tokens to s x s sparse tokens X_s, run blocks on X_s,
                     recover the dense grid
    dense blocks     top: all N tokens, for high-frequency detail

and lets the sparse grid grow as denoising proceeds: s = 6 for the noisiest quarter of the
trajectory, then growing linearly to s = 10 at the data, for a 16 x 16 token grid. Layouts
[P Poolingformers, S SDTMs, K sparse blocks per SDTM, T dense top blocks], each SDTM =
1 sparse-generation + K sparse + 1 recovery + 1 dense block:

    XL (depth 28): [2, 4, 3, 2], the paper's    L (24): [2, 4, 2, 2]    S/B (12): [1, 2, 2, 1]

L and S/B keep XL's proportions (about 7% Poolingformers, 86% SDTMs, 7% dense top) and at least
2 SDTMs (one collapses in the paper's ablation). Mixed timesteps in one batch are exact and
sync-free: every sample is pooled to its own grid, padded to the largest side of the schedule, and
padded sparse tokens are masked out as keys and never upsampled (see `sparse_grid`).

As the paper runs it, SparseDiT is a conversion (`from_dit`): the released DiT-XL/2 (the DiT
paper's model: DDPM with learned variance, a position table, no q/k norm; sprint.ModelConfig's
diffusion, positions and qk_norm) becomes Poolingformers + SDTMs + dense top and is fine-tuned
with DiT's loss (`train.py --model sparsedit --init DiT-XL-2-256x256.pt`). Built on SPRINT's SiT
backbone (flow matching, RoPE, q/k norm) it converts a DiT that train.py trained, and compares
with SPRINT like for like. References: DiT (Peebles & Xie, 2023), SiT (Ma et al., 2024).

Where this differs from the paper, and why:
- Positions at the sparse/dense transitions. The paper re-adds sinusoidal encodings to the tokens
  there; its official code adds the table only at the input, and so does this one: the released
  DiT's blocks learned from tokens with the table added once, and a pooled token already holds the
  mean of its cell's table entries. With RoPE, positions live in attention: pooled tokens are
  rotated at the centres of their cells (`pooled_grid`), dense tokens at their own. Either way the
  module stays the identity at initialisation (W1 = 0, W2 = I, zero gates).
- The paper's FLOPs average its density schedule over the sampling steps (`flops`); a training
  step pads every sample to the largest grid and costs that (`training_flops`).
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sprint import SPRINT, Attention, Backbone, Block, DiT, block_macs, modulate


#################################################################################
#   Layouts (the tri-segment architecture) and the timestep-adaptive density    #
#################################################################################

# total depth: [Poolingformers, SDTMs, sparse blocks per SDTM, dense top blocks], with
# P + S * (K + 3) + T = depth. Depth 4 is train.py's toy model for the embedded data: one SDTM,
# which the paper finds collapses at scale.
LAYOUTS = {4: (1, 1, 0, 0), 12: (1, 2, 2, 1), 24: (2, 4, 2, 2), 28: (2, 4, 3, 2)}
# sparse grid sides for a 16 x 16 token grid (256 px, patch 2), scaled for other grids
DENSITY = (6, 10)
SPARSEST_FROM = 0.75       # noise levels in [0.75, 1] (the first quarter of sampling): smallest grid


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
        raise ValueError(f"--density {lo} {hi}: sparse grid sides must satisfy "
                         f"1 <= MIN <= MAX <= {g} (the token grid side)")
    return int(lo), int(hi)


def density_schedule(level, min_side, max_side):
    """Sparse grid side for noise levels (tensor, 1 = pure noise): min_side on [0.75, 1], growing
    linearly to max_side at 0 (the paper's timestep-adaptive token density: fewest tokens while the
    input is noisiest; with DDPM's 250 steps the first quarter of them, timesteps >= 750)."""
    frac = (level.float() / SPARSEST_FROM).clamp(0, 1)             # 1 while noisiest, 0 at the data
    return torch.round(max_side - (max_side - min_side) * frac).long()


def pooled_grid(grid, side):
    """Adaptive average pooling of a grid x grid token grid to side x side -> the averaging matrix
    pool (side², grid²), the cells' centres pos (side², 2) (fractional: where pooled tokens sit for
    RoPE), and up (grid²,), the cell each dense token reads in nearest upsampling. Cells are
    F.adaptive_avg_pool2d's, [floor(i g / s), ceil((i + 1) g / s)); F.interpolate's nearest reads
    cell floor(r s / g), which contains row r."""
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
    """A Block attending from x to ctx (both through this block's LayerNorm and adaLN): sparse
    token generation and recovery."""
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
    X) -> K sparse transformer blocks -> sparse-dense token recovery (X_m = Up(X_s) W1 + X W2
    attends to X_s) -> one dense block."""
    def __init__(self, new_block, dim, n_sparse):
        super().__init__()
        self.generation = new_block(CrossBlock)
        self.sparse = nn.ModuleList(new_block() for _ in range(n_sparse))
        self.recovery = new_block(CrossBlock)
        # X_m = Up(X_s) W1 + X W2 with W1 = 0, W2 = I: the module starts as the identity on X
        self.W1 = nn.Parameter(torch.zeros(dim, dim))
        self.W2 = nn.Parameter(torch.eye(dim))
        self.dense = new_block()

    def forward(self, x, c, rope, grid: SparseGrid):
        xs = grid.pool @ x                                         # X_s = AvgPool(X): (B, S, D)
        xs = self.generation(xs, x, c, grid.rope, rope)            # Q = X_s, K = V = X
        for block in self.sparse:
            # padded sparse tokens are no keys
            xs = block(xs, c, grid.rope, grid.mask)
        up = torch.take_along_dim(xs, grid.up, dim=1)              # Up(X_s), nearest: (B, N, D)
        xm = up @ self.W1 + x @ self.W2                            # X_m
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
        # (sides, S_max): True for real sparse tokens, False for padding
        self.register_buffer("grid_real", real, persistent=False)
        self.initialize_weights()

    def grid_side(self, t):
        """The sparse grid side of each sample, (B,) long, from its own t (B,)."""
        return density_schedule(self.noise_level(t), self.min_side, self.max_side)

    def sampling_kwargs(self, t):
        """A sampling batch shares one t (a number): run that t's grid unpadded, with no mask."""
        return {"side": int(self.grid_side(torch.tensor([t])))}

    def sparse_grid(self, t, side=None):
        """Each sample's own grid from its t, padded to the largest side; or one unpadded `side` for
        the batch. Padding keeps shapes static (no host sync, one compiled graph) and is exact:
        padded sparse tokens are masked out as keys and no dense token reads them. It costs the
        largest grid's work whatever t is (training_flops); a sampler, whose batch shares one t,
        passes side=grid_side(t) and runs that grid alone (flops)."""
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
        """Multiply-adds per image with a side x side sparse grid (1 per multiply-add: the paper's
        "FLOPs")."""
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
        """Forward FLOPs per image (2 per multiply-add) at time t (a number), or the mean over times
        t (1-D); t=None: the mean over 1000 uniform noise levels, i.e. over a sampling trajectory
        (the paper's figure)."""
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

    # parts of a DiT's fused qkv (thirds Q, K, V) that initialise the Poolingformer's and
    # cross-attention's linears
    QKV_PARTS = {"attn.v.": slice(2, 3), "attn.q.": slice(0, 1), "attn.kv.": slice(1, 3)}

    def layers(self):
        """(name prefix, block) for the depth-many blocks in depth order: DiT block i initialises
        layer i."""
        return [(name + ".", m) for name, m in self.named_modules() if isinstance(m, Block)]

    def from_dit(self, dit):
        """A dense DiT's state dict (named as sprint.DiT's) mapped onto this model: blocks in order,
        Q/K/V slices, recovery W1 = 0, W2 = I. The depths must agree (checked here); widths,
        patches and classes are load_state_dict's to check."""
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
        D = self.cfg.hidden_size
        for j in range(len(self.sdtms)):
            sd[f"sdtms.{j}.W1"] = torch.zeros(D, D)
            sd[f"sdtms.{j}.W2"] = torch.eye(D)
        return sd


#################################################################################
#                  The models of both papers, by name (--model)                 #
#################################################################################

MODELS = {"dit": DiT, "sprint": SPRINT, "sparsedit": SparseDiT}
