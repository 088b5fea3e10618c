"""sample.py as a specification: path-drop guidance is CFG with a path-dropped unconditional pass,
guidance obeys its scale and interval, the samplers land on the data distribution, samples depend
only on their seed (not on batching or the number of processes), labels follow --classes,
interrupted runs resume, and an .npz of any size is written shard by shard."""

import math
import os
import types

import numpy as np
import pytest
import torch

import sample
import sprint
from sparsedit import MODELS
from tiny import npz, peak_growth, run_sample, sampling_model, two_ranks

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


class Recorder(torch.nn.Module):
    """Wraps a model and records (batch size, t, skip_middle) of every forward."""
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.calls = []
        self.sampling_kwargs = model.sampling_kwargs
        self.noise_level = model.noise_level

    def forward(self, x, t, y, skip_middle=False):
        self.calls.append((x.shape[0], float(t[0]), skip_middle))
        return self.model(x, t, y, skip_middle=skip_middle)


#################################################################################
#                                  Guidance                                     #
#################################################################################

def test_pdg_is_cfg_with_a_path_dropped_null_label_forward():
    # float64: CFG's one batch of 2B and separate forwards then agree far below any real difference
    model, (x, y) = sampling_model().double(), (
        torch.randn(3, 3, 8, 8, dtype=torch.float64),
        torch.tensor([0, 1, 3]),
    )
    t, w, tt, null = 0.6, 3.0, torch.full((3,), 0.6, dtype=torch.float64), torch.full((3,), 4)
    with torch.no_grad():
        v_c, v_u = model(x, tt, y), model(x, tt, null, skip_middle=True)
        pdg = sample.guided_velocity(model, x, t, y, cfg_scale=w, pdg=True)
        cfg = sample.guided_velocity(model, x, t, y, cfg_scale=w)
        v_u_cfg = model(x, tt, null)
    torch.testing.assert_close(pdg, v_u + w * (v_c - v_u), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(cfg, v_u_cfg + w * (v_c - v_u_cfg), atol=1e-10, rtol=1e-10)
    # the unconditional branches really differ
    assert (pdg - cfg).abs().max() > 1e-3


def test_pdg_runs_the_middle_blocks_once_per_step_cfg_batches_both_halves():
    model, x, y = sampling_model(), torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    seen = []
    model.middle[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    rec = Recorder(model)
    with torch.no_grad():
        sample.guided_velocity(rec, x, 0.5, y, cfg_scale=2.0, pdg=True)
        assert seen == [2] and rec.calls == [(2, 0.5, False), (2, 0.5, True)]
        seen.clear()
        rec.calls.clear()
        sample.guided_velocity(rec, x, 0.5, y, cfg_scale=2.0)
        assert seen == [4] and rec.calls == [(4, 0.5, False)]    # one forward of cond + uncond


def test_cfg_scale_one_is_plain_conditional_sampling():
    model, z, y = sampling_model(), torch.randn(2, 3, 8, 8), torch.tensor([2, 3])
    plain = sample.sample(model, z, y, "euler", 6)
    for pdg in (False, True):
        torch.testing.assert_close(
            sample.sample(model, z, y, "euler", 6, cfg_scale=1.0, pdg=pdg), plain
        )
    assert (sample.sample(model, z, y, "euler", 6, cfg_scale=3.0) - plain).abs().max() > 1e-3


def test_guidance_only_inside_the_interval():
    rec, z, y = Recorder(sampling_model()), torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    sample.sample(rec, z, y, "sde", 10, cfg_scale=2.0, interval=(0.3, 0.7))
    for batch, t, _ in rec.calls:
        assert batch == (4 if 0.3 <= t <= 0.7 else 2), t
    passes = sample.trajectory_passes("sde", 10, cfg_scale=2.0, interval=(0.3, 0.7))
    assert len(passes) == len(rec.calls) + sum(b == 4 for b, _, _ in rec.calls)
    # outside the interval the guided velocity is the conditional one, exactly
    model, x = sampling_model(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sample.guided_velocity(model, x, 0.9, y, 5.0, True, (0.3, 0.7)),
                                   model(x, torch.full((2,), 0.9), y))


def test_sparsedit_runs_the_grid_of_the_shared_t_unpadded():
    cfg = sprint.ModelConfig(
        model="sparsedit",
        input_size=16,
        patch_size=2,
        in_channels=3,
        hidden_size=32,
        num_heads=2,
        depths=(1, 3, 1),
        num_classes=4,
        extra={"layout": [1, 1, 0, 1]},
    )
    model, x, y = MODELS[cfg.model](cfg), torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for t, side in ((0.9, 3), (0.5, 4), (0.1, 5)):
            assert model.sampling_kwargs(t) == {"side": side}
            # every sample pooled to its own grid
            padded = model(x, torch.full((2,), t), y)
            torch.testing.assert_close(
                sample.guided_velocity(model, x, t, y), padded, atol=1e-5, rtol=1e-5
            )


def test_pdg_flops_follow_the_passes():
    model = sampling_model()
    full, dropped = model.flops(), model.flops(skip_middle=True)
    assert dropped < full
    assert sample.trajectory_flops(model, "heun", 5, cfg_scale=2.0, pdg=True) == pytest.approx(
        10 * (full + dropped)
    )
    assert sample.trajectory_flops(model, "sde", 5, cfg_scale=2.0) == pytest.approx(10 * full)
    assert sample.trajectory_flops(model, "euler", 5) == pytest.approx(5 * full)


#################################################################################
#                       Samplers on a problem with an answer                    #
#################################################################################

class GaussianVelocity(torch.nn.Module):
    """The exact velocity E[eps - x0 | x_t] for data x0 ~ N(mu, s^2) on the path
    x_t = (1 - t) x0 + t eps."""
    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s, self.cfg = mu, s, types.SimpleNamespace(num_classes=1)

    def sampling_kwargs(self, t):
        return {}

    def noise_level(self, t):
        return t

    def forward(self, x, t, y):
        t = t.double().view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.s**2 + t**2                               # Var[x_t]
        return ((t - (1 - t) * self.s**2) / var * (x - (1 - t) * self.mu) - self.mu).float()


def test_the_sde_sampler_is_the_official_euler_maruyama_loop_guided_on_its_drift(monkeypatch):
    """SiT's and SPRINT's sample_sde written out: times linspace(1, 0.04, steps), then 0; each step
    x += d dt + sqrt(w |dt|) noise with w = 2t and the drift d = v - w/2 * score, the score
    -(x + (1 - t) v) / t; CFG mixes the two drifts; the last step, 0.04 to 0, adds no noise."""
    model, steps, scale = sampling_model(), 6, 3.0
    z, y, null = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 3]), torch.full((2,), 4)
    noises = [torch.randn_like(z) for _ in range(steps - 1)]
    given = iter(noises)
    monkeypatch.setattr(sample, "noise_like", lambda x, generators=None: next(given))
    ours = sample.sample(model, z, y, "sde", steps, cfg_scale=scale)
    times = torch.linspace(1, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
    x = z
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        w, dt = 2 * t, t_next - t
        with torch.no_grad():
            v_c, v_u = (model(x.float(), torch.full((2,), t), label).double() for label in (y, null))
        d_c, d_u = (v - 0.5 * w * -(x + (1 - t) * v) / t for v in (v_c, v_u))
        x = x + (d_u + scale * (d_c - d_u)) * dt
        if i < steps - 1:
            x = x + math.sqrt(w) * noises[i] * math.sqrt(abs(dt))
    torch.testing.assert_close(ours, x.float(), rtol=1e-5, atol=1e-5)


def test_images_become_pixels_as_each_papers_sampling_code_converts_them():
    """SPRINT's sample_ddp: clamp(255 (x + 1) / 2, 0, 255) truncated to uint8 (in bf16 on CUDA);
    DiT's, and SparseDiT's after it: clamp(127.5 x + 128, 0, 255) truncated (in fp32 with TF32)."""
    x = torch.linspace(-1.2, 1.2, 10001).reshape(1, 1, 1, -1).expand(1, 3, 1, -1)
    values = x[0, 0].numpy()
    sprint_pixels = np.clip(255 * ((values + 1) / 2), 0, 255).astype(np.uint8)
    dit_pixels = np.clip(127.5 * values + 128, 0, 255).astype(np.uint8)
    assert np.array_equal(sample.to_uint8(x, "flow")[0, ..., 0], sprint_pixels)
    assert np.array_equal(sample.to_uint8(x, "ddpm")[0, ..., 0], dit_pixels)
    assert not np.array_equal(sprint_pixels, dit_pixels)           # half a level apart
    assert {k: precision for k, (precision, _) in sample.SAMPLING.items()} == {"flow": "bf16",
                                                                               "ddpm": "fp32"}


def test_sprints_pixels_are_computed_in_the_vaes_bf16_as_its_sample_ddp_computes_them():
    """SPRINT's sample_ddp.py decodes in bf16 and computes (x + 1) / 2 and 255 x in bf16, each
    rounded, before clamping and truncating: the same pixels from the same bf16 images, where
    float32 arithmetic puts about one in ten a level apart."""
    x = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1)
    x = x.bfloat16()                                                # the VAE's output
    official = torch.clamp(255.0 * ((x + 1) / 2.0), 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
    assert np.array_equal(sample.to_uint8(x, "flow"), official.numpy())
    assert (sample.to_uint8(x.float(), "flow") != official.numpy()).mean() > 0.05


@pytest.mark.parametrize("sampler, steps", [("sde", 250), ("euler", 250), ("heun", 50)])
def test_sampler_lands_on_the_data_distribution(sampler, steps):
    torch.manual_seed(0)
    mu, s = 0.3, 0.5
    z = torch.randn(4000, 1, 4, 4)
    x = sample.sample(
        GaussianVelocity(mu, s), z, torch.zeros(4000, dtype=torch.long), sampler, steps
    )
    assert abs(x.mean().item() - mu) < 0.01
    # the official SDE stops its noise at t = 0.04 and takes a last mean step: std 0.495 here
    assert abs(x.std().item() - s) < 0.01


#################################################################################
#                 Runs: seeds, ranks, resuming, grids, output                   #
#################################################################################

def test_same_seed_same_images_whatever_the_batching(ckpts, tmp_path):
    common = ["--ckpt", ckpts["sprint"], "--pdg", "--steps", 4, "--num-samples", 5]
    run_sample(*common, "--per-proc-batch-size", 2, "--out", tmp_path / "a.npz")
    run_sample(*common, "--per-proc-batch-size", 2, "--out", tmp_path / "b.npz")
    run_sample(*common, "--per-proc-batch-size", 2, "--out", tmp_path / "c.npz", "--seed", 1)
    run_sample(*common, "--per-proc-batch-size", 5, "--out", tmp_path / "d.npz")
    a, b, c, d = (npz(tmp_path / f"{n}.npz") for n in "abcd")
    assert (
        a["arr_0"].shape == (5, 8, 8, 3)
        and a["arr_0"].dtype == np.uint8
        and a["arr_1"].shape == (5,)
    )
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not np.array_equal(a["arr_0"], c["arr_0"])
    # per-sample noise: batching is irrelevant
    assert np.abs(a["arr_0"].astype(int) - d["arr_0"]).max() <= 1
    # shards are removed once merged
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz", "c.npz", "d.npz"]


def test_labels_cycle_through_classes_and_noise_does_not_depend_on_them():
    z1, y1, _ = sample.sample_inputs(range(3, 8), 0, [1, 2], 4, (3, 8, 8), "cpu")
    z2, y2, _ = sample.sample_inputs(range(3, 8), 0, None, 4, (3, 8, 8), "cpu")
    z3, _, _ = sample.sample_inputs(range(5, 6), 0, None, 4, (3, 8, 8), "cpu")
    assert y1.tolist() == [2, 1, 2, 1, 2] and all(0 <= c < 4 for c in y2.tolist())
    assert torch.equal(z1, z2) and torch.equal(z3[0], z1[2])


def test_two_gloo_processes_sample_exactly_what_one_does(ckpts, tmp_path):
    args = ["--ckpt", ckpts["sprint"], "--steps", "3", "--num-samples", "7",
            "--per-proc-batch-size", "2"]
    run_sample(*args, "--out", tmp_path / "1.npz")
    for code, stderr in two_ranks("sample.py", *args, "--out", tmp_path / "2.npz", cwd=tmp_path):
        assert code == 0, stderr
    one, two = npz(tmp_path / "1.npz"), npz(tmp_path / "2.npz")
    assert one["arr_0"].shape == (7, 8, 8, 3)
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])


