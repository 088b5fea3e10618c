"""
The backbone, the dense DiT baseline, and SPRINT (sparse-dense residual fusion), in one file.

SPRINT ("Sparse-Dense Residual Fusion for Efficient Diffusion Transformers", ICLR 2026,
arXiv 2510.21986) splits a diffusion transformer into a dense encoder f, a sparse middle g and a
dense decoder h:

    h_f = f(x)                                  all N tokens, shallow
    h_g = g(keep(h_f))                          M = (1 - drop)·N tokens, deep: most of the FLOPs
    out = h(fuse([pad(h_g, mask_token), h_f]))  all N tokens again; fuse is one Linear 2D -> D

Training keeps one token of each 2x2 group in g and drops g for 10% of the samples (path drop),
so that path-drop guidance's unconditional pass may skip g. The shared backbone (`--model dit`)
runs as SPRINT's SiT (flow matching, 2D RoPE, q/k RMSNorm) or as the DiT paper's model (DDPM, a
sin-cos table, no q/k norm). After DiT (Peebles & Xie, 2023), SiT (Ma et al., 2024), SPRINT's code.
"""
import functools
import math
from collections import namedtuple
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


#################################################################################
#                         Model sizes and configuration                         #
#################################################################################

# name: (hidden size D, attention heads, (encoder, middle, decoder) depths): SiT's/DiT's sizes, with
# SPRINT's splits (XL: 2/24/2, B: 2/8/2); toy: train.py's default, 0.74 M parameters at patch 2
SIZES = {
    "toy": (96, 4, (1, 2, 1)),
    "S": (384, 6, (2, 8, 2)),
    "B": (768, 12, (2, 8, 2)),
    "L": (1024, 16, (2, 20, 2)),
    "XL": (1152, 16, (2, 24, 2)),
}
DDPM_STEPS = 1000          # the DiT paper's diffusion: integer timesteps 0..999
# the DiT paper's model: DDPM with learned variance (2C outputs), 2D sin-cos table, no q/k norm
DIT_PAPER = {"diffusion": "ddpm", "positions": "table", "qk_norm": False}
# how a paper's official code trains (ModelConfig.paper_recipe); flip: "none" or "step"
Recipe = namedtuple("Recipe", "precision grad_clip flip")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model, stored in every checkpoint; fields left at 0 or () come
    from `size`. sparsedit.MODELS maps `model` to its class."""
    model: str = "sprint"            # dit | sprint | sparsedit
    size: str = "B"                  # a key of SIZES (or a name, with the next three fields given)
    patch_size: int = 2
    input_size: int = 32             # side of the (latent) image, e.g. 32 for 256 px SD-VAE latents
    in_channels: int = 4
    num_classes: int = 1000
    hidden_size: int = 0             # 0: from size
    num_heads: int = 0               # 0: from size
    depths: tuple = ()               # (encoder, middle, decoder); a DiT runs sum(depths) blocks
    mlp_ratio: float = 4.0
    extra: dict = field(default_factory=dict)   # SparseDiT's layout and density (sparsedit.py)
    # SPRINT's SiT: "flow", "rope", True; the DiT paper's: DIT_PAPER
    diffusion: str = "flow"
    positions: str = "rope"
    qk_norm: bool = True

    def __post_init__(self):
        hidden_size, num_heads, depths = SIZES.get(self.size, (0, 0, ()))
        self.hidden_size = self.hidden_size or hidden_size
        self.num_heads = self.num_heads or num_heads
        self.depths = tuple(self.depths or depths)
        if self.input_size % self.patch_size:
            raise ValueError(f"--patch-size {self.patch_size} does not divide the input side "
                             f"{self.input_size}")
        if self.hidden_size % (4 * self.num_heads):
            raise ValueError("2D RoPE and the sin-cos table need a head dimension divisible by 4")
        if self.model == "sprint" and self.diffusion == "ddpm":
            raise ValueError("--diffusion ddpm: SPRINT trains with flow matching; the DiT paper's "
                             "DDPM model is --model dit (or sparsedit)")
        if len(self.depths) != 3 or min(self.depths) < 0 or sum(self.depths) < 1:
            raise ValueError(f"--depths {' '.join(map(str, self.depths))}: give three block "
                             f"counts >= 0 (encoder, middle, decoder), at least one block in all")

    @property
    def grid(self):
        """Token grid side: N = grid**2 tokens."""
        return self.input_size // self.patch_size

    @property
    def out_channels(self):
        """C (a velocity), or 2C for DDPM's learned variance (noise, then the variance's v)."""
        return self.in_channels * (2 if self.diffusion == "ddpm" else 1)

    @property
    def paper_recipe(self):
        """How the official code trains this model: precision on CUDA, max gradient norm (0: none),
        flip. SPRINT's: bf16, clip 1.0, no flip; DiT's (DDPM): fp32 (TF32), half the images flipped
        each step; SparseDiT's: fp16, no flip (fast-DiT's features flip each image at extraction)."""
        if self.model == "sparsedit":
            return Recipe("fp16", 0.0, "none")
        if self.diffusion == "ddpm":
            return Recipe("fp32", 0.0, "step")
        return Recipe("bf16", 1.0, "none")


#################################################################################
#           Embedding layers, positions, attention, blocks                      #
#################################################################################

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def patchify(x, p):
    """(B, C, H, W) -> (B, N, C*p*p), each patch flattened in (channel, row, col) order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)   # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p, C):
    """(B, N, C*p*p) -> (B, C, H, W); inverse of patchify for a square grid."""
    B, N, _ = x.shape
    h = math.isqrt(N)
    x = x.reshape(B, h, h, C, p, p).permute(0, 3, 1, 4, 2, 5)              # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, h * p)


