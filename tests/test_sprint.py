"""sprint.py as a specification: the official SPRINT outputs (the released file's layout, read as
sample.py reads it), token drop, path drop, RoPE, sizes, initialisation, one compiled graph, FLOPs
against the papers and against what a forward runs."""
import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sample import load_model
from sparsedit import MODELS
from tiny import fixture, randomize, tiny_model
from sprint import (
    ModelConfig,
    apply_rope,
    group_shape,
    patchify,
    rope,
    sample_ids_keep,
    unpatchify,
)



def inputs(B=4, C=4, H=8, seed=0):
    """Latents (B, C, H, H), times (B,), labels (B,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, H, generator=g)
    return x, torch.rand(B, generator=g), torch.randint(0, 10, (B,), generator=g)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


#################################################################################
#                  Conformance with the official SPRINT code                    #
#################################################################################

def create_model(cfg):
    return MODELS[cfg.model](cfg)


@pytest.fixture(scope="module")
def official():
    """The official file read as a released one is (its architecture from its tensors, the latent
    side given), checked against the official code's configuration."""
    io = np.load(fixture("official_sprint_tiny_io.npz"))
    c = json.loads(str(io["config"]))
    model = load_model(fixture("official_sprint_tiny.safetensors"), input_size=c["context_size"])
    cfg = model.cfg
    assert (cfg.model, cfg.patch_size, cfg.in_channels, cfg.hidden_size, cfg.num_heads,
            cfg.num_classes, list(cfg.depths)) == ("sprint", c["patch_size"], c["in_channels"],
                                                   c["hidden_size"], c["num_heads"],
                                                   c["num_classes"], c["depths"])
    data = {k: torch.from_numpy(io[k]) for k in io.files if k != "config"}
    return model, {k: v.float() if v.is_floating_point() else v for k, v in data.items()}


def test_official_full_tokens(official):
    model, d = official
    with torch.no_grad():
        assert rel(model(d["x"], d["t"], d["y"]), d["out_full"]) < 1e-5


def test_official_75_percent_drop(official):
    model, d = official
    with torch.no_grad():
        assert rel(model(d["x"], d["t"], d["y"], ids_keep=d["ids_keep"]), d["out_masked"]) < 1e-5


def test_official_path_drop_guidance(official):
    """First half conditional with the deep path, second half null label with the deep path
    dropped."""
    model, d = official
    B = d["pdg_x"].shape[0] // 2
    with torch.no_grad():
        per_sample = model(d["pdg_x"], d["pdg_t"], d["pdg_y"], path_drop=torch.arange(2 * B) >= B)
        cond = model(d["pdg_x"][:B], d["pdg_t"][:B], d["pdg_y"][:B])
        uncond = model(d["pdg_x"][B:], d["pdg_t"][B:], d["pdg_y"][B:], skip_middle=True)
    assert rel(per_sample, d["out_pdg"]) < 1e-5
    assert rel(torch.cat([cond, uncond]), d["out_pdg"]) < 1e-5


#################################################################################
#                               Token-drop sampler                              #
#################################################################################

