"""sample.py's command line: grids from the newest checkpoint, output names, official weights,
latent models and the VAE, the benchmark, and every bad flag: one line, nothing written."""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
import sample
import sprint
from tiny import ENV, ROOT, npz, run_sample, sampling_model, save_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py




#################################################################################
#                   Grids, the newest checkpoint, output names                  #
#################################################################################

def test_grid_from_the_newest_checkpoint_in_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = save_ckpt(
        tmp_path / "results/000-sprint-B-2/checkpoints/0000100.pt", sampling_model(seed=1)
    )
    new = save_ckpt(
        tmp_path / "results/001-sprint-B-2/checkpoints/0000050.pt", sampling_model(seed=2)
    )
    os.utime(old, (1e9, 1e9))
    run_sample("--pdg", "--steps", 3, "--classes", 0, 1, 2, 3, 0, 1, "--per-proc-batch-size", 4)
    out = capsys.readouterr().out
    assert (
        new in out
        and "model passes" in out
        and "TFLOPs" in out
        and "img/s" in out
        and "PDG saves" in out
    )
    png = tmp_path / "samples/001-sprint-B-2-0000050-sde3-pdg4-seed0-n6-classes0_1_2_3_0_1.png"
    # a column per --classes entry, 2 px borders
    assert Image.open(png).size == (6 * 10 + 2, 10 + 2)
    with pytest.raises(SystemExit, match="exists: pass --overwrite"):
        run_sample("--pdg", "--steps", 3, "--classes", 0, 1, 2, 3, 0, 1, "--per-proc-batch-size", 4)
    run_sample("--pdg", "--steps", 3, "--classes", 0, 1, 2, 3, 0, 1, "--overwrite")
    # other classes: another file, no --overwrite
    run_sample("--pdg", "--steps", 3, "--classes", 0, 1)
    run_sample("--pdg", "--steps", 3, "--classes", 0, 1, "--num-samples", 4)
    assert sorted(os.listdir(tmp_path / "samples"))[:2] == [
        "001-sprint-B-2-0000050-sde3-pdg4-seed0-n2-classes0_1.png",
        "001-sprint-B-2-0000050-sde3-pdg4-seed0-n4-classes0_1.png",
    ]


def test_without_ckpt_the_newest_checkpoint_of_the_model_pdg_needs(
    ckpts, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    sprint_ckpt = save_ckpt(
        tmp_path / "runs/000-sprint-B-2/checkpoints/0000010.pt", sampling_model()
    )
    dit_ckpt = save_ckpt(
        tmp_path / "runs/001-dit-B-2/checkpoints/0000010.pt", sampling_model("dit")
    )
    # the DiT run is the newer one
    os.utime(sprint_ckpt, (1e9, 1e9))
    common = ["--results-dir", "runs", "--steps", 1, "--num-samples", 1]
    # PDG: the newest SPRINT checkpoint
    run_sample("--pdg", *common)
    run_sample("--model", "dit", *common)
    # CFG, no --model: the newest of any
    run_sample(*common, "--seed", 1)
    assert [
        line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("/")
    ] == [sprint_ckpt, dit_ckpt, dit_ckpt]
    with pytest.raises(
        SystemExit, match=r"no checkpoint in runs/\*-sparsedit-\*/checkpoints/\*\.pt: train one"
    ):
        run_sample("--model", "sparsedit", *common)


#################################################################################
#                      Bad flags: one line, nothing written                     #
#################################################################################


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pdg"], "--pdg needs a model with a sparse path"),
        (["--classes", 1, 4], "--classes 1 4: class ids must lie in 0..3"),
        (["--guidance-interval", 0.8, 0.2], "--guidance-interval 0.8 0.2"),
        (["--out", "x.gif"], "--out x.gif: give an .npz"),
        (["--steps", 0], "--steps 0: must be at least 1"),
        (["--per-proc-batch-size", 0], "--per-proc-batch-size 0: must be at least 1"),
        (
            ["--model", "sprint", "--size", "XL", "--patch-size", 2],
            r"--ckpt .*dit\.pt does not fit the flags given: "
            r"--model sprint differs from the checkpoint's dit; --size XL differs from the "
            r"checkpoint's B; leave them out",
        ),
    ],
)
def test_bad_flags_are_clear_errors(ckpts, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        run_sample("--ckpt", ckpts["dit"], *argv)
    assert os.listdir(tmp_path) == []                                     # nothing written


def test_architecture_flags_that_agree_with_the_checkpoint_are_fine(ckpts, tmp_path):
    run_sample(
        "--ckpt",
        ckpts["dit"],
        "--model",
        "dit",
        "--size",
        "B",
        "--patch-size",
        2,
        "--image-size",
        8,
        "--in-channels",
        3,
        "--num-classes",
        4,
        "--steps",
        1,
        "--num-samples",
        1,
        "--out",
        tmp_path / "x.png",
    )
    assert (tmp_path / "x.png").is_file()


def test_a_truncated_checkpoint_is_one_error_line_and_nothing_is_written(ckpts, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(Path(ckpts["sprint"]).read_bytes()[:2000])
    r = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(cut)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"sample.py: error: --ckpt {cut}: not a readable checkpoint (truncated?)"
    ]
    assert os.listdir(tmp_path) == ["cut.pt"]


def test_missing_checkpoints_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--ckpt nope.pt: no such file"):
        run_sample("--ckpt", "nope.pt")
    with pytest.raises(SystemExit, match="no checkpoint in results"):
        run_sample()


#################################################################################
#             Official checkpoints, latent models and the SD VAE                #
#################################################################################

def test_official_safetensors_from_flags_saves_latents_without_a_vae(tmp_path, monkeypatch, capsys):
    # the fixture's architecture (hidden 96, 4 heads, 1/2/1 blocks) as a size that --size can name
    monkeypatch.setitem(sprint.SIZES, "T", (96, 4, (1, 2, 1)))
    official = ROOT / "tests/fixtures/official_sprint_tiny.safetensors"
    flags = [
        "--ckpt",
        official,
        "--model",
        "sprint",
        "--size",
        "T",
        "--image-size",
        64,
        "--num-classes",
        10,
    ]
    # no config in the file: flags
    with pytest.raises(SystemExit, match="does not fit this sprint-B model"):
        run_sample("--ckpt", official, "--out", tmp_path / "x.png")
    run_sample(*flags, "--pdg", "--steps", 3, "--num-samples", 3, "--out", tmp_path / "s.png")
    out = capsys.readouterr().out
    assert f"{tmp_path / 's.latents.npz'} holds latents, not images" in out
    assert "sample.decode_latents (pip install diffusers)" in out
    saved = npz(tmp_path / "s.latents.npz")
    assert saved["latents"].shape == (3, 4, 8, 8) and saved["arr_1"].shape == (3,)
    # diffusers is not installed
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ValueError, match="pip install diffusers"):
        sample.decode_latents(tmp_path / "s.latents.npz", str(tmp_path / "s.png"), "sd-vae", "cpu")