class PatchEmbed(nn.Module):
    """One Linear over each flattened patch (equal to DiT's stride-p convolution)."""
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size**2, hidden_size)

    def forward(self, x):
        return self.proj(patchify(x, self.patch_size))                     # (B, N, D)


class TimestepEmbedder(nn.Module):
    """t as the model's diffusion has it (flow: [0, 1], no x1000; DDPM: 0..999) ->
    [cos(t f), sin(t f)] with 128 frequencies -> MLP."""
    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t):
        half = self.freq_dim // 2
        steps = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000) * steps / half)
        args = t.float()[:, None] * freqs                                  # (B, 128)
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)   # (B, 256)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A class table with one more row: label num_classes is the null label of guidance."""
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


def sincos_table(grid, dim):
    """The DiT paper's fixed position table (N, dim), tokens row-major: the first half of the
    channels encodes the token's column, the second its row, each as [sin(pos w), cos(pos w)]
    with w_i = 10000^(-i / (dim/4)) (DiT's get_2d_sincos_pos_embed, from MAE)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))             # (dim/4,)
    row, col = np.divmod(np.arange(grid * grid), grid)

    def encode(pos):
        angles = np.outer(pos, omega)                                      # (N, dim/4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return torch.from_numpy(np.concatenate([encode(col), encode(row)], axis=1)).float()


def rope(pos, head_dim, theta=10000.0):
    """2D RoPE angles for positions pos (..., n, 2) -> (cos, sin), each (..., 1, n, head_dim/2): the
    first half of each head turns with the row, the second with the column (the official layout),
    channel pair i of a half of size h by pos * theta^(-2i/h); pos may be fractional (SparseDiT)."""
    h = head_dim // 2
    exponents = torch.arange(0, h, 2, device=pos.device, dtype=torch.float32) / h
    freqs = theta ** -exponents                                             # (h/2,)
    angles = torch.cat([pos[..., :1] * freqs, pos[..., 1:] * freqs], dim=-1)   # (..., n, d/2)
    angles = angles.unsqueeze(-3)
    return angles.cos(), angles.sin()


def apply_rope(x, cos_sin):
    """Rotate channel pairs (2i, 2i+1) of x (B, H, n, d) as complex numbers; computed in float32.
    cos_sin None (a model with a position table): x as it is."""
    if cos_sin is None:
        return x
    cos, sin = cos_sin
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)                    # (B, H, n, d/2) each
    rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """Per-head RMSNorm with a learnable weight (q/k normalisation), computed in float32."""
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv, q/k RMSNorm, 2D RoPE, SDPA (flash on GPU)."""
    def __init__(self, dim, num_heads, qk_norm=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def heads(self, x, chunks):
        """(B, n, chunks*D) -> `chunks` tensors (B, H, n, d), e.g. q, k, v from the fused qkv."""
        head_dim = x.shape[-1] // chunks // self.num_heads
        return x.unflatten(-1, (-1, self.num_heads, head_dim)).permute(2, 0, 3, 1, 4)

    def attend(self, q, k, v, q_rope, k_rope, mask=None):
        """Normalise and rotate q/k, attend (mask: (B, 1, 1, n_kv), False = a padded key), merge
        heads."""
        q = apply_rope(self.q_norm(q), q_rope)
        k = apply_rope(self.k_norm(k), k_rope)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)       # (B, H, n, d)
        return self.proj(x.transpose(1, 2).flatten(2))                     # (B, n, D)

    def forward(self, x, rope, mask=None):
        q, k, v = self.heads(self.qkv(x), 3)                               # 3 x (B, H, n, d)
        return self.attend(q, k, v, rope, rope, mask)


