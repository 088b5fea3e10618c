"""sample.py as a specification: path-drop guidance is CFG with a path-dropped unconditional pass, guidance obeys
its scale and interval, the SDE lands on the data distribution, samples depend only on the seed (not on batching
or the number of processes), interrupted runs resume, and the CLI says clearly what it cannot do."""
import os
import subprocess
import sys
import types
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
import models
import sample
import sprint


pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


def tiny(model="sprint", in_channels=3, seed=0):
    """A tiny model with random weights everywhere (adaLN-Zero and the zero final layer would output 0)."""
    cfg = models.ModelConfig(model=model, input_size=8, patch_size=2, in_channels=in_channels, hidden_size=32,
                             num_heads=2, depths=(1, 1, 1), num_classes=4)
    m = models.create_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def save_ckpt(path, model, **extra):
    """A checkpoint in train.py's layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    torch.save({"model": sd, "ema": sd, "config": asdict(model.cfg), "args": {}, "step": 1, **extra}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {name: save_ckpt(d / f"{name}.pt", tiny(name)) for name in ("sprint", "dit")}


def run(*argv):
    return sample.main([str(a) for a in argv])


class Recorder(torch.nn.Module):
    """Wraps a model and records (batch size, t, skip_middle) of every forward."""
    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []
        self.sampling_kwargs = model.sampling_kwargs

    def forward(self, x, t, y, skip_middle=False):
        self.calls.append((x.shape[0], float(t[0]), skip_middle))
        return self.model(x, t, y, skip_middle=skip_middle)


#################################################################################
#                                  Guidance                                     #
#################################################################################

def test_pdg_is_cfg_with_a_path_dropped_null_label_forward():
    # float64: CFG's one batch of 2B and separate forwards then agree far below any real difference
    model, (x, y) = tiny().double(), (torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 3]))
    t, w, tt, null = 0.6, 3.0, torch.full((3,), 0.6, dtype=torch.float64), torch.full((3,), 4)
    with torch.no_grad():
        v_c, v_u = model(x, tt, y), model(x, tt, null, skip_middle=True)
        pdg = sample.guided_velocity(model, x, t, y, cfg_scale=w, pdg=True)
        cfg = sample.guided_velocity(model, x, t, y, cfg_scale=w)
        v_u_cfg = model(x, tt, null)
    torch.testing.assert_close(pdg, v_u + w * (v_c - v_u), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(cfg, v_u_cfg + w * (v_c - v_u_cfg), atol=1e-10, rtol=1e-10)
    assert (pdg - cfg).abs().max() > 1e-3                     # the unconditional branches really differ


def test_pdg_runs_the_middle_blocks_once_per_step_cfg_batches_both_halves():
    model, x, y = tiny(), torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
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
    model, z, y = tiny(), torch.randn(2, 3, 8, 8), torch.tensor([2, 3])
    plain = sample.sample(model, z, y, "euler", 6)
    for pdg in (False, True):
        torch.testing.assert_close(sample.sample(model, z, y, "euler", 6, cfg_scale=1.0, pdg=pdg), plain)
    assert (sample.sample(model, z, y, "euler", 6, cfg_scale=3.0) - plain).abs().max() > 1e-3


def test_guidance_only_inside_the_interval():
    rec, z, y = Recorder(tiny()), torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    sample.sample(rec, z, y, "sde", 10, cfg_scale=2.0, interval=(0.3, 0.7))
    for batch, t, _ in rec.calls:
        assert batch == (4 if 0.3 <= t <= 0.7 else 2), t
    passes = sample.trajectory_passes("sde", 10, cfg_scale=2.0, interval=(0.3, 0.7))
    assert len(passes) == len(rec.calls) + sum(b == 4 for b, _, _ in rec.calls)
    # outside the interval the guided velocity is the conditional one, exactly
    model, x = tiny(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sample.guided_velocity(model, x, 0.9, y, 5.0, True, (0.3, 0.7)),
                                   model(x, torch.full((2,), 0.9), y))


def test_sparsedit_runs_the_grid_of_the_shared_t_unpadded():
    cfg = models.ModelConfig(model="sparsedit", input_size=16, patch_size=2, in_channels=3, hidden_size=32,
                             num_heads=2, depths=(1, 3, 1), num_classes=4, extra={"layout": [1, 1, 0, 1]})
    model, x, y = models.create_model(cfg), torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for t, side in ((0.9, 3), (0.5, 4), (0.1, 5)):
            assert model.sampling_kwargs(t) == {"side": side}
            padded = model(x, torch.full((2,), t), y)                 # every sample pooled to its own grid
            torch.testing.assert_close(sample.guided_velocity(model, x, t, y), padded, atol=1e-5, rtol=1e-5)


def test_pdg_flops_follow_the_passes():
    model = tiny()
    full, dropped = model.flops(), model.flops(skip_middle=True)
    assert dropped < full
    assert sample.trajectory_flops(model, "heun", 5, cfg_scale=2.0, pdg=True) == pytest.approx(10 * (full + dropped))
    assert sample.trajectory_flops(model, "sde", 5, cfg_scale=2.0) == pytest.approx(10 * full)
    assert sample.trajectory_flops(model, "euler", 5) == pytest.approx(5 * full)


#################################################################################
#                       Samplers on a problem with an answer                    #
#################################################################################

class GaussianVelocity(torch.nn.Module):
    """The exact velocity E[eps - x0 | x_t] for data x0 ~ N(mu, s^2) on the path x_t = (1 - t) x0 + t eps."""
    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s, self.cfg = mu, s, types.SimpleNamespace(num_classes=1)

    def sampling_kwargs(self, t):
        return {}

    def forward(self, x, t, y):
        t = t.double().view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.s**2 + t**2                               # Var[x_t]
        return ((t - (1 - t) * self.s**2) / var * (x - (1 - t) * self.mu) - self.mu).float()


@pytest.mark.parametrize("sampler, steps", [("sde", 250), ("euler", 250), ("heun", 50)])
def test_sampler_lands_on_the_data_distribution(sampler, steps):
    torch.manual_seed(0)
    mu, s = 0.3, 0.5
    z = torch.randn(4000, 1, 4, 4)
    x = sample.sample(GaussianVelocity(mu, s), z, torch.zeros(4000, dtype=torch.long), sampler, steps)
    assert abs(x.mean().item() - mu) < 0.01
    # the official SDE stops its noise at t = 0.04 and takes a last mean step: std 0.495 here, not 0.5
    assert abs(x.std().item() - s) < 0.01


#################################################################################
#                 Runs: seeds, ranks, resuming, grids, output                   #
#################################################################################

def npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def decode_snippet(out, latents, images):
    """README's recipe for decoding saved latents, which a run of a latent model without --vae points to, set to
    decode `latents` into `images` on the CPU."""
    assert "holds latents, not images" in out and "pip install diffusers" in out and str(latents) in out
    assert "README.md" in out and "'Decoding saved latents'" in out
    recipe = (ROOT / "README.md").read_text().split("**Decoding saved latents.**")[1]
    code = recipe.split("```python\n")[1].split("```")[0]
    placeholders = '"samples/run.latents.npz", "samples/run.png", "cuda"'
    assert placeholders in code
    return code.replace(placeholders, f'{str(latents)!r}, {str(images)!r}, "cpu"')


def test_same_seed_same_images_whatever_the_batching(ckpts, tmp_path):
    common = ["--ckpt", ckpts["sprint"], "--pdg", "--steps", 4, "--num-samples", 5]
    run(*common, "--per-proc-batch-size", 2, "--out", tmp_path / "a.npz")
    run(*common, "--per-proc-batch-size", 2, "--out", tmp_path / "b.npz")
    run(*common, "--per-proc-batch-size", 2, "--out", tmp_path / "c.npz", "--seed", 1)
    run(*common, "--per-proc-batch-size", 5, "--out", tmp_path / "d.npz")
    a, b, c, d = (npz(tmp_path / f"{n}.npz") for n in "abcd")
    assert a["arr_0"].shape == (5, 8, 8, 3) and a["arr_0"].dtype == np.uint8 and a["arr_1"].shape == (5,)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not np.array_equal(a["arr_0"], c["arr_0"])
    assert np.abs(a["arr_0"].astype(int) - d["arr_0"]).max() <= 1  # per-sample noise: batching is irrelevant
    assert not (tmp_path / "a.npz.parts").exists()                    # shards are removed once merged


def test_labels_cycle_through_classes_and_noise_does_not_depend_on_them():
    z1, y1, _ = sample.sample_inputs(range(3, 8), 0, [1, 2], 4, (3, 8, 8), "cpu")
    z2, y2, _ = sample.sample_inputs(range(3, 8), 0, None, 4, (3, 8, 8), "cpu")
    z3, _, _ = sample.sample_inputs(range(5, 6), 0, None, 4, (3, 8, 8), "cpu")
    assert y1.tolist() == [2, 1, 2, 1, 2] and all(0 <= c < 4 for c in y2.tolist())
    assert torch.equal(z1, z2) and torch.equal(z3[0], z1[2])


def test_two_gloo_processes_sample_exactly_what_one_does(ckpts, tmp_path):
    args = ["--ckpt", ckpts["sprint"], "--steps", "3", "--num-samples", "7", "--per-proc-batch-size", "2"]
    run(*args, "--out", tmp_path / "1.npz")                       # one thread, as each torchrun process has
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "sample.py"), *args, "--out", str(tmp_path / "2.npz")],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    one, two = npz(tmp_path / "1.npz"), npz(tmp_path / "2.npz")
    assert one["arr_0"].shape == (7, 8, 8, 3)
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])


def test_an_interrupted_run_continues_from_its_shards(ckpts, tmp_path, monkeypatch):
    args = ["--ckpt", ckpts["sprint"], "--steps", 3, "--num-samples", 7, "--per-proc-batch-size", 2]
    run(*args, "--out", tmp_path / "full.npz")
    calls, real = [], sample.sample

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(sample, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(*args, "--out", tmp_path / "resumed.npz")
    assert sorted(os.listdir(tmp_path / "resumed.npz.parts")) == ["000000.npz", "000001.npz", "run.json"]
    calls.clear()
    with pytest.raises(SystemExit, match="other settings.*cfg_scale"):
        run(*args, "--out", tmp_path / "resumed.npz", "--cfg-scale", 2)
    run(*args, "--out", tmp_path / "resumed.npz")
    assert len(calls) == 2                                          # only batches 2 and 3 were left
    full, resumed = npz(tmp_path / "full.npz"), npz(tmp_path / "resumed.npz")
    assert np.array_equal(full["arr_0"], resumed["arr_0"]) and np.array_equal(full["arr_1"], resumed["arr_1"])


def test_grid_from_the_newest_checkpoint_in_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = save_ckpt(tmp_path / "results/000-sprint-B-2/checkpoints/0000100.pt", tiny(seed=1))
    new = save_ckpt(tmp_path / "results/001-sprint-B-2/checkpoints/0000050.pt", tiny(seed=2))
    os.utime(old, (1e9, 1e9))
    run("--pdg", "--steps", 3, "--classes", 0, 1, 2, 3, 0, 1, "--per-proc-batch-size", 4)
    out = capsys.readouterr().out
    assert new in out and "model passes" in out and "TFLOPs" in out and "img/s" in out and "PDG saves" in out
    png = tmp_path / "samples/001-sprint-B-2-0000050-sde3-pdg4-seed0-n6-classes0_1_2_3_0_1.png"
    assert Image.open(png).size == (6 * 10 + 2, 10 + 2)             # a column per --classes entry, 2 px borders
    with pytest.raises(SystemExit, match="exists: pass --overwrite"):
        run("--pdg", "--steps", 3, "--classes", 0, 1, 2, 3, 0, 1, "--per-proc-batch-size", 4)
    run("--pdg", "--steps", 3, "--classes", 0, 1, 2, 3, 0, 1, "--overwrite")
    run("--pdg", "--steps", 3, "--classes", 0, 1)                    # other classes: another file, no --overwrite
    run("--pdg", "--steps", 3, "--classes", 0, 1, "--num-samples", 4)
    assert sorted(os.listdir(tmp_path / "samples"))[:2] == ["001-sprint-B-2-0000050-sde3-pdg4-seed0-n2-classes0_1.png",
                                                             "001-sprint-B-2-0000050-sde3-pdg4-seed0-n4-classes0_1.png"]


def test_without_ckpt_the_newest_checkpoint_of_the_model_pdg_needs(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sprint_ckpt = save_ckpt(tmp_path / "runs/000-sprint-B-2/checkpoints/0000010.pt", tiny())
    dit_ckpt = save_ckpt(tmp_path / "runs/001-dit-B-2/checkpoints/0000010.pt", tiny("dit"))
    os.utime(sprint_ckpt, (1e9, 1e9))                                     # the DiT run is the newer one
    common = ["--results-dir", "runs", "--steps", 1, "--num-samples", 1]
    run("--pdg", *common)                                                 # PDG: the newest SPRINT checkpoint
    run("--model", "dit", *common)
    run(*common, "--seed", 1)                                             # CFG, no --model: the newest of any
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("/")] == \
        [sprint_ckpt, dit_ckpt, dit_ckpt]
    with pytest.raises(SystemExit, match=r"no checkpoint in runs/\*-sparsedit-\*/checkpoints/\*\.pt: train one"):
        run("--model", "sparsedit", *common)


@pytest.mark.parametrize("argv, message", [
    (["--pdg"], "--pdg needs a model with a sparse path"),
    (["--classes", 1, 4], "--classes 1 4: class ids must lie in 0..3"),
    (["--guidance-interval", 0.8, 0.2], "--guidance-interval 0.8 0.2"),
    (["--out", "x.gif"], "--out x.gif: give an .npz"),
    (["--steps", 0], "--steps 0: must be at least 1"),
    (["--per-proc-batch-size", 0], "--per-proc-batch-size 0: must be at least 1"),
    (["--model", "sprint", "--size", "XL", "--patch-size", 2], r"--ckpt .*dit\.pt does not fit the flags given: "
     r"--model sprint differs from the checkpoint's dit; --size XL differs from the checkpoint's B; leave them out"),
])
def test_bad_flags_are_clear_errors(ckpts, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        run("--ckpt", ckpts["dit"], *argv)
    assert os.listdir(tmp_path) == []                                     # nothing written


def test_architecture_flags_that_agree_with_the_checkpoint_are_fine(ckpts, tmp_path):
    run("--ckpt", ckpts["dit"], "--model", "dit", "--size", "B", "--patch-size", 2, "--image-size", 8,
        "--in-channels", 3, "--num-classes", 4, "--steps", 1, "--num-samples", 1, "--out", tmp_path / "x.png")
    assert (tmp_path / "x.png").is_file()


def test_a_truncated_checkpoint_is_one_error_line_and_nothing_is_written(ckpts, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(Path(ckpts["sprint"]).read_bytes()[:2000])
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(cut)], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"sample.py: error: --ckpt {cut}: not a readable checkpoint (truncated?)"]
    assert os.listdir(tmp_path) == ["cut.pt"]


def test_missing_checkpoints_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--ckpt nope.pt: no such file"):
        run("--ckpt", "nope.pt")
    with pytest.raises(SystemExit, match="no checkpoint in results"):
        run()


#################################################################################
#             Official checkpoints, latent models and the SD VAE                #
#################################################################################

def test_official_safetensors_from_flags_saves_latents_without_a_vae(tmp_path, monkeypatch, capsys):
    # the fixture's architecture (hidden 96, 4 heads, 1/2/1 blocks) as a size, so that --size can name it
    monkeypatch.setitem(sprint.SIZES, "T", (96, 4, (1, 2, 1)))
    official = ROOT / "tests/fixtures/official_sprint_tiny.safetensors"
    flags = ["--ckpt", official, "--model", "sprint", "--size", "T", "--image-size", 64, "--num-classes", 10]
    with pytest.raises(SystemExit, match="does not fit this sprint-B model"):     # no config in the file: flags
        run("--ckpt", official, "--out", tmp_path / "x.png")
    run(*flags, "--pdg", "--steps", 3, "--num-samples", 3, "--out", tmp_path / "s.png")
    snippet = decode_snippet(capsys.readouterr().out, tmp_path / "s.latents.npz", tmp_path / "s.png")
    saved = npz(tmp_path / "s.latents.npz")
    assert saved["latents"].shape == (3, 4, 8, 8) and saved["arr_1"].shape == (3,)
    monkeypatch.setitem(sys.modules, "diffusers", None)                  # diffusers is not installed
    with pytest.raises(ValueError, match="pip install diffusers"):
        exec(snippet, {})


def test_vae_decodes_latents_divided_by_the_latent_scale(tmp_path, monkeypatch, capsys):
    decoded = []

    class FakeVAE(torch.nn.Module):
        def decode(self, z):
            decoded.append(z)
            return types.SimpleNamespace(sample=torch.tanh(z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)))
    fake = types.ModuleType("diffusers")
    fake.AutoencoderKL = types.SimpleNamespace(from_pretrained=lambda path: FakeVAE())
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    ckpt = save_ckpt(tmp_path / "lat.pt", tiny(in_channels=4), args={"latent_scale": 0.5})
    common = ["--ckpt", ckpt, "--steps", 3, "--num-samples", 3]
    run(*common, "--vae", "sd-vae", "--out", tmp_path / "img.npz")
    run(*common, "--out", tmp_path / "lat.npz")
    snippet = decode_snippet(capsys.readouterr().out, tmp_path / "lat.latents.npz", tmp_path / "lat.npz")
    run(*common, "--out", tmp_path / "lat4.npz", "--latent-scale", 0.25)   # the flag wins over the checkpoint's
    images, latents = npz(tmp_path / "img.npz"), npz(tmp_path / "lat.latents.npz")["latents"]
    assert images["arr_0"].shape == (3, 64, 64, 3) and images["arr_0"].dtype == np.uint8
    z, y, gens = sample.sample_inputs(range(3), 0, None, 4, (4, 8, 8), "cpu")
    x = sample.sample(models.load_model(ckpt), z, y, "sde", 3, gens, cfg_scale=4.0)
    torch.testing.assert_close(torch.from_numpy(latents), x / 0.5)     # model output / the checkpoint's scale
    torch.testing.assert_close(torch.cat(decoded), x / 0.5)            # ... is what the VAE decodes
    assert np.allclose(npz(tmp_path / "lat4.latents.npz")["latents"], 2 * latents, atol=1e-5)
    exec(snippet, {})                                                     # writes the images to lat.npz
    decoded = npz(tmp_path / "lat.npz")
    assert np.array_equal(decoded["arr_0"], images["arr_0"]) and np.array_equal(decoded["arr_1"], images["arr_1"])


#################################################################################
#                                  Benchmark                                    #
#################################################################################

def test_benchmark_from_flags_alone(capsys, monkeypatch):
    monkeypatch.setitem(sprint.SIZES, "T", (32, 2, (1, 2, 1)))
    flags = ["--size", "T", "--image-size", 8, "--in-channels", 3, "--num-classes", 4, "--benchmark",
             "--per-proc-batch-size", 2]
    ms = run("--model", "sprint", *flags)
    out = capsys.readouterr().out
    assert set(ms) == {"cfg", "pdg"} and all(v > 0 for v in ms.values())
    assert "ms/step" in out and "img/s" in out and "TFLOP/s" in out and "PDG/CFG speed-up" in out
    assert set(run("--model", "dit", *flags)) == {"cfg"}