def test_vae_decodes_latents_divided_by_the_latent_scale(tmp_path, monkeypatch, capsys):
    decoded = []

    class FakeVAE(torch.nn.Module):
        def decode(self, z):
            decoded.append(z)
            return types.SimpleNamespace(
                sample=torch.tanh(z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2))
            )
    fake = types.ModuleType("diffusers")
    fake.AutoencoderKL = types.SimpleNamespace(from_pretrained=lambda path: FakeVAE())
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    ckpt = save_ckpt(tmp_path / "lat.pt", sampling_model(in_channels=4), args={"latent_scale": 0.5})
    common = ["--ckpt", ckpt, "--steps", 3, "--num-samples", 3]
    run_sample(*common, "--vae", "sd-vae", "--out", tmp_path / "img.npz")
    run_sample(*common, "--out", tmp_path / "lat.npz")
    assert "holds latents, not images" in capsys.readouterr().out
    # the flag wins over the checkpoint's
    run_sample(*common, "--out", tmp_path / "lat4.npz", "--latent-scale", 0.25)
    images, latents = npz(tmp_path / "img.npz"), npz(tmp_path / "lat.latents.npz")["latents"]
    assert images["arr_0"].shape == (3, 64, 64, 3) and images["arr_0"].dtype == np.uint8
    z, y, gens = sample.sample_inputs(range(3), 0, None, 4, (4, 8, 8), "cpu")
    x = sample.sample(models.load_model(ckpt), z, y, "sde", 3, gens, cfg_scale=4.0)
    # model output / the checkpoint's scale
    torch.testing.assert_close(torch.from_numpy(latents), x / 0.5)
    torch.testing.assert_close(torch.cat(decoded), x / 0.5)            # ... is what the VAE decodes
    assert np.allclose(npz(tmp_path / "lat4.latents.npz")["latents"], 2 * latents, atol=1e-5)
    decoded.clear()
    sample.decode_latents(tmp_path / "lat.latents.npz", str(tmp_path / "lat.npz"), "sd-vae", "cpu")
    # the saved latents, as they were
    torch.testing.assert_close(torch.cat(decoded), x / 0.5)
    decoded = npz(tmp_path / "lat.npz")
    assert np.array_equal(decoded["arr_0"], images["arr_0"]) and np.array_equal(
        decoded["arr_1"], images["arr_1"]
    )


#################################################################################
#                                  Benchmark                                    #
#################################################################################

def test_benchmark_from_flags_alone(capsys, monkeypatch):
    monkeypatch.setitem(sprint.SIZES, "T", (32, 2, (1, 2, 1)))
    flags = [
        "--size",
        "T",
        "--image-size",
        8,
        "--in-channels",
        3,
        "--num-classes",
        4,
        "--benchmark",
        "--per-proc-batch-size",
        2,
        "--sampler",
        "euler",
        "--steps",
        10,
    ]
    ms = run_sample("--model", "sprint", *flags)
    lines = capsys.readouterr().out.splitlines()
    assert set(ms) == {"cfg", "pdg"}
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:4]}
    for mode in ("cfg", "pdg"):
        step_ms, img_s, _ = rows[mode]
        assert step_ms == pytest.approx(ms[mode], abs=0.01)
        assert img_s == pytest.approx(2 * 1e3 / (ms[mode] * 10), rel=1e-2)   # 10 guided steps
    assert f"PDG/CFG speed-up per step: {ms['cfg'] / ms['pdg']:.2f}x" in lines[4]
    assert set(run_sample("--model", "dit", *flags)) == {"cfg"}