class Mlp(nn.Module):
    """Linear D -> 4D, GELU (tanh), Linear 4D -> D."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A transformer block with adaLN-Zero conditioning:
    x += gate * Attn(mod(LN(x))); x += gate * MLP(mod(LN(x)))."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope, mask=None):
        # c: (B, D) -> six (B, 1, D): shift, scale, gate for attention, then for the MLP
        modulation = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm + Linear D -> p*p*C_out, in (c, p1, p2) order."""
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size**2 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def block_macs(n, dim, mlp_ratio=4.0, n_kv=None):
    """Multiply-adds of one Block on n tokens (attending to n_kv keys; default n)."""
    n_kv = n if n_kv is None else n_kv
    adaln = 6 * dim**2                                      # Linear D -> 6D, once per image
    linears = n * (3 + 1 + 2 * mlp_ratio) * dim**2          # qkv, output proj, MLP D -> rD -> D
    attention = 2 * n * n_kv * dim                          # QK^T and AV over all heads
    return adaln + linears + attention


#################################################################################
#                       The shared backbone and the dense DiT                   #
#################################################################################

class Backbone(nn.Module):
    """What every model shares: patch, time and label embedding, positions (RoPE or the table), the
    final layer, DiT's initialisation, the cost accounting. cfg: a ModelConfig."""
    has_sparse_path = False          # SPRINT's deep path, which path drop and PDG skip

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.num_tokens = cfg.grid**2
        self.head_dim = D // cfg.num_heads
        self.x_embedder = PatchEmbed(p, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        self.final_layer = FinalLayer(D, p, cfg.out_channels)
        r = torch.arange(cfg.grid, dtype=torch.float32)
        # (row, col) of each token, row-major: (N, 2)
        self.register_buffer("pos", torch.cartesian_prod(r, r), persistent=False)
        if cfg.positions == "table":                   # fixed, and in DiT's checkpoints
            self.register_buffer("pos_embed", sincos_table(cfg.grid, D)[None])   # (1, N, D)

    def new_block(self, kind=Block):
        """A Block (or subclass) of this model's width, heads, MLP ratio and q/k norm."""
        cfg = self.cfg
        return kind(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm)

    def checkpoint_blocks(self):
        """Activation checkpointing (train.py's flag, the official use_checkpoint): a block keeps
        only its inputs for the backward pass, which runs it again for the rest."""
        for block in self.modules():
            if isinstance(block, Block):          # SparseDiT's Poolingformers and SDTMs' too
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)

    def rope(self, pos):
        """RoPE angles of token positions pos (..., n, 2); None with a position table."""
        return rope(pos, self.head_dim) if self.cfg.positions == "rope" else None

    def initialize_weights(self):
        """DiT's: xavier linears, N(0, .02) label table and t MLP, zero adaLN and final layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch starts closed
        for m in self.modules():
            if hasattr(m, "adaLN_modulation"):
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed(self, x, t, y):
        """Tokens (B, N, D), the table added if any; c = TimestepEmbed(t) + LabelEmbed(y) (B, D)."""
        h = self.x_embedder(x)
        if self.cfg.positions == "table":
            h = h + self.pos_embed
        return h, self.t_embedder(t) + self.y_embedder(y)

    def unembed(self, x, c):
        """(B, N, D) -> the prediction (B, C_out, H, W): velocity, or DDPM's noise and v."""
        return unpatchify(self.final_layer(x, c), self.cfg.patch_size, self.cfg.out_channels)

    def noise_level(self, t):
        """A time in the model's units -> [0, 1], 1 pure noise: flow's t, DDPM's timestep / 1000."""
        return t / DDPM_STEPS if self.cfg.diffusion == "ddpm" else t

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def sampling_kwargs(self, t):
        """Forward inputs for a batch that shares the time t (a number): SparseDiT's grid side."""
        return {}

    #### Cost: each model's flops() counts its own forward; these price a pass of each kind ####

    def embed_macs(self):
        """Multiply-adds outside the blocks: patch embed, timestep MLP, final layer (per image)."""
        cfg, D, N = self.cfg, self.cfg.hidden_size, self.num_tokens
        p2 = cfg.patch_size**2
        patch_embed = N * p2 * cfg.in_channels * D      # Linear p*p*C -> D per token
        t_mlp = 256 * D + D * D                         # frequencies -> D -> D, per image
        final = 2 * D * D + N * D * p2 * cfg.out_channels   # adaLN D -> 2D; Linear per token
        return patch_embed + t_mlp + final

    def training_flops(self, drop=0.0):
        """Forward FLOPs per image of a training forward as it runs (a step: about three)."""
        return self.flops()

    def pass_flops(self, t, skip_middle=False):
        """Forward FLOPs per image of one sampling pass at t (skip_middle: PDG's unconditional)."""
        return self.flops()


