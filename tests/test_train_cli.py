"""train.py's command line: a run end to end and its folders, and every bad input: refused early, in
one line naming its flag, with nothing written. In this process, as `python train.py` runs it
(train.cli turns errors into that one line)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from sparsedit import SparseDiT
from sprint import ModelConfig, sample_ids_keep
from tiny import TINY, image_folder, records, run

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


def cli_error(tmp_path, *flags, capsys=None):
    """The one line `python train.py TINY flags` ends with (cwd: tmp_path)."""
    with pytest.raises(SystemExit) as e:
        train.cli([*TINY, "--results-dir", str(tmp_path / "results"), *flags])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


#################################################################################
#                       The loop, end to end, from the CLI                      #
#################################################################################

@pytest.mark.parametrize("model", ["dit", "sprint"])
def test_the_cli_trains_end_to_end_and_the_held_out_loss_falls(tmp_path, model, capsys):
    run_dir = run(tmp_path, "--model", model, "--steps", "40", "--eval-every", "20",
                  # train.py's main, in this process
                  "--sample-every", "40", "--ckpt-every", "20")
    assert "img/s" in capsys.readouterr().err                         # the progress bar
    assert run_dir.name == f"000-{model}-B-4"
    evals = [rec for rec in records(run_dir) if "eval_loss" in rec]
    assert [rec["step"] for rec in evals] == [0, 20, 40]
    # measured: 1.45 at step 0, 1.11 (dit) and 1.18 (sprint) at step 40, ratios 0.76 and 0.81;
    # a loop that does not learn stays near 1.45
    assert evals[-1]["eval_loss"] < 0.9 * evals[0]["eval_loss"]
    # the train-inference gap, SPRINT
    assert ("eval_loss_drop" in evals[0]) == (model == "sprint")
    assert (run_dir / "samples" / "0000040.png").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "0000040.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "opt", "config", "args", "step", "rng", "data", "train_s"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    # all that sample.py --ckpt needs
    net = sample.load_model(str(run_dir / "checkpoints" / "0000040.pt"))
    cfg = net.cfg
    assert (cfg.model, cfg.hidden_size, cfg.num_classes, cfg.input_size) == (model, 32, 10, 16)


def test_a_new_run_never_reuses_a_run_folder(tmp_path):
    first = run(tmp_path, "--steps", "1")
    second = run(tmp_path, "--steps", "1")
    assert (first.name, second.name) == ("000-sprint-B-4", "001-sprint-B-4")


def test_checkpoints_every_0_steps_means_only_at_the_end_of_each_stage(tmp_path):
    run_dir = run(tmp_path, "--steps", "3", "--finetune-steps", "2", "--ckpt-every", "0")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["0000003.pt", "0000005.pt"]


#################################################################################
#                        Bad input: early, by its flag                          #
#################################################################################

@pytest.fixture(scope="module")
def stage1_ckpts(tmp_path_factory):
    """The checkpoints of a one-step SPRINT run and of a one-step DiT run."""
    tmp = tmp_path_factory.mktemp("stage1")
    sprint_run = run(tmp, "--steps", "1")
    dit_run = run(tmp, "--model", "dit", "--steps", "1")
    return sprint_run / "checkpoints" / "0000001.pt", dit_run / "checkpoints" / "0000001.pt"


def bad_input(case, tmp, ckpt, dit_ckpt):
    """The flags of one bad input, and the message they must raise."""
    os.makedirs(tmp / "empty" / "class0")
    broken = image_folder(tmp / "broken", classes=1, per_class=7)
    (broken / "class0" / "broken.png").write_bytes(b"not a png")
    small = image_folder(tmp / "small", classes=1, per_class=8, size=(10, 10))
    np.savez(tmp / "no_y.npz", x=np.zeros((8, 8, 8, 3), np.uint8), labels=np.zeros(8))
    latents = np.zeros((12, 4, 8, 8), np.float32)
    latents[7, 1, 2, 3] = np.nan
    latents[9, 0, 0, 0] = np.inf
    np.savez(tmp / "nan.npz", x=latents, y=np.zeros(12, np.int64))
    (tmp / "notes.txt").write_text("not data")
    os.makedirs(tmp / "no_y")
    np.save(tmp / "no_y" / "x.npy", np.zeros((12, 4, 4, 4), np.float16))
    np.savez(tmp / "flat.npz", x=np.zeros((12, 8, 8), np.float32), y=np.zeros(12, np.int64))
    np.savez(tmp / "rgba.npz", x=np.zeros((12, 8, 8, 4), np.uint8), y=np.zeros(12, np.int64))
    os.makedirs(tmp / "short_y")
    np.save(tmp / "short_y" / "x.npy", np.zeros((12, 4, 4, 4), np.float16))
    np.save(tmp / "short_y" / "y.npy", np.zeros(11, np.int64))
    (tmp / "cut.pt").write_bytes(ckpt.read_bytes()[:1000])
    cases = {
        "missing data": (
            ["--data", str(tmp / "missing")],
            r"--data .*missing: no such file or folder",
        ),
        "empty folder": (["--data", str(tmp / "empty")], r"--data .*empty: no images found"),
        "broken image": (["--data", str(broken)], r"--data: cannot decode .*broken\.png"),
        "npz without y": (
            ["--data", str(tmp / "no_y.npz")],
            r"--data .*no_y\.npz: needs arrays 'x' and 'y' \(found: x, labels\)",
        ),
        "latents with NaN": (
            ["--data", str(tmp / "nan.npz")],
            r"^--data .*nan\.npz: 2 of its 12 latents hold NaN or infinite values "
            r"\(the first: x\[7\]\); remove them$",
        ),
        "arrays without y.npy": (
            ["--data", str(tmp / "no_y")],
            r"^--data .*no_y: not a folder with a readable x\.npy and y\.npy \(.*No such file",
        ),
        "labels that do not fit": (
            ["--data", str(tmp / "short_y")],
            r"^--data .*short_y: x must hold N > 0 uint8 images \(N, H, W\[, 3\]\) or float latents "
            r"\(N, C, H, H\), y their N labels \(integers >= 0\); got x \(12, 4, 4, 4\) float16, "
            r"y \(11,\) int64$",
        ),
        "latents without channels": (
            ["--data", str(tmp / "flat.npz")],
            r"^--data .*flat\.npz: x must hold .*; got x \(12, 8, 8\) float32",
        ),
        "images with 4 channels": (
            ["--data", str(tmp / "rgba.npz")],
            r"^--data .*rgba\.npz: x must hold .*; got x \(12, 8, 8, 4\) uint8",
        ),
        "small image": (
            ["--data", str(small), "--no-upscale"],
            r"small.class0.\d\.png is 10x10, smaller than --image-size 16",
        ),
        "unrealisable drop": (["--drop", "0.3"], r"--drop 0\.3"),
        "drop without a sparse path": (
            ["--model", "dit", "--drop", "0.75"],
            r"--model dit has no sparse path",
        ),
        "no blocks": (
            ["--depths", "0", "0", "0"],
            r"^--depths 0 0 0: give three block counts "
            r">= 0 \(encoder, middle, decoder\), at least one block in all$",
        ),
        "sprint without a middle": (
            ["--depths", "1", "0", "1"],
            r"^--depths 1 0 1: SPRINT needs at least one encoder, one "
            r"middle and one decoder block$",
        ),
        "nothing to train": (["--steps", "0"], r"^--steps 0 --finetune-steps 0: nothing to train"),
        "results dir is a file": (
            ["--results-dir", str(tmp / "notes.txt")],
            r"^--results-dir .*notes\.txt: a file, not a folder",
        ),
        "resume another size": (
            ["--resume", str(ckpt), "--hidden-size", "64"],
            r"--resume .*0000001\.pt does not fit",
        ),
        "init another depth": (
            ["--init", str(ckpt), "--depths", "1", "2", "1"],
            r"^--init .*0000001\.pt does not fit this sprint-B model \(file vs "
            r"model: depths \(1, 1, 1\) vs \(1, 2, 1\)\)",
        ),
        "init another model": (
            ["--init", str(dit_ckpt)],
            r"^--init .*0000001\.pt holds a dit-B model, not a sprint one: use --model dit$",
        ),
        "resume nothing": (
            ["--resume", str(tmp / "nowhere.pt")],
            r"--resume .*nowhere\.pt: no such checkpoint",
        ),
        "text as data": (
            ["--data", str(tmp / "notes.txt")],
            r"--data .*notes\.txt: neither an image folder, a folder with x\.npy and y\.npy, nor "
            r"an \.npz file",
        ),
        "truncated init": (
            ["--init", str(tmp / "cut.pt")],
            r"--init .*cut\.pt: not a readable checkpoint \(truncated\?\)$",
        ),
        "truncated resume": (
            ["--resume", str(tmp / "cut.pt")],
            r"--resume .*cut\.pt: not a readable checkpoint \(truncated\?\)$",
        ),
        "resume another drop": (
            ["--resume", str(ckpt), "--drop", "0.5", "--seed", "1"],
            r"--resume .*0000001\.pt does not fit the flags given: --drop 0\.5 "
            r"differs from the run's 0\.75; --seed 1 differs from the run's 0; "
            r"leave them out",
        ),
        "resume shortens stage 1": (
            ["--resume", str(ckpt), "--steps", "0"],
            r"--steps 0: stage 1 \(1 steps\) can change",
        ),
        "batch 0": (["--global-batch-size", "0"], r"^--global-batch-size 0: must be at least 1$"),
        "batch -1": (
            ["--global-batch-size", "-1"],
            r"^--global-batch-size -1: must be at least 1$",
        ),
        "log every 0": (["--log-every", "0"], r"^--log-every 0: must be at least 1$"),
        "checkpoint every -1": (["--ckpt-every", "-1"], r"^--ckpt-every -1: must be at least 0$"),
        "path drop 1.5": (["--path-drop", "1.5"], r"^--path-drop 1\.5: must lie in \[0, 1\]"),
        "path drop -1": (["--path-drop", "-1"], r"^--path-drop -1\.0: must lie in \[0, 1\]"),
        "drop 1": (["--drop", "1"], r"^--drop 1\.0: must lie in \[0, 1\)$"),
    }
    return cases[case]


CASES = ["missing data", "empty folder", "broken image", "npz without y", "latents with NaN",
         "arrays without y.npy", "labels that do not fit", "latents without channels",
         "images with 4 channels",
         "small image", "unrealisable drop", "drop without a sparse path", "no blocks",
         "sprint without a middle", "nothing to train", "results dir is a file",
         "resume another size", "init another depth", "init another model", "resume nothing",
         "text as data", "truncated init", "truncated resume", "resume another drop",
         "resume shortens stage 1", "batch 0", "batch -1", "log every 0", "checkpoint every -1",
         "path drop 1.5", "path drop -1", "drop 1"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_early_with_a_message_naming_its_flag(tmp_path, stage1_ckpts, case):
    ckpt, dit_ckpt = stage1_ckpts
    flags, message = bad_input(case, tmp_path, ckpt, dit_ckpt)
    before = sorted(os.listdir(ckpt.parent))
    with pytest.raises(ValueError, match=message):
        run(tmp_path, "--steps", "1", *flags)
    assert not (tmp_path / "results").exists()                        # nothing written
    assert sorted(os.listdir(ckpt.parent)) == before


def test_the_cli_prints_the_error_without_a_traceback(tmp_path):
    assert cli_error(tmp_path, "--data", str(tmp_path / "missing")) == (
        f"train.py: error: --data {tmp_path / 'missing'}: no such file or folder")


def test_a_broken_image_fails_before_training_in_one_line_with_the_default_workers(tmp_path):
    broken = image_folder(tmp_path / "broken", classes=1, per_class=7)
    whole = (broken / "class0" / "3.png").read_bytes()
    (broken / "class0" / "3b.png").write_bytes(whole[:60])           # cut short
    message = cli_error(tmp_path, "--data", str(broken), "--num-workers", "8")
    assert message.startswith(f"train.py: error: --data: cannot decode "
                              f"{broken / 'class0' / '3b.png'} (")
    # no empty run folder left behind
    assert not (tmp_path / "results").exists()


def test_an_image_that_breaks_only_when_a_worker_decodes_it_is_one_line(tmp_path):
    folder = image_folder(tmp_path / "images", classes=1, per_class=7)
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "class0" / "cut.jpg", quality=90)
    jpeg = (folder / "class0" / "cut.jpg").read_bytes()
    # a valid header: only decoding fails, in the DataLoader worker
    (folder / "class0" / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    message = cli_error(tmp_path, "--data", str(folder), "--num-workers", "1", "--image-size",
                        "16", "--steps", "3")
    cut = folder / "class0" / "cut.jpg"
    assert message.startswith(f"train.py: error: --data: cannot decode {cut} (image file is")


def test_a_global_batch_must_split_evenly_across_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "setup_distributed", lambda: (0, 3, torch.device("cpu")))
    with pytest.raises(
        ValueError, match="--global-batch-size 8 is not divisible by the 3 processes"
    ):
        run(tmp_path, "--steps", "1")


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = run(tmp_path, "--steps", "2")
    ckpt = run_dir / "checkpoints" / "0000002.pt"
    before = ckpt.read_bytes()
    message = r"step 4: non-finite loss .* the last checkpoint is .*0000002\.pt"
    with pytest.raises(FloatingPointError, match=message):
        # step 3's update overflows, so step 4's loss is not finite
        run(tmp_path, "--resume", str(ckpt), "--steps", "6", "--lr", "1e30")
    assert os.listdir(run_dir / "checkpoints") == ["0000002.pt"] and ckpt.read_bytes() == before


#################################################################################
#              Model flags: refused where the model is built                    #
#################################################################################

@pytest.mark.parametrize("drop, mask_type, message", [
    (0.3, "structured", "--drop 0.3: no n x n group"),
    (0.333, "random", "--drop 0.333: .* whole number"),
    (1.0, "structured", r"--drop 1.0: a token drop must lie in \(0, 1\)"),
    (0.0, "random", r"--drop 0.0: a token drop must lie in \(0, 1\)"),
    (0.75, "blocks", "--mask-type 'blocks'"),
])
def test_unrealisable_drop_is_a_clear_error(drop, mask_type, message):
    with pytest.raises(ValueError, match=message):
        sample_ids_keep(2, 10, drop, mask_type)                     # a 10x10 grid: 100 tokens


def test_size_and_patch_flags():
    with pytest.raises(ValueError, match="--size 'XXL'"):
        ModelConfig(size="XXL")
    with pytest.raises(ValueError, match="--patch-size 3"):
        ModelConfig(patch_size=3, input_size=32)


def test_layout_and_density_flags_are_validated():
    def tiny(**extra):
        return ModelConfig(model="sparsedit", input_size=16, patch_size=2, hidden_size=64,
                           num_heads=4, depths=(2, 8, 2), extra=extra)
    with pytest.raises(ValueError, match="--layout 2,4,3,2 has depth 28 .* --size B has depth 12"):
        SparseDiT(tiny(layout=[2, 4, 3, 2]))
    with pytest.raises(ValueError, match="--density 3 9: .*<= 8"):
        SparseDiT(tiny(density=[3, 9]))
    with pytest.raises(ValueError, match="--density 5 3"):
        SparseDiT(tiny(density=[5, 3]))
    fixed = SparseDiT(tiny(layout=[2, 2, 1, 2], density=[4, 4]))   # a fixed 4 x 4 grid, 2 SDTMs
    assert fixed.grid_side(torch.tensor([0.0, 1.0])).tolist() == [4, 4] and len(fixed.sdtms) == 2
