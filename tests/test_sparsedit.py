"""SparseDiT (arXiv 2412.06028) as a specification: a released DiT converted here runs as
changsn/SparseDiT's own conversion of it at every sparse side; Poolingformer, SDTM, the
timestep-adaptive density (its shape, over flow times and DDPM timesteps), initialisation from a
DiT, FLOPs against the paper and, in training, against what runs."""
import dataclasses
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import sample
import sprint
from sparsedit import Poolingformer, SparseDiT, density_schedule, pooled_grid
from sprint import Block, DiT, ModelConfig, rope
from tiny import fixture

OFFICIAL = np.load(fixture("sparsedit_official.npz"))


def tiny(**extra):
    """8 x 8 tokens, depth 12 -> layout [1, 2, 2, 1], density 3 -> 5 (6 -> 10 scaled to the
    grid)."""
    return ModelConfig(
        model="sparsedit",
        input_size=16,
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        num_heads=4,
        num_classes=10,
        depths=(2, 8, 2),
        extra=extra,
    )


def randomize(model, keep=()):
    """Random weights everywhere (adaLN gates too) except parameters whose name contains one of
    `keep`."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(k in name for k in keep):
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def inputs(t):
    torch.manual_seed(1)
    return torch.randn(len(t), 4, 16, 16), torch.tensor(t), torch.arange(len(t)) % 10


#################################################################################
#              Conformance with SparseDiT's own conversion of a DiT             #
#################################################################################

def official(key):
    return torch.from_numpy(OFFICIAL[key])


@pytest.fixture
def released_dit(tmp_path, monkeypatch):
    """The fixture's DiT stored as a released file is -> (its path, SparseDiT's layout and sides).
    The heads of a model without q/k norm come from the size of its width: the fixture's is "T"."""
    config = {k[len("config_"):]: OFFICIAL[k] for k in OFFICIAL.files if k.startswith("config_")}
    monkeypatch.setitem(sprint.SIZES, "T", (int(config["hidden_size"]), int(config["num_heads"]),
                                            (0, int(config["depth"]), 0)))
    path = tmp_path / "DiT-tiny.pt"
    torch.save({k[4:]: official(k) for k in OFFICIAL.files if k.startswith("dit/")}, path)
    layout = [int(config["num_poolingformer"]), int(config["num_dumbbell"]),
              int(config["dumbbell_group"][1]), int(config["num_normal_block"])]
    return path, layout, OFFICIAL["sides"].tolist()


def converted(path, layout, sides):
    """A SparseDiT of this layout converted from the released file, as train.py --init converts."""
    dit_cfg, weights = sample.checkpoint_weights(sample.read_checkpoint(path), path)
    cfg = dataclasses.replace(dit_cfg, model="sparsedit",
                              extra={"layout": layout, "density": [min(sides), max(sides)]})
    model = SparseDiT(cfg)
    model.load_state_dict(model.from_dit(weights))
    return model


def test_a_released_dit_converted_here_runs_as_sparsedits_own_conversion_at_every_side(
        released_dit):
    """changsn/SparseDiT's load_model + model on a DiT stored as a released file (1 Poolingformer,
    2 dumbbells of [1, 3, 1, 1], 1 dense top block; its sparse side fixed per run): our from_dit of
    the same file, run at the same side, and the DiT itself."""
    path, layout, sides = released_dit
    model = converted(path, layout, sides)
    x, t, y = official("x"), official("t"), official("y")
    with torch.no_grad():
        assert rel(sample.load_model(path)(x, t, y), official("dit_out")) < 1e-5
        for side in sides:
            out = model(x, t, y, side=side)
            assert rel(out, official(f"conv_side{side}")) < 1e-5, side   # measured 3e-7


