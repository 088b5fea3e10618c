"""train.py's command line: a run end to end and its folders, and every bad input in one table:
refused in one line that names it, no traceback, nothing on disk lost. In this process, as
`python train.py` runs it (train.cli turns errors into that line; argparse has its own)."""

import os
import re
import shutil
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sprint
import train
from test_checkpoints import official_layout
from tiny import (ENV, TINY, TRAIN, damaged_files, image_folder, records, run, tiny_model,
                  write_safetensors)


def offline(url, dst, *args, **kwargs):
    """torch.hub.download_url_to_file on a machine without network: the error urllib raises."""
    raise urllib.error.URLError("no network")

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


def error_line(tmp_path, capsys, *flags):
    """The one line `python train.py TINY flags` ends with (with --resume: the flags alone)."""
    with pytest.raises(SystemExit) as e:
        train.cli(list(flags) if "--resume" in flags else
                  [*TINY, "--results-dir", str(tmp_path / "results"), *flags])
    if e.value.code == 2:                                           # argparse's own report
        return capsys.readouterr().err.strip().splitlines()[-1]
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


#################################################################################
#                       The loop, end to end, from the CLI                      #
#################################################################################

@pytest.mark.parametrize("model", ["dit", "sprint"])
def test_the_cli_trains_end_to_end_and_the_held_out_loss_falls(tmp_path, model, capsys):
    run_dir = run(tmp_path, "--model", model, "--steps", "40", "--eval-every", "20",
                  "--ckpt-every", "20")
    assert "img/s" in capsys.readouterr().err                         # the progress bar
    assert run_dir.name == f"000-{model}-toy-4"
    evals = [rec for rec in records(run_dir) if "eval_loss" in rec]
    assert [rec["step"] for rec in evals] == [0, 20, 40]
    # measured: 1.43 at step 0, 1.14 (dit) and 1.08 (sprint) at step 40; a loop that does not
    # learn stays near 1.4
    assert evals[-1]["eval_loss"] < 0.9 * evals[0]["eval_loss"]
    # the train-inference gap, SPRINT's
    assert ("eval_loss_drop" in evals[0]) == (model == "sprint")
    ckpt = torch.load(run_dir / "checkpoints" / "0000040.pt", weights_only=True)
    # a checkpoint is the weights, EMA, optimizer, step and config (and the flags, the seconds)
    assert set(ckpt) == {"model", "ema", "opt", "scaler", "config", "args", "step", "train_s"}
    net = sample.load_model(str(run_dir / "checkpoints" / "0000040.pt"))   # all sample.py needs
    cfg = net.cfg
    assert (cfg.model, cfg.hidden_size, cfg.num_classes, cfg.input_size) == (model, 32, 10, 16)


def test_the_dit_papers_own_model_trains_from_scratch_and_its_init_carries_it_to_sparsedit(
        tmp_path):
    """--diffusion ddpm: DiT's model (learned variance, the sin-cos table, no q/k norm), trained
    with its DDPM loss and its recipe (fp32, no clipping); --init hands all of it to SparseDiT."""
    dit_run = run(tmp_path, "--model", "dit", "--diffusion", "ddpm", "--depths", "1", "2", "1",
                  "--steps", "2")
    ckpt = dit_run / "checkpoints" / "0000002.pt"
    state = torch.load(ckpt, weights_only=True)
    assert {k: state["config"][k] for k in sprint.DIT_PAPER} == sprint.DIT_PAPER
    assert (state["args"]["precision"], state["args"]["grad_clip"]) == ("fp32", 0.0)
    model = sample.load_model(str(ckpt))
    assert model.final_layer.linear.out_features == 4 * 4 * 2 * 3      # p x p x (eps, variance)
    assert "pos_embed" in state["ema"] and not any("q_norm" in k for k in state["ema"])
    sparse_run = run(tmp_path, "--model", "sparsedit", "--init", str(ckpt), "--depths", "1", "2",
                     "1", "--steps", "1")
    cfg = torch.load(sparse_run / "checkpoints" / "0000001.pt", weights_only=True)["config"]
    assert (cfg["model"], cfg["diffusion"], cfg["positions"]) == ("sparsedit", "ddpm", "table")


