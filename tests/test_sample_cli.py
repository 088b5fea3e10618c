"""sample.py's command line, in this process: grids from the newest checkpoint, output names, the
released SPRINT file and latent models, and every bad flag in one table: one line, nothing
written. (Decoding saved latents: test_tools.py; a released DiT: test_dit.py.)"""

import os
import shutil
import sys
import types
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample
from test_checkpoints import official_layout
from tiny import (damaged_files, fixture, npz, run_sample, sampling_model, save_ckpt,
                  tiny_model, write_safetensors)

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


#################################################################################
#                   Grids, the newest checkpoint, output names                  #
#################################################################################

def test_grid_from_the_newest_checkpoint_in_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_ckpt(tmp_path / "results/000-sprint-B-2/checkpoints/0000100.pt", sampling_model(seed=1))
    new = save_ckpt(tmp_path / "results/001-sprint-B-2/checkpoints/0000050.pt",
                    sampling_model(seed=2))
    run_sample("--pdg", "--steps", 3, "--classes", 0, 1, 2, 3, 0, 1, "--per-proc-batch-size", 4)
    out = capsys.readouterr().out
    assert new.split(f"{tmp_path}/")[1] in out and "model passes" in out and "TFLOPs per image (CFG's" in out
    assert "img/s" in out
    png = tmp_path / "samples/001-sprint-B-2-0000050-pdg4.png"
    # a column per --classes entry, 2 px borders
    assert Image.open(png).size == (6 * 10 + 2, 10 + 2)
    run_sample("--steps", 3, "--classes", 0, 1, "--cfg-scale", 2)      # CFG: another file
    # the card's bare command, twice: a grid of 16 each time, none overwritten
    run_sample("--pdg", "--steps", 3)
    run_sample("--pdg", "--steps", 3)
    assert sorted(os.listdir(tmp_path / "samples")) == [
        "001-sprint-B-2-0000050-cfg2.png", "001-sprint-B-2-0000050-pdg4-2.png",
        "001-sprint-B-2-0000050-pdg4-3.png", "001-sprint-B-2-0000050-pdg4.png"]
    assert Image.open("samples/001-sprint-B-2-0000050-pdg4-3.png").size == (4 * 10 + 2,) * 2


def test_the_newest_checkpoint_is_the_highest_run_and_step_whatever_the_file_times(tmp_path,
                                                                                   capsys):
    """After cp -r, which does not keep file times, the newest file need not be the last step."""
    results = tmp_path / "results"
    steps = [save_ckpt(results / f"003-sprint-B-2/checkpoints/{step:07d}.pt", sampling_model())
             for step in (500, 2500)]
    save_ckpt(results / "002-sprint-B-2/checkpoints/0009000.pt", sampling_model())
    os.utime(steps[1], (1e9, 1e9))                                  # the last step: the oldest
    run_sample("--results-dir", results, "--steps", 1, "--num-samples", 1, "--out",
               tmp_path / "a.png")
    assert capsys.readouterr().out.startswith(f"{steps[1]}: ")


def test_without_ckpt_the_newest_checkpoint_of_the_model_pdg_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sprint_ckpt = save_ckpt(tmp_path / "runs/000-sprint-B-2/checkpoints/0000010.pt",
                            sampling_model())
    dit_ckpt = save_ckpt(tmp_path / "runs/001-dit-B-2/checkpoints/0000010.pt",
                         sampling_model("dit"))                    # the DiT run is the newer
    common = ["--results-dir", "runs", "--steps", 1, "--num-samples", 1]
    run_sample("--pdg", *common)                                    # PDG: the newest SPRINT
    run_sample(*common, "--out", "any.png")                         # CFG: the newest of any
    printed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()
               if line.startswith("runs/")]
    assert printed == [sprint_ckpt.split(f"{tmp_path}/")[1], dit_ckpt.split(f"{tmp_path}/")[1]]