# SparseDiT's own names -> ours (the recovery linears merged_layer1 and merged_layer2 are W1, W2)
OFFICIAL_NAMES = [(r"poolingformer_blocks\.", "poolingformers."),
                  (r"dumbbell_blocks\.(\d+)\.token_merge_blocks\.0\.", r"sdtms.\1.generation."),
                  (r"dumbbell_blocks\.(\d+)\.semantic_blocks\.", r"sdtms.\1.sparse."),
                  (r"dumbbell_blocks\.(\d+)\.token_recover_blocks\.0\.merged_layer1\.",
                   r"sdtms.\1.W1."),
                  (r"dumbbell_blocks\.(\d+)\.token_recover_blocks\.0\.merged_layer2\.",
                   r"sdtms.\1.W2."),
                  (r"dumbbell_blocks\.(\d+)\.token_recover_blocks\.0\.", r"sdtms.\1.recovery."),
                  (r"dumbbell_blocks\.(\d+)\.normal_blocks\.0\.", r"sdtms.\1.dense."),
                  (r"^normal_blocks\.", "top.")]


def test_a_trained_sparsedit_runs_as_sparsedits_own_model_at_every_side(released_dit):
    """SparseDiT's model with every parameter random (the recovery linears' biases too), its state
    dict mapped onto ours: the same outputs at every sparse side. The embedders, the table and the
    final layer are read as a released DiT's are (a Conv2d patch embedding, a (p1, p2, c) final
    layer)."""
    path, layout, sides = released_dit
    theirs = {k[len("sparse/"):]: official(k) for k in OFFICIAL.files if k.startswith("sparse/")}
    blocks = {k: v for k, v in theirs.items() if "_blocks." in k}
    released = {k: v for k, v in theirs.items() if k not in blocks}   # the DiT-shaped rest
    released.update({k[4:]: official(k) for k in OFFICIAL.files if k.startswith("dit/blocks.")})
    torch.save(released, path.parent / "rest.pt")
    model = converted(path.parent / "rest.pt", layout, sides)
    sd = {k: v for k, v in model.state_dict().items()
          if not k.startswith(("poolingformers.", "sdtms.", "top."))}
    for name, tensor in blocks.items():
        for pattern, ours in OFFICIAL_NAMES:
            name = re.sub(pattern, ours, name)
        sd[name] = tensor
    model.load_state_dict(sd)                                   # strict: every name mapped
    x, t, y = official("x"), official("t"), official("y")
    with torch.no_grad():
        for side in sides:
            out = model(x, t, y, side=side)
            assert rel(out, official(f"rand_side{side}")) < 1e-5, side   # measured 1e-7