class DiT(Backbone):
    """The dense baseline: every block sees all N tokens (XL: 28 blocks)."""
    def __init__(self, cfg):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(self.new_block() for _ in range(sum(cfg.depths)))
        self.initialize_weights()

    def forward(self, x, t, y):
        h, c = self.embed(x, t, y)                                         # (B, N, D), (B, D)
        cos_sin = self.rope(self.pos)
        for block in self.blocks:
            h = block(h, c, cos_sin)
        return self.unembed(h, c)

    def flops(self):
        """Forward FLOPs per image (2 per multiply-add)."""
        cfg = self.cfg
        blocks = len(self.blocks) * block_macs(self.num_tokens, cfg.hidden_size, cfg.mlp_ratio)
        return 2 * (self.embed_macs() + blocks)


#################################################################################
#                         Token drop (SPRINT, Sec. 3.2)                         #
#################################################################################

def group_shape(drop, grid):
    """The smallest n x n group (n divides the grid) in which keeping k tokens drops exactly `drop`
    -> (n, k): 0.75 -> 2x2 keep 1, 0.5 -> 2x2 keep 2, 0.875 -> 4x4 keep 2, 0.625 -> 4x4 keep 6."""
    for n in range(2, grid + 1):
        k = (1 - drop) * n * n
        if grid % n == 0 and abs(k - round(k)) < 1e-6 and 1 <= round(k) < n * n:
            return n, round(k)
    raise ValueError(f"--drop {drop}: no n x n group of a {grid}x{grid} token grid keeps a whole "
                     f"number of tokens at this ratio; use e.g. 0.5, 0.75, 0.875 or --mask-type "
                     f"random")


def num_kept(drop, num_tokens):
    """M = (1 - drop) * N, a whole number of tokens, for 0 < drop < 1."""
    m = (1 - drop) * num_tokens
    if not 0 < drop < 1 or abs(m - round(m)) > 1e-6:
        raise ValueError(f"--drop {drop}: a token drop must lie in (0, 1) and keep a whole number "
                         f"of the {num_tokens} tokens")
    return round(m)