def test_a_new_run_is_numbered_past_the_highest_and_never_reuses_a_folder(tmp_path, monkeypatch):
    first = run(tmp_path, "--steps", "1")
    second = run(tmp_path, "--steps", "1")
    assert (first.name, second.name) == ("000-sprint-toy-4", "001-sprint-toy-4")
    shutil.rmtree(first)                                 # a deleted run: its number stays taken
    assert run(tmp_path, "--steps", "1").name == "002-sprint-toy-4"
    # two runs started at the same moment: both found 002 the highest, one claimed 003 first
    mkdir = os.mkdir

    def raced(path, *args):
        if path.endswith("003-sprint-toy-4") and not os.path.exists(path):
            mkdir(path)                                  # the other run's claim
            os.mkdir(os.path.join(path, "checkpoints"))
        return mkdir(path, *args)
    monkeypatch.setattr(os, "mkdir", raced)
    assert run(tmp_path, "--steps", "1").name == "004-sprint-toy-4"
    assert os.listdir(tmp_path / "results" / "003-sprint-toy-4") == ["checkpoints"]   # untouched


def test_checkpoints_every_0_steps_means_only_at_the_end_of_each_stage(tmp_path):
    run_dir = run(tmp_path, "--steps", "3", "--finetune-steps", "2", "--ckpt-every", "0")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["0000003.pt", "0000005.pt"]


#################################################################################
#                 Bad input: one line naming it, nothing lost                   #
#################################################################################

@pytest.fixture(scope="module")
def stage1_ckpts(tmp_path_factory):
    """The checkpoints of a one-step SPRINT run and of a one-step DiT run."""
    tmp = tmp_path_factory.mktemp("stage1")
    sprint_run = run(tmp, "--steps", "1")
    dit_run = run(tmp, "--model", "dit", "--steps", "1")
    return sprint_run / "checkpoints" / "0000001.pt", dit_run / "checkpoints" / "0000001.pt"