#################################################################################
#                Bad flags: one line each, nothing written                      #
#################################################################################

def test_every_bad_flag_is_one_line_and_nothing_is_written(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cut = tmp_path.parent / f"{tmp_path.name}-cut.pt"
    cut.write_bytes(Path(ckpts["sprint"]).read_bytes()[:2000])
    damaged = tmp_path.parent / f"{tmp_path.name}-damaged"
    damaged.mkdir()
    (tmp_path / "taken.png").write_bytes(b"")
    # a released file by name, not in the cache: the download fails as it does without network
    monkeypatch.setenv("TORCH_HOME", str(damaged / "torch"))
    monkeypatch.setattr(sample.torch.hub, "download_url_to_file", offline)
    dit = ["--ckpt", ckpts["dit"]]
    ddpm = save_ckpt(tmp_path.parent / f"{tmp_path.name}-ddpm.pt",
                     tiny_model("dit", diffusion="ddpm", positions="table", qk_norm=False))
    misshapen = damaged / "misshapen.safetensors"            # a 1-D patch embedding
    write_safetensors(misshapen, {**official_layout(tiny_model()),
                                  "x_embedder.proj.weight": torch.zeros(32)}, "F32")
    cases = {
        "tensors that do not fit their names": (["--ckpt", misshapen], f"{misshapen}: cannot read "
                                                "a released SPRINT or DiT model off its tensors "
                                                "(IndexError"),
        "pdg without a sparse path": ([*dit, "--pdg"], "--pdg needs a model with a sparse path to "
                                                       "drop (SPRINT), not this dit"),
        "a class past the model's": ([*dit, "--classes", 1, 4], "--classes: class ids must lie in "
                                                                "0..3"),
        "interval upside down": ([*dit, "--guidance-interval", 0.8, 0.2], "--guidance-interval "
                                 "[0.8, 0.2]: need 0 <= LOW <= HIGH <= 1"),
        "not an output kind": ([*dit, "--out", "x.gif"], "--out x.gif: give an .npz"),
        "no steps": ([*dit, "--steps", 0], "argument --steps: 0: must be at least 1"),
        "an empty batch": ([*dit, "--per-proc-batch-size", 0], "argument --per-proc-batch-size: 0: "
                                                               "must be at least 1"),
        "no samples": ([*dit, "--num-samples", -3], "argument --num-samples: -3: must be at least "
                                                    "1"),
        "a flow model with DDPM": ([*dit, "--sampler", "ddpm"], "--sampler ddpm: this flow model "
                                                                "samples with sde, euler or heun"),
        "DDPM past its timesteps": (["--ckpt", ddpm, "--steps", 1001], "--steps 1001: DDPM keeps "
                                                                       "at most its 1000 timesteps"),
        "an existing output": ([*dit, "--out", "taken.png"], "--out taken.png exists: choose "
                                                             "another --out"),
        "no such checkpoint": (["--ckpt", "nope.pt"], "--ckpt nope.pt: no such file"),
        "no checkpoint to find": ([], "no checkpoint in results/*-*-*/checkpoints/*.pt: train one"),
        "a truncated checkpoint": (["--ckpt", cut], f"{cut}: not a readable checkpoint (cut "
                                                    f"short, damaged, or not one: RuntimeError)"),
        "a released file offline": (["--ckpt", "DiT-XL-2-256x256.pt"], "DiT-XL-2-256x256.pt: "
                                    "cannot download https://dl.fbaipublicfiles.com/DiT/models/"
                                    f"DiT-XL-2-256x256.pt to {damaged}/torch/hub/checkpoints/"
                                    "DiT-XL-2-256x256.pt (<urlopen error no network>); without "
                                    "network, put it there by hand"),
        **{f"a file {name}": (["--ckpt", damaged / name], f"{damaged / name}: n")
           for name in damaged_files(damaged, {"x_embedder.proj.weight": torch.zeros(4, 16)})},
    }
    for case, (argv, message) in cases.items():
        try:
            run_sample(*argv)
        except SystemExit as e:
            line = e.code
        else:
            pytest.fail(f"{case}: no error")
        if line == 2:                                               # argparse's own report
            line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("sample.py: error: ") and message in line, (case, line)
        assert os.listdir(tmp_path) == ["taken.png"], case            # nothing written
    assert capsys.readouterr().out == ""


#################################################################################
#             The released SPRINT file, latent models and the SD VAE            #
#################################################################################

def offline(url, dst, *args, **kwargs):
    """torch.hub.download_url_to_file on a machine without network: the error urllib raises."""
    raise urllib.error.URLError("no network")


def test_a_released_file_is_read_by_name_from_torchs_hub_cache(tmp_path, monkeypatch, capsys):
    """sample.py --ckpt sprint_XL_imagenet256.safetensors: downloaded from the official link into
    torch's hub cache once, then read from there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    official = fixture("official_sprint_tiny.safetensors")
    downloads = []

    def download(url, dst, *args, **kwargs):                      # the fixture stands in for it
        downloads.append((url, dst))
        shutil.copy(official, dst)
    monkeypatch.setattr(sample.torch.hub, "download_url_to_file", download)
    name = "sprint_XL_imagenet256.safetensors"
    for out in ("a.npz", "b.npz"):
        run_sample("--ckpt", name, "--image-size", 64, "--steps", 1, "--num-samples", 1, "--vae",
                   "none", "--out", tmp_path / out)
    cached = str(tmp_path / "torch" / "hub" / "checkpoints" / name)
    assert downloads == [(f"https://huggingface.co/snap-research/SPRINT/resolve/main/{name}",
                          cached)]
    assert capsys.readouterr().out.startswith(f"{cached}: sprint-")


def test_a_latent_models_bare_command_decodes_a_grid_of_16_with_the_papers_vae(tmp_path,
                                                                              monkeypatch):
    """python sample.py --pdg on an ImageNet-like run: 16 samples decoded by the SD-VAE (here a
    stand-in), not 50,000 latents."""
    monkeypatch.chdir(tmp_path)
    save_ckpt(tmp_path / "results/000-sprint-B-2/checkpoints/0000010.pt",
              sampling_model(in_channels=4), args={"latent_scale": 0.18215})
    loaded = []

    class VAE(torch.nn.Module):
        dtype = torch.float32

        def decode(self, z):
            return types.SimpleNamespace(sample=z[:, :3].repeat_interleave(8, -1)
                                         .repeat_interleave(8, -2).tanh())
    fake = types.ModuleType("diffusers")
    fake.AutoencoderKL = types.SimpleNamespace(from_pretrained=lambda path: loaded.append(path)
                                               or VAE())
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    run_sample("--pdg", "--steps", 2)
    assert loaded == ["stabilityai/sd-vae-ft-ema"]
    (grid,) = os.listdir(tmp_path / "samples")
    assert Image.open(tmp_path / "samples" / grid).size == (4 * 66 + 2,) * 2   # 16 of 64 px


def test_the_released_file_samples_and_with_vae_none_saves_latents(tmp_path, capsys):
    official = fixture("official_sprint_tiny.safetensors")
    # its architecture from its tensors; its latents' side, 8, is --image-size / 8
    run_sample("--ckpt", official, "--image-size", 64, "--pdg", "--steps", 3, "--num-samples", 3,
               "--out", tmp_path / "s.png", "--vae", "none")
    out = capsys.readouterr().out
    assert f"{tmp_path / 's.latents.npz'} holds latents, not images" in out
    assert "tools/decode_latents.py (pip install diffusers)" in out
    saved = npz(tmp_path / "s.latents.npz")
    assert saved["latents"].shape == (3, 4, 8, 8) and saved["arr_1"].shape == (3,)