def sample_ids_keep(batch_size, grid, drop, mask_type="structured", device=None):
    """Kept token indices (B, M), row-major, drawn per sample on `device`. structured: k random
    tokens in each n x n group (the paper's); random: M anywhere (the ablation). No host sync."""
    M = num_kept(drop, grid * grid)
    if mask_type == "random":
        return torch.rand(batch_size, grid * grid, device=device).argsort(dim=1)[:, :M]
    n, k = group_shape(drop, grid)
    g = grid // n                                                          # groups per side
    scores = torch.rand(batch_size, g * g, n * n, device=device)
    pick = scores.argsort(-1)[..., :k]                                     # (B, G, k) within-group
    group = torch.arange(g * g, device=device)[:, None]                    # (G, 1)
    row = (group // g) * n + pick // n                                     # (B, G, k)
    col = (group % g) * n + pick % n
    return (row * grid + col).flatten(1)                                   # (B, G*k)


#################################################################################
#                 SPRINT: sparse-dense residual fusion (Sec. 3)                 #
#################################################################################

class SPRINT(Backbone):
    """Dense encoder f -> sparse middle g on the kept tokens -> fuse [h_g padded, h_f] ->
    dense decoder h."""
    has_sparse_path = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if min(cfg.depths) < 1:
            raise ValueError(f"--depths {' '.join(map(str, cfg.depths))}: SPRINT needs at least "
                             f"one encoder, one middle and one decoder block")
        n_enc, n_mid, n_dec = cfg.depths
        self.encoder = nn.ModuleList(self.new_block() for _ in range(n_enc))
        self.middle = nn.ModuleList(self.new_block() for _ in range(n_mid))
        self.decoder = nn.ModuleList(self.new_block() for _ in range(n_dec))
        # sparse-dense residual fusion: ~0.3% of the parameters at XL
        D = cfg.hidden_size
        self.fuse = nn.Linear(2 * D, D)
        # fills the dropped positions; a buffer, so it is never trained
        self.register_buffer("mask_token", torch.zeros(1, 1, D))
        self.initialize_weights()
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x, t, y, ids_keep=None, path_drop=None, skip_middle=False):
        """The prediction for x (B, C, H, W) at times t (B,), labels y (B,). ids_keep (B, M): the
        tokens the middle keeps (None: all); path_drop (B,) bool: these samples' middle outputs are
        mask tokens (training's 10%); skip_middle: the whole batch's, g not run (PDG's null pass)"""
        h, c = self.embed(x, t, y)                                         # (B, N, D), (B, D)
        cos_sin = self.rope(self.pos)
        for block in self.encoder:
            h = block(h, c, cos_sin)                                       # h_f: (B, N, D)
        h_g = self.deep_path(h, c, cos_sin, ids_keep, path_drop, skip_middle)  # (B, N, D)
        h = self.fuse(torch.cat([h_g, h], dim=-1))                         # (B, N, 2D) -> (B, N, D)
        for block in self.decoder:
            h = block(h, c, cos_sin)
        return self.unembed(h, c)

    def deep_path(self, h, c, cos_sin, ids_keep, path_drop, skip_middle):
        """The middle blocks on the kept tokens, scattered back among mask tokens."""
        B, N, D = h.shape
        mask = self.mask_token.to(h.dtype).expand(B, N, D)
        if skip_middle:                                                    # g does no work at all
            return mask
        h_g = h
        if ids_keep is not None:
            index = ids_keep.unsqueeze(-1).expand(-1, -1, D)               # (B, M, D)
            h_g = h.gather(1, index)                                       # (B, M, D)
            # kept tokens keep their positions
            cos_sin = self.rope(self.pos[ids_keep])
        for block in self.middle:
            h_g = block(h_g, c, cos_sin)
        if ids_keep is not None:
            h_g = mask.scatter(1, index, h_g)                              # (B, N, D)
        if path_drop is not None:
            # static shapes: the dropped samples' rows ran through g too; their result is discarded
            h_g = torch.where(path_drop[:, None, None], mask, h_g)
        return h_g

    def training_flops(self, drop=0.0):
        return self.flops(drop=drop)

    def pass_flops(self, t, skip_middle=False):
        return self.flops(skip_middle=skip_middle)

    def flops(self, drop=0.0, skip_middle=False):
        """Forward FLOPs per image (2 per multiply-add) at a token drop, or with g skipped."""
        cfg, N, D = self.cfg, self.num_tokens, self.cfg.hidden_size
        n_enc, n_mid, n_dec = cfg.depths
        dense = (n_enc + n_dec) * block_macs(N, D, cfg.mlp_ratio)
        fuse = N * 2 * D * D                                   # Linear 2D -> D per token
        macs = self.embed_macs() + dense + fuse
        if not skip_middle:
            macs += n_mid * block_macs(round((1 - drop) * N), D, cfg.mlp_ratio)
        return 2 * macs