def test_poolingformer_equals_attention_with_all_weights_equal():
    pool = randomize(Poolingformer(64, 4))
    block = Block(64, 4)
    sd = {k: v for k, v in pool.state_dict().items() if not k.startswith("attn.v.")}
    D = 64
    # q = k = 0: uniform softmax
    sd["attn.qkv.weight"] = torch.cat([torch.zeros(2 * D, D), pool.attn.v.weight])
    sd["attn.qkv.bias"] = torch.cat([torch.zeros(2 * D), pool.attn.v.bias])
    sd["attn.q_norm.weight"] = sd["attn.k_norm.weight"] = torch.ones(D // 4)
    block.load_state_dict(sd)
    x, c = torch.randn(2, 36, D), torch.randn(2, D)
    cos_sin = rope(torch.randn(36, 2), D // 4)
    torch.testing.assert_close(pool(x, c, cos_sin), block(x, c, cos_sin))


def test_sparse_tokens_are_adaptive_average_pooling_at_cell_centres():
    x = torch.randn(2, 3, 8, 8)
    for side in (3, 4, 5, 8):
        pool, pos, up = pooled_grid(8, side)
        xs = pool @ x.flatten(2).transpose(1, 2)                           # (B, s², C)
        ref = F.adaptive_avg_pool2d(x, side)
        torch.testing.assert_close(xs, ref.flatten(2).transpose(1, 2))
        torch.testing.assert_close(
            xs[:, up].transpose(1, 2).reshape(2, 3, 8, 8), F.interpolate(ref, size=8)
        )
    # 2 x 2 cells: centres at .5, 2.5, ...
    _, pos, _ = pooled_grid(8, 4)
    assert pos[:2].tolist() == [[0.5, 0.5], [0.5, 2.5]]


def test_sdtm_is_the_identity_on_its_dense_input_at_initialisation():
    # everything random except what the paper initialises: zero adaLN (gates), W1 = 0, W2 = I
    model = randomize(SparseDiT(tiny()), keep=("adaLN_modulation.1", "W1", "W2"))
    x, c = torch.randn(3, 64, 64), torch.randn(3, 64)
    grid = model.sparse_grid(torch.tensor([0.9, 0.4, 0.0]))
    for sdtm in model.sdtms:
        assert torch.equal(sdtm(x, c, rope(model.pos, model.head_dim), grid), x)


def test_a_mixed_t_batch_equals_each_sample_alone_on_its_own_grid():
    model = randomize(SparseDiT(tiny())).eval()
    t = [1.0, 0.8, 0.5, 0.3, 0.1, 0.0]
    sides = model.grid_side(torch.tensor(t)).tolist()
    assert sides == [3, 3, 4, 4, 5, 5]
    x, t, y = inputs(t)
    with torch.no_grad():
        # padded to 5 x 5, masked per sample
        out = model(x, t, y)
        for i, side in enumerate(sides):
            # unpadded side x side grid
            alone = model(x[i:i + 1], t[i:i + 1], y[i:i + 1], side=side)
            torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        # the grid does change the output
        other = model(x[:1], t[:1], y[:1], side=5)
        assert (other - out[:1]).abs().max() > 1e-3


def test_forward_has_static_shapes_and_no_host_sync():
    # .item() or nonzero() would fail here
    with torch.device("meta"):
        model = SparseDiT(tiny())
        x, t, y = torch.randn(4, 4, 16, 16), torch.rand(4), torch.zeros(4, dtype=torch.long)
        assert model(x, t, y).shape == x.shape


def test_from_dit_maps_blocks_in_order_and_slices_qkv():
    dit = randomize(DiT(dataclasses.replace(tiny(), model="dit", extra={})))
    model = SparseDiT(tiny())
    model.load_state_dict(model.from_dit(dit.state_dict()))           # strict: every key mapped
    D, blocks = 64, dit.blocks
    # layer 0; SDTM 1 starts at layer 6
    pf, sdtm = model.poolingformers[0], model.sdtms[1]
    assert torch.equal(pf.attn.v.weight, blocks[0].attn.qkv.weight[2 * D:])
    assert torch.equal(pf.attn.proj.weight, blocks[0].attn.proj.weight)
    assert torch.equal(pf.mlp.fc1.weight, blocks[0].mlp.fc1.weight)
    for cross, i in ((sdtm.generation, 6), (sdtm.recovery, 9)):
        assert torch.equal(cross.attn.q.weight, blocks[i].attn.qkv.weight[:D])
        assert torch.equal(cross.attn.q.bias, blocks[i].attn.qkv.bias[:D])
        assert torch.equal(cross.attn.kv.weight, blocks[i].attn.qkv.weight[D:])
        assert torch.equal(cross.attn.k_norm.weight, blocks[i].attn.k_norm.weight)
    assert torch.equal(sdtm.sparse[1].attn.qkv.weight, blocks[8].attn.qkv.weight)
    assert torch.equal(sdtm.dense.adaLN_modulation[1].weight, blocks[10].adaLN_modulation[1].weight)
    assert torch.equal(model.top[0].mlp.fc2.weight, blocks[11].mlp.fc2.weight)
    assert torch.equal(model.final_layer.linear.weight, dit.final_layer.linear.weight)
    assert torch.equal(sdtm.W1.weight, torch.zeros(D, D)) and torch.equal(sdtm.W2.weight, torch.eye(D))
    assert not sdtm.W1.bias.any() and not sdtm.W2.bias.any()
    shallow = DiT(dataclasses.replace(tiny(), model="dit", depths=(1, 8, 2), extra={}))
    with pytest.raises(ValueError, match="a DiT of depth 11 cannot initialise a SparseDiT of "
                                         "depth 12"):
        model.from_dit(shallow.state_dict())


def test_the_density_is_flat_on_the_noisiest_quarter_then_linear_to_the_data():
    """The smallest grid for noise levels in [0.75, 1] (the first quarter of sampling), then growing
    linearly to the largest at 0, rounded to whole sides. A fine range of sides (0 to 400) shows
    the shape that rounding to the paper's 6 -> 10 hides."""
    level = torch.linspace(0, 1, 1001)
    expected = torch.where(level >= 0.75, 0.0, 400 * (1 - level / 0.75))
    assert (density_schedule(level, 0, 400) - expected).abs().max() <= 0.5
    paper = density_schedule(torch.tensor([1.0, 0.75, 0.74, 0.65, 0.375, 0.0]), 6, 10)
    assert paper.tolist() == [6, 6, 6, 7, 8, 10]


def test_ddpm_timesteps_follow_the_density_schedule_as_noise_levels():
    """The DiT paper's model counts t in 0..999 (999: noise); the grid is the smallest for the
    noisiest quarter of DDPM's timesteps, as for flow times in [0.75, 1]."""
    flow = SparseDiT(tiny())
    ddpm = SparseDiT(dataclasses.replace(tiny(), diffusion="ddpm", positions="table",
                                         qk_norm=False))
    t = torch.tensor([999, 750, 500, 250, 0])
    assert ddpm.grid_side(t).tolist() == flow.grid_side(t / 1000).tolist() == [3, 3, 4, 4, 5]
    assert ddpm.flops(t=999) == 2 * ddpm.macs(3) and ddpm.sampling_kwargs(999) == {"side": 3}


def test_a_training_step_costs_the_padded_grid_and_the_logged_flops_say_so():
    """A training batch pads every sample to the largest grid: FlopCounterMode on a mixed-t batch
    of SparseDiT-XL/2 (on the meta device) counts what training_flops, the figure train.py logs,
    says (within the pooling matrix's 0.2%); the schedule's mean, the paper's figure, is 15% less."""
    with torch.device("meta"):
        model = SparseDiT(ModelConfig(model="sparsedit", size="XL", input_size=32))
        x, y = torch.randn(4, 4, 32, 32), torch.zeros(4, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, torch.tensor([1.0, 0.8, 0.3, 0.0]), y)
    ran = counter.get_total_flops() / 4                           # per image
    assert abs(model.training_flops() / ran - 1) < 0.005
    assert model.training_flops() == model.flops(t=0.0) > 1.15 * model.flops()


def paper_gflops(model):
    """GFLOPs as the DiT/SparseDiT papers count them (fvcore: 1 per multiply-add; DiT-XL/2 at
    256 px = 118.6)."""
    return model.flops() / 2 / 1e9


def test_flops_fall_as_the_grid_shrinks_and_match_the_paper():
    """Counted the paper's way (fvcore: 1 FLOP per multiply-add), 256 px = 16 x 16 tokens, t
    uniform on [0, 1].

    Measured: SparseDiT-XL 65.3 G vs the paper's 68.1 (DiT-XL/2 118.6), SparseDiT-B 13.8 G vs
    14.3 (DiT-B 23.0). The 4% gap: our Poolingformer averages before W_v and W_o (one token instead
    of N: 1.4 G less at XL), and how the paper rounds its schedule to whole grid sides is not
    published.
    """
    model = SparseDiT(tiny())
    per_side = [model.macs(s) for s in range(3, 6)]
    assert per_side == sorted(per_side) and len(set(per_side)) == 3
    assert model.flops(t=1.0) == 2 * per_side[0] and model.flops(t=0.0) == 2 * per_side[-1]
    assert model.flops(t=[1.0, 0.0]) == per_side[0] + per_side[-1]
    for size, paper, dense in (("XL", 68.1, 118.6), ("B", 14.3, 23.0)):
        with torch.device("meta"):
            sparse = SparseDiT(ModelConfig(model="sparsedit", size=size, input_size=32))
            dit = DiT(ModelConfig(model="dit", size=size, input_size=32))
        print(f"\nSparseDiT-{size}/2 {paper_gflops(sparse):.1f} GFLOPs (paper {paper}), "
              f"DiT-{size}/2 {paper_gflops(dit):.1f} (paper {dense})")
        assert abs(paper_gflops(dit) / dense - 1) < 0.005           # measured: 0.0% (XL), 0.2% (B)
        assert abs(paper_gflops(sparse) / paper - 1) < 0.05         # measured: 4.1% (XL), 3.5% (B)