def test_an_interrupted_run_continues_from_its_shards(ckpts, tmp_path, monkeypatch):
    args = ["--ckpt", ckpts["sprint"], "--steps", 3, "--num-samples", 7, "--per-proc-batch-size", 2]
    run_sample(*args, "--out", tmp_path / "full.npz")
    calls, real = [], sample.sample

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(sample, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sample(*args, "--out", tmp_path / "resumed.npz")
    (parts,) = tmp_path.glob("resumed.npz.parts-*")                   # named by the settings
    assert sorted(os.listdir(parts)) == ["000000.npz", "000001.npz"]  # whole shards only
    calls.clear()
    # other settings: their own shards, never mixed with these
    run_sample(*args, "--out", tmp_path / "resumed.npz", "--cfg-scale", 2, "--num-samples", 1)
    assert len(calls) == 1 and sorted(os.listdir(parts)) == ["000000.npz", "000001.npz"]
    (tmp_path / "resumed.npz").unlink()
    calls.clear()
    run_sample(*args, "--out", tmp_path / "resumed.npz")             # the same command again
    assert len(calls) == 2                                          # only batches 2 and 3 were left
    full, resumed = npz(tmp_path / "full.npz"), npz(tmp_path / "resumed.npz")
    assert np.array_equal(full["arr_0"], resumed["arr_0"]) and np.array_equal(
        full["arr_1"], resumed["arr_1"]
    )
    assert not parts.exists()


def test_the_npz_is_written_shard_by_shard_not_whole(tmp_path):
    """20 shards of 64 images at 128 px (63 MB) merged into one .npz: resident memory grows by about
    a shard while it runs (measured: 10 MB), not by the set (np.concatenate of the shards, then
    np.savez: 126 MB); the file reads back as np.savez's would."""
    parts = tmp_path / "s.npz.parts"
    parts.mkdir()
    rng = np.random.default_rng(0)
    shards = [str(parts / f"{k:06d}.npz") for k in range(20)]
    for k, shard in enumerate(shards):
        np.savez(shard, arr_0=np.full((64, 128, 128, 3), k, np.uint8),
                 arr_1=rng.integers(0, 9, 64))
    labels = [npz(shard)["arr_1"] for shard in shards]
    _, grown = peak_growth(lambda: sample.merge_shards(shards, str(tmp_path / "s.npz"), 1280))
    assert grown < 30e6, f"resident memory grew by {grown / 1e6:.0f} MB"
    merged = npz(tmp_path / "s.npz")
    assert merged["arr_0"].shape == (1280, 128, 128, 3) and merged["arr_0"].dtype == np.uint8
    assert np.array_equal(merged["arr_0"][::64, 0, 0, 0], np.arange(20))
    assert np.array_equal(merged["arr_1"], np.concatenate(labels))
    assert sorted(os.listdir(tmp_path)) == ["s.npz", "s.npz.parts"]   # no temporary file left
