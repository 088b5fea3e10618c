"""sprint.py as a specification: the official SPRINT outputs, token drop, path drop, sizes, FLOPs, loading."""
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from models import ModelConfig, create_model, load_model, load_weights, read_safetensors
from sprint import SPRINT, TokenDrop, apply_rope, group_shape, patchify, rope, sample_ids_keep, unpatchify

FIXTURES = Path(__file__).parent / "fixtures"


def tiny(model="sprint", **kw):
    cfg = dict(model=model, input_size=8, patch_size=2, in_channels=4, hidden_size=32, num_heads=2,
               depths=(1, 2, 1), num_classes=10)
    return create_model(ModelConfig(**{**cfg, **kw}))


def randomize(model, seed=0):
    """Random weights everywhere (adaLN-Zero makes a fresh model's blocks inert)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(B=4, C=4, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, H, generator=g), torch.rand(B, generator=g), torch.randint(0, 10, (B,), generator=g)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


#################################################################################
#                  Conformance with the official SPRINT code                    #
#################################################################################

@pytest.fixture(scope="module")
def official():
    io = np.load(FIXTURES / "official_sprint_tiny_io.npz")
    c = json.loads(str(io["config"]))
    cfg = ModelConfig(model="sprint", input_size=c["context_size"], patch_size=c["patch_size"],
                      in_channels=c["in_channels"], hidden_size=c["hidden_size"], num_heads=c["num_heads"],
                      num_classes=c["num_classes"], depths=tuple(c["depths"]))
    model = load_weights(create_model(cfg), FIXTURES / "official_sprint_tiny.safetensors").eval()
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
    """First half conditional with the deep path, second half null label with the deep path dropped."""
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
    counts = torch.zeros(64, (16 // n) ** 2, dtype=torch.long).scatter_add_(1, group, torch.ones_like(group))
    assert (counts == k).all()
    assert all(len(set(r.tolist())) == r.numel() for r in ids)             # no token kept twice


def test_structured_drop_is_uniform_within_groups():
    """Seeded frequency test: every position of a 2x2 group is kept equally often (chi-square, 3 dof)."""
    torch.manual_seed(0)
    ids = sample_ids_keep(4000, 8, 0.75)                                   # 4000 x 16 draws, 1 of 4 per group
    slot = (ids // 8 % 2) * 2 + ids % 8 % 2                                # position inside its 2x2 group
    freq = torch.bincount(slot.flatten(), minlength=4).double()
    expected = slot.numel() / 4
    chi2 = ((freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3                                                     # p = 0.001 for 3 dof


def test_random_drop_keeps_m_distinct_tokens():
    torch.manual_seed(0)
    ids = sample_ids_keep(32, 8, 0.75, mask_type="random")
    assert ids.shape == (32, 16) and ids.min() >= 0 and ids.max() < 64
    assert all(len(set(r.tolist())) == 16 for r in ids)
    freq = torch.bincount(sample_ids_keep(4000, 8, 0.75, mask_type="random").flatten(), minlength=64).double()
    assert ((freq - freq.mean()).abs() / freq.mean()).max() < 0.1          # every token equally likely


@pytest.mark.parametrize("drop, mask_type, message", [
    (0.3, "structured", "--drop 0.3: no n x n group"), (0.333, "random", "--drop 0.333: .* whole number"),
    (1.0, "structured", r"--drop 1.0: must lie in \[0, 1\)"), (0.75, "blocks", "--mask-type 'blocks'")])
def test_unrealisable_drop_is_a_clear_error(drop, mask_type, message):
    with pytest.raises(ValueError, match=message):
        sample_ids_keep(2, 10, drop, mask_type)                            # a 10x10 grid: 100 tokens


def test_all_indices_equal_no_drop():
    model = randomize(tiny())
    x, t, y = inputs()
    everything = torch.arange(16).expand(4, 16)
    with torch.no_grad():
        assert torch.allclose(model(x, t, y, ids_keep=everything), model(x, t, y), atol=1e-6)


def test_kept_tokens_order_does_not_matter():
    """Kept tokens carry their own RoPE positions, so the middle blocks see a set, not a sequence."""
    model = randomize(tiny())
    x, t, y = inputs()
    ids = sample_ids_keep(4, 4, 0.75)
    with torch.no_grad():
        assert torch.allclose(model(x, t, y, ids_keep=ids), model(x, t, y, ids_keep=ids.flip(1)), atol=1e-6)


#################################################################################
#                         Path drop, RoPE, patchify                             #
#################################################################################

def test_path_dropped_output_ignores_middle_weights():
    model = randomize(tiny())
    x, t, y = inputs()
    drop, ids_keep = torch.tensor([True, False, True, False]), sample_ids_keep(4, 4, 0.75)   # one draw for both
    with torch.no_grad():
        before = model(x, t, y, ids_keep=ids_keep, path_drop=drop)
        for p in model.middle.parameters():
            p.add_(torch.randn_like(p))
        after = model(x, t, y, ids_keep=ids_keep, path_drop=drop)
    assert torch.equal(before[drop], after[drop])
    assert not torch.allclose(before[~drop], after[~drop])


def test_rope_scores_depend_only_on_relative_position():
    """<R(p) q, R(p') k> = <R(p + s) q, R(p' + s) k>: attention sees offsets between tokens, in both axes."""
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)
    def score(p, p2):
        return (apply_rope(q, rope(torch.tensor([p]), 16)) * apply_rope(k, rope(torch.tensor([p2]), 16))).sum()
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
    sit_xl = (p * p * C * D + D) + (256 * D + D + D * D + D) + (classes + 1) * D + depth * block \
        + (2 * D * D + 2 * D + D * p * p * C + p * p * C)                  # SiT-XL/2 with q/k norm, no pos table
    assert dit.num_params() == sit_xl
    assert sprint.num_params() - dit.num_params() == 2 * D * D + D        # the fusion Linear is all SPRINT adds


def test_output_is_zero_at_initialisation():
    x, t, y = inputs()
    for name in ("dit", "sprint"):
        assert torch.equal(tiny(name)(x, t, y), torch.zeros_like(x))


def test_gradients_reach_every_trainable_parameter_under_75_percent_drop():
    model = randomize(tiny())
    x, t, y = inputs(B=8)
    torch.manual_seed(0)
    kwargs = model.training_kwargs(8, TokenDrop(0.75, "structured", 0.5), None)
    (model(x, t, y, **kwargs) ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not model.mask_token.requires_grad                             # fixed, not trained


def test_compiled_training_forward_has_no_graph_break():
    model = randomize(tiny())

    def loss_fn(x, t, y):
        kwargs = model.training_kwargs(x.shape[0], TokenDrop(0.75, "structured", 0.1), x.device)
        return (model(x, t, y, **kwargs) ** 2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")   # traces forward and backward
    for seed in range(2):                                                  # a fresh drop pattern each call
        loss = compiled(*inputs(seed=seed))
        loss.backward()
        assert torch.isfinite(loss) and model.fuse.weight.grad.abs().sum() > 0


#################################################################################
#                                FLOPs accounting                               #
#################################################################################

def test_flops_match_the_papers():
    with torch.device("meta"):
        dit = create_model(ModelConfig(model="dit", size="XL", input_size=32))
        sprint = create_model(ModelConfig(model="sprint", size="XL", input_size=32))
    assert abs(dit.flops() / 2e9 - 118.6) < 0.1                            # DiT paper: 118.6 GFLOPs (multiply-adds)
    pdg_step = (sprint.flops() + sprint.flops(skip_middle=True)) / 1e12
    cfg_step = 2 * sprint.flops() / 1e12
    assert abs(pdg_step - 0.274) < 0.003 and abs(cfg_step - 0.475) < 0.005  # SPRINT paper, per guided step
    assert 0.34 < sprint.flops(drop=0.75) / sprint.flops() < 0.37          # "about 35% of the dense FLOPs"


#################################################################################
#                                Loading weights                                #
#################################################################################

def write_safetensors(path, tensors, dtype="BF16"):
    """A minimal safetensors writer (test helper): header length, JSON header, raw little-endian data."""
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.to(torch_dtype).contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    meta = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(meta)) + meta + b"".join(blobs))


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_safetensors_half_precision(tmp_path, dtype):
    model = randomize(tiny())
    sd = {("module._orig_mod." + k): v for k, v in model.state_dict().items()}   # wrapper prefixes are stripped
    write_safetensors(tmp_path / "w.safetensors", sd, dtype)
    read = read_safetensors(tmp_path / "w.safetensors")
    assert read["module._orig_mod.fuse.weight"].dtype == getattr(torch, {"F16": "float16", "BF16": "bfloat16"}[dtype])
    fresh = load_weights(tiny(), tmp_path / "w.safetensors")
    tol = 1e-2 if dtype == "BF16" else 1e-3
    assert torch.allclose(fresh.fuse.weight, model.fuse.weight, atol=tol)


def test_our_checkpoint_roundtrip_prefers_ema(tmp_path):
    model, ema = randomize(tiny(), 1), randomize(tiny(), 2)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "config": vars(model.cfg)}, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt")
    assert torch.equal(loaded.fuse.weight, ema.fuse.weight)
    assert torch.equal(load_model(tmp_path / "c.pt", ema=False).fuse.weight, model.fuse.weight)


def test_wrong_architecture_is_one_clear_error(tmp_path):
    torch.save({"model": tiny(hidden_size=64).state_dict()}, tmp_path / "big.pt")
    with pytest.raises(ValueError, match=r"shape mismatch: decoder.0.adaLN_modulation.1.bias: "
                                         r"file \(384,\) vs model \(192,\).* \(61 in all\)"):
        load_weights(tiny(), tmp_path / "big.pt")
    torch.save({"model": tiny("dit").state_dict()}, tmp_path / "dit.pt")
    with pytest.raises(ValueError, match=r"missing: decoder\.0.*\n  unexpected: blocks\.0"):
        load_weights(tiny(), tmp_path / "dit.pt")


def test_not_a_checkpoint_and_no_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a PyTorch checkpoint"):
        load_weights(tiny(), tmp_path / "notes.txt")
    write_safetensors(tmp_path / "w.safetensors", tiny().state_dict(), "F32")
    with pytest.raises(ValueError, match="carries no model config"):
        load_model(tmp_path / "w.safetensors")
    assert isinstance(load_model(tmp_path / "w.safetensors", cfg=tiny().cfg), SPRINT)


def test_a_truncated_checkpoint_is_one_message_naming_the_file(tmp_path):
    torch.save({"model": tiny().state_dict()}, tmp_path / "whole.pt")
    write_safetensors(tmp_path / "whole.safetensors", tiny().state_dict(), "F32")
    for suffix in (".pt", ".safetensors"):
        data = (tmp_path / f"whole{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=rf"cut{suffix}: not a readable checkpoint \(truncated\?\)$"):
            load_weights(tiny(), tmp_path / f"cut{suffix}")


def test_bad_config_values():
    with pytest.raises(ValueError, match="--size 'XXL'"):
        ModelConfig(size="XXL")
    with pytest.raises(ValueError, match="--patch-size 3"):
        ModelConfig(patch_size=3, input_size=32)
    with pytest.raises(ValueError, match="--model 'unet'"):
        ModelConfig(model="unet")
    with pytest.raises(ValueError, match="has no sparse path"):
        tiny("dit").training_kwargs(2, TokenDrop(0.75, "structured", 0.0), None)


def test_bf16_autocast_matches_float32():
    """The mixed-precision path (bf16 matmuls, float32 norms and RoPE) agrees with float32 to bf16 accuracy."""
    model = randomize(tiny())
    x, t, y = inputs()
    kwargs = dict(ids_keep=sample_ids_keep(4, 4, 0.75), path_drop=torch.tensor([False, True, False, False]))
    with torch.no_grad():
        ref = model(x, t, y, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y, **kwargs)
    assert low.dtype == torch.bfloat16 and rel(low.float(), ref) < 2e-2   # bf16 keeps 8 bits of mantissa: ~4e-3 per op