def bad_inputs(tmp, ckpt, dit_ckpt):
    """{case: (flags, the line they must end in)}, with the files they need written to tmp."""
    os.makedirs(tmp / "empty" / "class0")
    np.savez(tmp / "no_y.npz", x=np.zeros((8, 8, 8, 3), np.uint8), labels=np.zeros(8))
    (tmp / "notes.txt").write_text("not data")
    os.makedirs(tmp / "no_y")
    np.save(tmp / "no_y" / "x.npy", np.zeros((12, 4, 4, 4), np.float16))
    np.savez(tmp / "flat.npz", x=np.zeros((12, 8, 8), np.float32), y=np.zeros(12, np.int64))
    np.savez(tmp / "rgba.npz", x=np.zeros((12, 8, 8, 4), np.uint8), y=np.zeros(12, np.int64))
    os.makedirs(tmp / "short_y")
    np.save(tmp / "short_y" / "x.npy", np.zeros((12, 4, 4, 4), np.float16))
    np.save(tmp / "short_y" / "y.npy", np.zeros(11, np.int64))
    np.savez(tmp / "lat.npz", x=np.zeros((12, 4, 4, 4), np.float16), y=np.zeros(12, np.int64))
    (tmp / "cut.pt").write_bytes(ckpt.read_bytes()[:1000])
    (tmp / "damaged").mkdir()
    damaged = damaged_files(tmp / "damaged", {"x_embedder.proj.weight": torch.zeros(4, 16)})
    torch.save(torch.load(ckpt, weights_only=True)["ema"], tmp / "released.pt")  # a state dict
    write_safetensors(tmp / "misshapen.safetensors", {**official_layout(tiny_model()),
                      "x_embedder.proj.weight": torch.zeros(32)}, "F32")   # a 1-D patch embedding
    not_arrays = r"not an image folder, a folder with x\.npy and y\.npy, nor an \.npz with arrays"
    shapes = (r"x must hold N uint8 images \(N, H, W, 3\) or float latents \(N, \[views, \[2 "
              r"\(mean, std\),\]\] C, H, H\)")
    return {
        "missing data": (["--data", tmp / "missing"], rf"--data .*missing: {not_arrays} x and y "
                                                      rf"\(FileNotFoundError: "),
        "empty folder": (["--data", tmp / "empty"], r"--data .*empty: no images \(\.png/"),
        "npz without y": (["--data", tmp / "no_y.npz"], rf"no_y\.npz: {not_arrays} .*KeyError"),
        "arrays without y.npy": (["--data", tmp / "no_y"], rf"no_y: {not_arrays} .*No such file"),
        "labels that do not fit": (["--data", tmp / "short_y"], rf"short_y: {shapes}, y their N "
                                   r"labels >= 0; got x \(12, 4, 4, 4\) float16, y \(11,\) int64$"),
        "latents without channels": (["--data", tmp / "flat.npz"], r"got x \(12, 8, 8\) float32"),
        "images with 4 channels": (["--data", tmp / "rgba.npz"], r"got x \(12, 8, 8, 4\) uint8"),
        "text as data": (["--data", tmp / "notes.txt"], rf"notes\.txt: {not_arrays} x and y"),
        "latents resized": (["--data", tmp / "lat.npz", "--image-size", "8"],
                            r"--image-size 8: .*lat\.npz holds 4x4 latents, which are not resized"),
        "unrealisable drop": (["--drop", "0.3"], r"--drop 0\.3: .* keep a whole number of the 16 "
                                                 r"tokens"),
        "drop 1": (["--drop", "1"], r"--drop 1\.0: a token drop must lie in \(0, 1\)"),
        "path drop 1.5": (["--path-drop", "1.5"], r"argument --path-drop: 1\.5: must lie in "
                                                  r"\[0, 1\]$"),
        "no blocks": (["--depths", "0", "0", "0"], r"^train\.py: error: --depths 0 0 0: give three "
                                                   r"block counts >= 0 .* at least one block"),
        "sprint without a middle": (["--depths", "1", "0", "1"], r"--depths 1 0 1: SPRINT needs at "
                                                                 r"least one encoder, one middle"),
        "nothing to train": (["--steps", "0"], r"--steps 0 --finetune-steps 0: nothing to train$"),
        "batch 0": (["--global-batch-size", "0"], r"argument --global-batch-size: 0: must be at "
                                                  r"least 1$"),
        "log every 0": (["--log-every", "0"], r"argument --log-every: 0: must be at least 1$"),
        "checkpoint every -1": (["--ckpt-every", "-1"], r"--ckpt-every: -1: must be at least 0$"),
        "unknown model": (["--model", "unet"], r"argument --model: invalid choice: 'unet'"),
        "sprint with ddpm": (["--diffusion", "ddpm"],
                             r"--diffusion ddpm: SPRINT trains with flow matching; .* is --model "
                             r"dit \(or sparsedit\)"),
        "init with a diffusion": (["--init", dit_ckpt, "--diffusion", "ddpm"],
                                  r"argument --diffusion: not allowed with argument --init$"),
        "results dir is a file": (["--results-dir", tmp / "notes.txt"], r"notes\.txt"),
        "init another model": (["--init", dit_ckpt], r"^train\.py: error: --init .*0000001\.pt holds "
                                                     r"a dit model: train it as --model dit"),
        "init another depth": (["--init", ckpt, "--depths", "1", "2", "1"],
                               r"--init .*0000001\.pt does not fit this sprint model: Error\(s\) in "
                               r"loading state_dict for SPRINT: Missing key\(s\) .*middle\.1\."),
        "init from tensors that do not fit their names": (["--init", tmp / "misshapen.safetensors"],
                                                          r"--init .*misshapen\.safetensors: cannot "
                                                          r"read a released SPRINT or DiT model off "
                                                          r"its tensors \(IndexError"),
        "truncated init": (["--init", tmp / "cut.pt"], r"--init .*cut\.pt: not a readable "
                                                       r"checkpoint \(cut short, damaged, or not "
                                                       r"one: RuntimeError\)$"),
        **{f"init {name}": (["--init", tmp / "damaged" / name], rf"--init .*{re.escape(name)}: n")
           for name in damaged},
        **{f"resume {name}": (["--resume", tmp / "damaged" / name], rf"--resume .*{re.escape(name)}: "
                              r"n") for name in damaged},
        "resume a released file": (["--resume", tmp / "released.pt"], r"--resume .*released\.pt: "
                                   r"not a checkpoint of train\.py \(give it as --init\)$"),
        "a released file offline": (["--init", "DiT-XL-2-512x512.pt"], r"^train\.py: error: --init "
                                    r"DiT-XL-2-512x512\.pt: cannot download https://dl\.fbaipublic"
                                    r"files\.com/DiT/models/DiT-XL-2-512x512\.pt to .*/hub/"
                                    r"checkpoints/DiT-XL-2-512x512\.pt \(<urlopen error no network>"),
        "precision fp8": (["--precision", "fp8"], r"argument --precision: invalid choice: 'fp8'"),
        "clip below 0": (["--grad-clip", "-1"], r"argument --grad-clip: -1: must be at least 0"),
        "resume nothing": (["--resume", tmp / "nowhere.pt"], r"--resume .*nowhere\.pt: no such "
                                                             r"checkpoint, nor a run folder"),
        "truncated resume": (["--resume", tmp / "cut.pt"], r"--resume .*cut\.pt: not a readable "
                                                           r"checkpoint"),
        "resume another drop": (["--resume", ckpt, "--drop", "0.5"], r"--resume .*0000001\.pt takes "
                                r"the run's flags: leave out --drop \(it may change only "
                                r"--activation-checkpointing --ckpt-every --compile"),
        "resume shortens stage 1": (["--resume", ckpt, "--steps", "0"], r"--steps 0 --finetune-steps "
                                    r"0: a resumed run may only grow"),
    }


