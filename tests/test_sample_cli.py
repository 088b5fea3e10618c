"""sample.py's command line, in this process: grids from the newest checkpoint, output names,
official weights and latent models, and every bad flag: one line, nothing written. (Decoding saved
latents: test_tools.py.)"""

import os
from pathlib import Path

import pytest
from PIL import Image

import sprint
from tiny import ROOT, npz, run_sample, sampling_model, save_ckpt

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


def test_a_truncated_checkpoint_is_one_error_line_and_nothing_is_written(ckpts, tmp_path,
                                                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(Path(ckpts["sprint"]).read_bytes()[:2000])
    with pytest.raises(SystemExit) as e:
        run_sample("--ckpt", cut)
    assert e.value.code == f"sample.py: error: --ckpt {cut}: not a readable checkpoint (truncated?)"
    assert capsys.readouterr().out == "" and os.listdir(tmp_path) == ["cut.pt"]


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
    # no config in the file: the flags build the model (here with the default 1000 classes)
    with pytest.raises(SystemExit, match=r"does not fit this sprint-T model \(check .*\):\n  shape "
                                         r"mismatch: y_embedder.embedding_table.weight: file "
                                         r"\(11, 96\) vs model \(1001, 96\)$"):
        run_sample(*flags[:6], "--out", tmp_path / "x.png")
    run_sample(*flags, "--pdg", "--steps", 3, "--num-samples", 3, "--out", tmp_path / "s.png")
    out = capsys.readouterr().out
    assert f"{tmp_path / 's.latents.npz'} holds latents, not images" in out
    assert "tools/decode_latents.py (pip install diffusers)" in out
    saved = npz(tmp_path / "s.latents.npz")
    assert saved["latents"].shape == (3, 4, 8, 8) and saved["arr_1"].shape == (3,)
