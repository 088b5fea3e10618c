"""sample.py's command line, in this process: grids from the newest checkpoint, output names, the
released SPRINT file and latent models, and every bad flag in one table: one line, nothing
written. (Decoding saved latents: test_tools.py; a released DiT: test_dit.py.)"""

import os
from pathlib import Path

import pytest
from PIL import Image

from tiny import ROOT, npz, run_sample, sampling_model, save_ckpt, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


#################################################################################
#                   Grids, the newest checkpoint, output names                  #
#################################################################################

def test_grid_from_the_newest_checkpoint_in_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = save_ckpt(tmp_path / "results/000-sprint-B-2/checkpoints/0000100.pt",
                    sampling_model(seed=1))
    new = save_ckpt(tmp_path / "results/001-sprint-B-2/checkpoints/0000050.pt",
                    sampling_model(seed=2))
    os.utime(old, (1e9, 1e9))
    run_sample("--pdg", "--steps", 3, "--classes", 0, 1, 2, 3, 0, 1, "--per-proc-batch-size", 4)
    out = capsys.readouterr().out
    assert new.split(f"{tmp_path}/")[1] in out and "model passes" in out and "TFLOPs per image (CFG's" in out
    assert "img/s" in out
    png = tmp_path / "samples/001-sprint-B-2-0000050-pdg4.png"
    # a column per --classes entry, 2 px borders
    assert Image.open(png).size == (6 * 10 + 2, 10 + 2)
    run_sample("--steps", 3, "--classes", 0, 1, "--cfg-scale", 2)      # CFG: another file
    assert sorted(os.listdir(tmp_path / "samples")) == ["001-sprint-B-2-0000050-cfg2.png",
                                                        "001-sprint-B-2-0000050-pdg4.png"]


def test_without_ckpt_the_newest_checkpoint_of_the_model_pdg_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sprint_ckpt = save_ckpt(tmp_path / "runs/000-sprint-B-2/checkpoints/0000010.pt",
                            sampling_model())
    dit_ckpt = save_ckpt(tmp_path / "runs/001-dit-B-2/checkpoints/0000010.pt",
                         sampling_model("dit"))
    os.utime(sprint_ckpt, (1e9, 1e9))                               # the DiT run is the newer
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
    (tmp_path / "taken.png").write_bytes(b"")
    dit = ["--ckpt", ckpts["dit"]]
    ddpm = save_ckpt(tmp_path.parent / f"{tmp_path.name}-ddpm.pt",
                     tiny_model("dit", diffusion="ddpm", positions="table", qk_norm=False))
    cases = {
        "pdg without a sparse path": ([*dit, "--pdg"], "--pdg needs a model with a sparse path to "
                                                       "drop (SPRINT), not this dit"),
        "a class past the model's": ([*dit, "--classes", 1, 4], "--classes: class ids must lie in "
                                                                "0..3"),
        "interval upside down": ([*dit, "--guidance-interval", 0.8, 0.2], "--guidance-interval "
                                 "[0.8, 0.2]: need 0 <= LOW <= HIGH <= 1"),
        "not an output kind": ([*dit, "--out", "x.gif"], "--out x.gif: give an .npz"),
        "no steps": ([*dit, "--steps", 0], "--steps 0: must be at least 1"),
        "an empty batch": ([*dit, "--per-proc-batch-size", 0], "--per-proc-batch-size 0: must be "
                                                               "at least 1"),
        "a flow model with DDPM": ([*dit, "--sampler", "ddpm"], "--sampler ddpm: this flow model "
                                                                "samples with sde, euler or heun"),
        "DDPM past its timesteps": (["--ckpt", ddpm, "--steps", 1001], "--steps 1001: DDPM keeps "
                                                                       "at most its 1000 timesteps"),
        "an existing output": ([*dit, "--out", "taken.png"], "--out taken.png exists: choose "
                                                             "another --out"),
        "no such checkpoint": (["--ckpt", "nope.pt"], "--ckpt nope.pt: no such file"),
        "no checkpoint to find": ([], "no checkpoint in results/*-*-*/checkpoints/*.pt: train one"),
        "a truncated checkpoint": (["--ckpt", cut], f"{cut}: not a readable checkpoint (cut "
                                                    f"short? "),
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

def test_the_released_file_samples_and_without_a_vae_saves_latents(tmp_path, capsys):
    official = ROOT / "tests/fixtures/official_sprint_tiny.safetensors"
    # its architecture from its tensors; its latents' side, 8, is --image-size / 8
    run_sample("--ckpt", official, "--image-size", 64, "--pdg", "--steps", 3, "--num-samples", 3,
               "--out", tmp_path / "s.png")
    out = capsys.readouterr().out
    assert f"{tmp_path / 's.latents.npz'} holds latents, not images" in out
    assert "tools/decode_latents.py (pip install diffusers)" in out
    saved = npz(tmp_path / "s.latents.npz")
    assert saved["latents"].shape == (3, 4, 8, 8) and saved["arr_1"].shape == (3,)