def test_every_bad_input_is_one_line_naming_it_and_nothing_is_lost(tmp_path, stage1_ckpts, capsys,
                                                                  monkeypatch):
    ckpt, dit_ckpt = stage1_ckpts
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cases = bad_inputs(tmp_path, ckpt, dit_ckpt)
    before = {path: path.read_bytes() for path in ckpt.parent.parent.glob("*/*")}
    for case, (flags, message) in cases.items():
        steps = [] if "--resume" in flags else ["--steps", "1"]
        line = error_line(tmp_path, capsys, *steps, *map(str, flags))
        assert line.startswith("train.py: error: ") and re.search(message, line), (case, line)
        assert not (tmp_path / "results").exists(), case            # nothing written
    # the runs the resumes pointed at are as they were
    assert {path: path.read_bytes() for path in ckpt.parent.parent.glob("*/*")} == before


def test_a_broken_image_stops_the_run_in_one_line_naming_it(tmp_path):
    folder = image_folder(tmp_path / "images", classes=1, per_class=7)
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "class0" / "cut.jpg", quality=90)
    jpeg = (folder / "class0" / "cut.jpg").read_bytes()
    # a valid header: only decoding fails, in the DataLoader worker
    (folder / "class0" / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    # as a user runs it, in a process of its own, which ends with its worker (in this one the
    # error's traceback would keep the DataLoader, and its worker, until pytest exits)
    proc = subprocess.run([sys.executable, TRAIN, *TINY, "--data", str(folder), "--num-workers",
                           "1", "--image-size", "16", "--steps", "3", "--results-dir",
                           str(tmp_path / "results")], env=ENV, capture_output=True, text=True)
    cut = folder / "class0" / "cut.jpg"
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        f"train.py: error: --data: cannot decode {cut} (image file is")


def test_a_global_batch_must_split_evenly_across_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "setup_distributed", lambda: (0, 3, torch.device("cpu")))
    with pytest.raises(ValueError, match="--global-batch-size 8 does not split over 3 processes"):
        run(tmp_path, "--steps", "1")


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    message = r"a non-finite loss by step 2: stopped, the last checkpoint is .*0000001\.pt"
    with pytest.raises(FloatingPointError, match=message):
        # step 1's update overflows, so step 2's loss is not finite
        run(tmp_path, "--steps", "6", "--lr", "1e30", "--ckpt-every", "1")
    ckpts = tmp_path / "results" / "000-sprint-toy-4" / "checkpoints"
    assert os.listdir(ckpts) == ["0000001.pt"]
    torch.load(ckpts / "0000001.pt", weights_only=True)                 # whole


#################################################################################
#              Model flags: refused where the model is built                    #
#################################################################################

def test_layout_and_density_flags_are_validated():
    from sparsedit import SparseDiT
    from sprint import ModelConfig

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