@pytest.mark.parametrize("drop, n, k", [(0.75, 2, 1), (0.5, 2, 2), (0.875, 4, 2), (0.625, 4, 6)])
def test_structured_drop_keeps_k_per_group(drop, n, k):
    assert group_shape(drop, 16) == (n, k)
    ids = sample_ids_keep(64, 16, drop)                                    # (B, M)
    assert ids.shape == (64, round(256 * (1 - drop)))
    rows, cols = ids // 16, ids % 16
    group = (rows // n) * (16 // n) + cols // n                            # (B, M)
    counts = torch.zeros(64, (16 // n) ** 2, dtype=torch.long).scatter_add_(
        1, group, torch.ones_like(group)
    )
    assert (counts == k).all()
    assert all(len(set(r.tolist())) == r.numel() for r in ids)             # no token kept twice


def test_structured_drop_is_uniform_within_groups():
    """Seeded frequency test: every position of a 2x2 group is kept equally often (chi-square,
    3 dof)."""
    torch.manual_seed(0)
    # 4000 x 16 draws, 1 of 4 per group
    ids = sample_ids_keep(4000, 8, 0.75)
    # position inside its 2x2 group
    slot = (ids // 8 % 2) * 2 + ids % 8 % 2
    freq = torch.bincount(slot.flatten(), minlength=4).double()
    expected = slot.numel() / 4
    chi2 = ((freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3                                                     # p = 0.001 for 3 dof


def test_random_drop_keeps_m_distinct_tokens():
    torch.manual_seed(0)
    ids = sample_ids_keep(32, 8, 0.75, mask_type="random")
    assert ids.shape == (32, 16) and ids.min() >= 0 and ids.max() < 64
    assert all(len(set(r.tolist())) == 16 for r in ids)
    freq = torch.bincount(
        sample_ids_keep(4000, 8, 0.75, mask_type="random").flatten(), minlength=64
    ).double()
    # every token equally likely
    assert ((freq - freq.mean()).abs() / freq.mean()).max() < 0.1


def test_all_indices_equal_no_drop():
    model = randomize(tiny_model())
    x, t, y = inputs()
    everything = torch.arange(16).expand(4, 16)
    with torch.no_grad():
        assert torch.allclose(model(x, t, y, ids_keep=everything), model(x, t, y), atol=1e-6)


def test_kept_tokens_order_does_not_matter():
    """Kept tokens carry their own RoPE positions, so the middle blocks see a set, not a
    sequence."""
    model = randomize(tiny_model())
    x, t, y = inputs()
    ids = sample_ids_keep(4, 4, 0.75)
    with torch.no_grad():
        assert torch.allclose(
            model(x, t, y, ids_keep=ids), model(x, t, y, ids_keep=ids.flip(1)), atol=1e-6
        )


#################################################################################
#                         Path drop, RoPE, patchify                             #
#################################################################################

def test_path_dropped_output_ignores_middle_weights():
    model = randomize(tiny_model())
    x, t, y = inputs()
    # one draw for both
    drop, ids_keep = torch.tensor([True, False, True, False]), sample_ids_keep(4, 4, 0.75)
    with torch.no_grad():
        before = model(x, t, y, ids_keep=ids_keep, path_drop=drop)
        for p in model.middle.parameters():
            p.add_(torch.randn_like(p))
        after = model(x, t, y, ids_keep=ids_keep, path_drop=drop)
    assert torch.equal(before[drop], after[drop])
    assert not torch.allclose(before[~drop], after[~drop])


def test_rope_scores_depend_only_on_relative_position():
    """<R(p) q, R(p') k> = <R(p + s) q, R(p' + s) k>: attention sees offsets between tokens, in
    both axes."""
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)
    def score(p, p2):
        return (
            apply_rope(q, rope(torch.tensor([p]), 16)) * apply_rope(k, rope(torch.tensor([p2]), 16))
        ).sum()
    base = score([1.0, 2.0], [3.0, 5.0])
    assert torch.allclose(base, score([4.0, -1.0], [6.0, 2.0]), atol=1e-5)
    assert not torch.allclose(base, score([1.0, 2.0], [5.0, 3.0]), atol=1e-3)


def test_patchify_roundtrip_and_channel_order():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 3), x)
    assert torch.equal(patchify(x, 2)[0, 0], x[0, :, :2, :2].flatten())  # (c, p1, p2) order


#################################################################################
#                      Sizes, initialisation, gradients                         #
#################################################################################

def test_parameter_counts_match_the_official_models():
    with torch.device("meta"):
        sprint = create_model(ModelConfig(model="sprint", size="XL", input_size=32))
        dit = create_model(ModelConfig(model="dit", size="XL", input_size=32))
    assert round(sprint.num_params() / 1e6, 1) == 677.5                   # official SPRINT-XL/2
    D, p, C, depth, classes = 1152, 2, 4, 28, 1000
    block = 3 * D * D + 3 * D + D * D + D + 2 * (D // 16) + 8 * D * D + 5 * D + 6 * D * D + 6 * D
    # SiT-XL/2 with q/k norm and no position table: embeddings, blocks, final layer
    embeddings = (p * p * C * D + D) + (256 * D + D + D * D + D) + (classes + 1) * D
    final_layer = 2 * D * D + 2 * D + D * p * p * C + p * p * C
    sit_xl = embeddings + depth * block + final_layer
    assert dit.num_params() == sit_xl
    # the fusion Linear is all SPRINT adds
    assert sprint.num_params() - dit.num_params() == 2 * D * D + D


def test_output_is_zero_at_initialisation():
    x, t, y = inputs()
    for name in ("dit", "sprint"):
        assert torch.equal(tiny_model(name)(x, t, y), torch.zeros_like(x))


def test_the_mask_token_is_a_fixed_normal_draw_with_std_002():
    torch.manual_seed(0)
    mask = tiny_model(hidden_size=96, num_heads=4).mask_token                 # 96 draws
    assert 0.014 < mask.std().item() < 0.026 and not mask.requires_grad


def test_gradients_reach_every_trainable_parameter_under_75_percent_drop():
    model = randomize(tiny_model())
    x, t, y = inputs(B=8)
    torch.manual_seed(0)
    path_drop = torch.rand(8) < 0.5
    v = model(x, t, y, ids_keep=sample_ids_keep(8, 4, 0.75), path_drop=path_drop)
    (v**2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_compiled_training_forward_has_no_graph_break():
    model = randomize(tiny_model())

    def loss_fn(x, t, y):
        # the drop pattern and path drop are drawn inside the graph, as train.py's step does
        ids_keep = sample_ids_keep(x.shape[0], 4, 0.75, device=x.device)
        path_drop = torch.rand(x.shape[0], device=x.device) < 0.1
        return (model(x, t, y, ids_keep=ids_keep, path_drop=path_drop) ** 2).mean()

    # Dynamo's trace of the forward; fullgraph: a graph break is an error
    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    # a fresh drop pattern each call
    for seed in range(2):
        loss = compiled(*inputs(seed=seed))
        loss.backward()
        assert torch.isfinite(loss) and model.fuse.weight.grad.abs().sum() > 0


#################################################################################
#                                FLOPs accounting                               #
#################################################################################

@pytest.mark.parametrize("name, drop", [("dit", 0.0), ("sprint", 0.0), ("sprint", 0.75)])
def test_the_counted_flops_are_what_a_training_forward_runs(name, drop):
    """FlopCounterMode counts every matmul and attention a forward of XL/2 at 256 px runs (on the
    meta device: shapes only); the models' own accounting agrees exactly."""
    with torch.device("meta"):
        model = create_model(ModelConfig(model=name, size="XL", input_size=32))
        x, t, y = torch.randn(2, 4, 32, 32), torch.rand(2), torch.zeros(2, dtype=torch.long)
        sparse = {}
        if drop:
            sparse = dict(ids_keep=sample_ids_keep(2, 16, drop), path_drop=torch.rand(2) < 0.1)
        with FlopCounterMode(display=False) as counter:
            model(x, t, y, **sparse)
    assert counter.get_total_flops() / 2 == model.training_flops(drop)   # a batch of 2 images


def test_flops_match_the_papers():
    """Forward FLOPs at 256 px (32 x 32 x 4 latents, patch 2). Sources: DiT-XL/2 118.6 GFLOPs
    counted as multiply-adds (DiT paper); 0.475 TFLOPs per CFG step and 0.274 per PDG step (SPRINT
    paper); a 75%-drop step's FLOP ratio allows 2.85x (the ratio quoted beside the official code's
    H100 step times, 143.9 vs 101.3 ms), i.e. 35% of the dense FLOPs.
    Measured here: 118.6, 0.4772 (0.5% above the paper's 0.475), 0.2739, 0.356."""
    with torch.device("meta"):
        dit = create_model(ModelConfig(model="dit", size="XL", input_size=32))
        sprint = create_model(ModelConfig(model="sprint", size="XL", input_size=32))
    assert abs(dit.flops() / 2e9 - 118.6) < 0.05
    pdg_step = (sprint.flops() + sprint.flops(skip_middle=True)) / 1e12
    cfg_step = 2 * sprint.flops() / 1e12
    assert abs(pdg_step / 0.274 - 1) < 0.002
    assert abs(cfg_step / 0.475 - 1) < 0.006
    assert abs(sprint.flops(drop=0.75) / sprint.flops() - 1 / 2.85) < 0.006


def test_bf16_autocast_matches_float32():
    """The mixed-precision path (bf16 matmuls, float32 norms and RoPE) agrees with float32 to bf16
    accuracy."""
    model = randomize(tiny_model())
    x, t, y = inputs()
    kwargs = dict(
        ids_keep=sample_ids_keep(4, 4, 0.75), path_drop=torch.tensor([False, True, False, False])
    )
    with torch.no_grad():
        ref = model(x, t, y, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y, **kwargs)
    # bf16 keeps 8 bits of mantissa: ~4e-3 per op
    assert low.dtype == torch.bfloat16 and rel(low.float(), ref) < 2e-2
