"""train.py as a specification: both SPRINT stages in one loop, fine-tuning sees every token, a killed run resumes
exactly, DDP ranks stay equal with one writer, every data source works, and bad input fails early by its flag."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
import data
import models
import sprint
import train

TRAIN = str(ROOT / "train.py")
# a 16-token model: tiny enough for a CPU test, with a 2x2 structured drop and a sparse path to skip
TINY = ("--hidden-size 32 --num-heads 2 --depths 1 1 1 --patch-size 4 --global-batch-size 8 --num-workers 0 "
        "--log-every 1 --lr 2e-3").split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}        # subprocesses too: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, *flags):
    """train.main in this process on the tiny model and the embedded data at 16 px -> the run folder."""
    args = ["--image-size", "16", "--eval-every", "0", "--sample-every", "0", *flags]
    return Path(train.main(train.parse_args([*TINY, "--results-dir", str(tmp_path / "results"), *args])))


def cli(cwd, *flags, launcher=(sys.executable,)):
    return subprocess.run([*launcher, TRAIN, *TINY, *flags], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def records(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def assert_same_training_state(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["step"] == b["step"] and a["data"] == b["data"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for i, state in a["opt"]["state"].items():
        assert all(torch.equal(state[k], b["opt"]["state"][i][k]) for k in state)


def image_folder(root, classes=2, per_class=10, size=(24, 20)):
    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(root / f"class{c}")
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


#################################################################################
#                       The loop, end to end, from the CLI                      #
#################################################################################

@pytest.mark.parametrize("model", ["dit", "sprint"])
def test_the_cli_trains_end_to_end_and_the_held_out_loss_falls(tmp_path, model, capsys):
    run_dir = run(tmp_path, "--model", model, "--steps", "40", "--eval-every", "20", "--sample-every", "40",
                  "--ckpt-every", "20")                                 # train.py's main, in this process
    assert "img/s" in capsys.readouterr().err and run_dir.name == f"000-{model}-S-4"   # the progress bar
    evals = [rec for rec in records(run_dir) if "eval_loss" in rec]
    assert [rec["step"] for rec in evals] == [0, 20, 40]
    assert evals[-1]["eval_loss"] < 0.9 * evals[0]["eval_loss"]
    assert ("eval_loss_drop" in evals[0]) == (model == "sprint")        # the train-inference gap, SPRINT only
    assert (run_dir / "samples" / "0000040.png").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "0000040.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "opt", "config", "args", "step", "rng", "data", "train_s"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    net = models.load_model(str(run_dir / "checkpoints" / "0000040.pt"))    # all that sample.py --ckpt needs
    assert (net.cfg.model, net.cfg.hidden_size, net.cfg.num_classes, net.cfg.input_size) == (model, 32, 10, 16)


def test_a_new_run_never_reuses_a_run_folder(tmp_path):
    first, second = run(tmp_path, "--steps", "1"), run(tmp_path, "--steps", "1")
    assert (first.name, second.name) == ("000-sprint-S-4", "001-sprint-S-4")


#################################################################################
#                         Two stages: drop, then all tokens                     #
#################################################################################

def test_fine_tuning_sees_every_token_and_path_drop_stays_on(tmp_path, monkeypatch):
    seen, forward = [], sprint.SPRINT.forward

    def spy(self, x, t, y, ids_keep=None, path_drop=None):
        seen.append((ids_keep is not None, path_drop is not None))
        return forward(self, x, t, y, ids_keep=ids_keep, path_drop=path_drop)
    monkeypatch.setattr(sprint.SPRINT, "forward", spy)

    run_dir = run(tmp_path, "--drop", "0.75", "--steps", "3", "--finetune-steps", "2")    # one invocation
    assert seen == [(True, True)] * 3 + [(False, True)] * 2
    assert [rec["stage"] for rec in records(run_dir) if "loss" in rec] == [1, 1, 1, 2, 2]
    seen.clear()                                                         # stage 2 on its own, from stage 1's end
    run(tmp_path, "--init", str(run_dir / "checkpoints" / "0000003.pt"), "--drop", "0", "--steps", "2")
    assert seen == [(False, True)] * 2


def test_the_warm_up_is_the_official_linear_lr_from_one_percent_with_ema_0999():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-4)
    official = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5)
    stage = train.Stage(begin=100, token_drop=None, lr=2e-4, warmup=5, ema_decay=0.9999)     # starting at step 100
    for s in range(8):                                                   # the lr of the s-th optimizer step
        assert stage.lr_at(100 + s) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        official.step()
    assert [stage.ema_decay_at(100 + s) for s in (0, 4, 5)] == [0.999, 0.999, 0.9999]
    no_warmup = train.Stage(begin=0, token_drop=None, lr=2e-4, warmup=0, ema_decay=0.9999)
    assert no_warmup.lr_at(0) == 2e-4                                      # no warm-up: the lr from the start


def test_the_held_out_loss_is_measured_at_the_end_of_each_stage(tmp_path):
    run_dir = run(tmp_path, "--drop", "0.75", "--steps", "2", "--finetune-steps", "1", "--eval-every", "100")
    evals = [rec for rec in records(run_dir) if "eval_loss" in rec]
    assert [rec["step"] for rec in evals] == [0, 2, 3]                  # the gap before and after fine-tuning
    assert all("eval_loss_drop" in rec for rec in evals)


#################################################################################
#                             Resume: exactly, after kill -9                    #
#################################################################################

def test_resume_alone_continues_the_run_with_its_own_flags(tmp_path):
    run_dir = run(tmp_path, "--drop", "0.5", "--steps", "2", "--finetune-steps", "2")
    whole = (run_dir / "checkpoints" / "0000004.pt").rename(tmp_path / "whole.pt")
    train.main(train.parse_args(["--resume", str(run_dir / "checkpoints" / "0000002.pt")]))   # no other flag
    assert_same_training_state(whole, run_dir / "checkpoints" / "0000004.pt")


def test_n_steps_then_resume_then_n_steps_equals_2n_steps(tmp_path):
    flags = ("--eval-every", "3", "--sample-every", "3")                # evaluation must not disturb the RNG
    whole = run(tmp_path / "a", "--steps", "6", *flags)
    half = run(tmp_path / "b", "--steps", "3", *flags)
    assert run(tmp_path / "b", "--resume", str(half / "checkpoints" / "0000003.pt"), "--steps", "6", *flags) == half
    assert_same_training_state(whole / "checkpoints" / "0000006.pt", half / "checkpoints" / "0000006.pt")


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint_exactly(tmp_path):
    flags = ("--image-size", "16", "--steps", "3", "--finetune-steps", "17", "--ckpt-every", "1", "--eval-every", "5",
             "--sample-every", "0")                                      # the resume crosses into stage 2
    proc = subprocess.Popen([sys.executable, TRAIN, *TINY, *flags, "--results-dir", "killed"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "000-sprint-S-4" / "checkpoints"
    deadline = time.time() + 120
    while not list(ckpts.glob("*.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert len(list(ckpts.glob("*.pt"))) < 20                           # killed mid-run
    assert run(tmp_path, *flags, "--resume", str(ckpts.parent)) == ckpts.parent.resolve()   # the rest in process
    whole = run(tmp_path / "whole", *flags) / "checkpoints"
    assert_same_training_state(ckpts / "0000020.pt", whole / "0000020.pt")


#################################################################################
#                         DDP: equal ranks, one writer                          #
#################################################################################

def test_ddp_on_two_processes_keeps_the_ranks_equal_and_only_rank_0_writes(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    r = cli(tmp_path, "--image-size", "16", "--steps", "2", "--ckpt-every", "1", "--eval-every", "1",
            "--sample-every", "2", launcher=(torchrun, "--standalone", "--nproc_per_node=2"))
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == ["results"] and os.listdir(tmp_path / "results") == ["000-sprint-S-4"]
    recs = records(tmp_path / "results" / "000-sprint-S-4")
    assert [rec["step"] for rec in recs if "loss" in rec] == [1, 2]              # one writer: no repeated lines
    digests = [rec["rank_weights"] for rec in recs if "checkpoint" in rec]
    assert len(digests) == 2 and all(len(d) == 2 and d[0] == d[1] for d in digests)
    ckpt = torch.load(tmp_path / "results" / "000-sprint-S-4" / "checkpoints" / "0000002.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2                                          # every rank's RNG state, for resume


#################################################################################
#                                 Data sources                                  #
#################################################################################

def test_the_embedded_data_is_fixed_and_its_classes_differ():
    (x, y), (x2, y2) = data.embedded_dataset(16, 500), data.embedded_dataset(16, 500)
    assert x.shape == (500, 16, 16, 3) and x.dtype == np.uint8 and set(y) == set(range(10))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    colours = np.stack([x[y == k].reshape(-1, 3).max(0) for k in range(10)])   # each class its own hue
    assert len({tuple(c // 32) for c in colours}) == 10
    train_idx, held_out = data.split(500)
    assert len(held_out) == 50 and not set(train_idx) & set(held_out) and np.array_equal(held_out, data.split(500)[1])


def test_an_image_folder_is_decoded_in_workers_and_sets_the_classes(tmp_path):
    folder = image_folder(tmp_path / "images", classes=3)
    run_dir = run(tmp_path, "--data", str(folder), "--num-workers", "1", "--steps", "2", "--eval-every", "2")
    cfg = torch.load(run_dir / "checkpoints" / "0000002.pt", weights_only=True)["config"]
    assert (cfg["in_channels"], cfg["input_size"], cfg["num_classes"]) == (3, 16, 3)
    assert any("eval_loss" in rec for rec in records(run_dir))


@pytest.mark.parametrize("kind", ["pixels", "latents"])
def test_an_npz_of_pixels_or_latents_sets_channels_size_and_classes(tmp_path, kind):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8) if kind == "pixels" else \
        rng.standard_normal((40, 4, 8, 8)).astype(np.float16)           # grey images N x H x W; latents N x C x H x W
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(40) % 5)
    run_dir = run(tmp_path, "--data", str(tmp_path / "data.npz"), "--image-size", "8", "--patch-size", "2",
                  "--latent-scale", "0.5", "--steps", "2", "--sample-every", "2")
    cfg = torch.load(run_dir / "checkpoints" / "0000002.pt", weights_only=True)["config"]
    assert (cfg["in_channels"], cfg["input_size"], cfg["num_classes"]) == ((1, 8, 5) if kind == "pixels" else (4, 8, 5))
    assert (run_dir / "samples" / "0000002.png").is_file()              # latents: channels 0-2, normalised


#################################################################################
#                        Bad input: early, by its flag                          #
#################################################################################

@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory):
    return run(tmp_path_factory.mktemp("stage1"), "--steps", "1") / "checkpoints" / "0000001.pt"


def bad_input(case, tmp, ckpt):
    """The flags of one bad input, and the message they must raise."""
    os.makedirs(tmp / "empty" / "class0")
    broken = image_folder(tmp / "broken", classes=1, per_class=7)
    (broken / "class0" / "broken.png").write_bytes(b"not a png")
    small = image_folder(tmp / "small", classes=1, per_class=8, size=(10, 10))
    np.savez(tmp / "no_y.npz", x=np.zeros((8, 8, 8, 3), np.uint8), labels=np.zeros(8))
    (tmp / "notes.txt").write_text("not data")
    (tmp / "cut.pt").write_bytes(ckpt.read_bytes()[:1000])
    return {
        "missing data": (["--data", str(tmp / "missing")], r"--data .*missing: no such file or folder"),
        "empty folder": (["--data", str(tmp / "empty")], r"--data .*empty: no images found"),
        "broken image": (["--data", str(broken)], r"--data: cannot decode .*broken\.png"),
        "npz without y": (["--data", str(tmp / "no_y.npz")],
                          r"--data .*no_y\.npz: needs arrays 'x' and 'y' \(found: x, labels\)"),
        "small image": (["--data", str(small), "--no-upscale"],
                        r"small.class0.\d\.png is 10x10, smaller than --image-size 16"),
        "unrealisable drop": (["--drop", "0.3"], r"--drop 0\.3"),
        "drop without a sparse path": (["--model", "dit", "--drop", "0.75"], r"--model dit has no sparse path"),
        "resume another size": (["--resume", str(ckpt), "--hidden-size", "64"], r"--resume .*0000001\.pt does not fit"),
        "init another depth": (["--init", str(ckpt), "--depths", "1", "2", "1"], r"--init .*0000001\.pt does not fit"),
        "resume nothing": (["--resume", str(tmp / "nowhere.pt")], r"--resume .*nowhere\.pt: no such checkpoint"),
        "text as data": (["--data", str(tmp / "notes.txt")],
                         r"--data .*notes\.txt: neither an image folder nor an \.npz file"),
        "truncated init": (["--init", str(tmp / "cut.pt")],
                           r"--init .*cut\.pt: not a readable checkpoint \(truncated\?\)$"),
        "truncated resume": (["--resume", str(tmp / "cut.pt")],
                             r"--resume .*cut\.pt: not a readable checkpoint \(truncated\?\)$"),
        "resume another drop": (["--resume", str(ckpt), "--drop", "0.5", "--seed", "1"],
                                r"--resume .*0000001\.pt does not fit the flags given: --drop 0\.5 differs from the "
                                r"run's 0\.75; --seed 1 differs from the run's 0; leave them out"),
        "resume shortens stage 1": (["--resume", str(ckpt), "--steps", "0"],
                                    r"--steps 0: stage 1 \(1 steps\) can change"),
        "batch 0": (["--global-batch-size", "0"], r"^--global-batch-size 0: must be at least 1$"),
        "batch -1": (["--global-batch-size", "-1"], r"^--global-batch-size -1: must be at least 1$"),
        "log every 0": (["--log-every", "0"], r"^--log-every 0: must be at least 1$"),
        "checkpoint every -1": (["--ckpt-every", "-1"], r"^--ckpt-every -1: must be at least 0$"),
        "path drop 1.5": (["--path-drop", "1.5"], r"^--path-drop 1\.5: must lie in \[0, 1\]"),
        "path drop -1": (["--path-drop", "-1"], r"^--path-drop -1\.0: must lie in \[0, 1\]"),
        "drop 1": (["--drop", "1"], r"^--drop 1\.0: must lie in \[0, 1\)$"),
    }[case]


@pytest.mark.parametrize("case", ["missing data", "empty folder", "broken image", "npz without y", "small image",
                                  "unrealisable drop", "drop without a sparse path", "resume another size",
                                  "init another depth", "resume nothing", "text as data", "truncated init",
                                  "truncated resume", "resume another drop", "resume shortens stage 1", "batch 0",
                                  "batch -1", "log every 0", "checkpoint every -1", "path drop 1.5", "path drop -1",
                                  "drop 1"])
def test_bad_input_fails_early_with_a_message_naming_its_flag(tmp_path, stage1_ckpt, case):
    flags, message = bad_input(case, tmp_path, stage1_ckpt)
    before = sorted(os.listdir(stage1_ckpt.parent))
    with pytest.raises(ValueError, match=message):
        run(tmp_path, "--steps", "1", *flags)
    assert not (tmp_path / "results").exists() and sorted(os.listdir(stage1_ckpt.parent)) == before  # nothing written


def test_the_cli_prints_the_error_without_a_traceback(tmp_path):
    r = cli(tmp_path, "--data", str(tmp_path / "missing"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"train.py: error: --data {tmp_path / 'missing'}: no such file or folder"


def test_a_broken_image_fails_before_training_in_one_line_with_the_default_workers(tmp_path):
    broken = image_folder(tmp_path / "broken", classes=1, per_class=7)
    (broken / "class0" / "3b.png").write_bytes((broken / "class0" / "3.png").read_bytes()[:60])   # cut short
    r = cli(tmp_path, "--data", str(broken), "--num-workers", "8")
    assert r.returncode == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"train.py: error: --data: cannot decode {broken / 'class0' / '3b.png'} (")
    assert not (tmp_path / "results").exists()                         # no empty run folder left behind


def test_an_image_that_breaks_only_when_a_worker_decodes_it_is_one_line_without_a_traceback(tmp_path):
    folder = image_folder(tmp_path / "images", classes=1, per_class=7)
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "class0" / "cut.jpg", quality=90)
    jpeg = (folder / "class0" / "cut.jpg").read_bytes()
    (folder / "class0" / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])   # a valid header: only decoding fails
    r = cli(tmp_path, "--data", str(folder), "--num-workers", "1", "--image-size", "16", "--steps", "3")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (error,) = [line for line in r.stderr.splitlines() if "error" in line]   # the rest is the progress bar
    assert error.startswith(f"train.py: error: --data: cannot decode {folder / 'class0' / 'cut.jpg'} (image file is")


def test_checkpoints_every_0_steps_means_only_at_the_end_of_each_stage(tmp_path):
    run_dir = run(tmp_path, "--steps", "3", "--finetune-steps", "2", "--ckpt-every", "0")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["0000003.pt", "0000005.pt"]


def test_a_global_batch_must_split_evenly_across_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "setup_distributed", lambda: (0, 3, torch.device("cpu")))
    with pytest.raises(ValueError, match="--global-batch-size 8 is not divisible by the 3 processes"):
        run(tmp_path, "--steps", "1")


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = run(tmp_path, "--steps", "2")
    ckpt = run_dir / "checkpoints" / "0000002.pt"
    before = ckpt.read_bytes()
    with pytest.raises(FloatingPointError, match=r"step 4: non-finite loss .* the last checkpoint is .*0000002\.pt"):
        run(tmp_path, "--resume", str(ckpt), "--steps", "6", "--lr", "1e30")     # step 3's update overflows
    assert os.listdir(run_dir / "checkpoints") == ["0000002.pt"] and ckpt.read_bytes() == before


#################################################################################
#                                   Benchmark                                   #
#################################################################################

def test_benchmark_prints_one_table_row(capsys):
    train.main(train.parse_args(["--benchmark", "--model", "sprint", "--drop", "0.75", *TINY[:8], "--image-size", "64",
                                 "--global-batch-size", "4", "--benchmark-steps", "20"]))
    header, row = capsys.readouterr().out.strip().splitlines()
    cells = dict(zip(header.strip("|").split("|"), row.strip("|").split("|")))
    assert float(cells[" ms/step "]) > 0 and float(cells[" img/s "]) > 0 and float(cells[" TFLOP/s "]) > 0
    assert cells[" drop "].strip() == "0.75" and "TFLOP/s" in cells[" MFU (measured fp32 matmul peak) "]


#################################################################################
#              The CPU miniature: one size flag, timed training                 #
#################################################################################

@pytest.mark.parametrize("model", ["dit", "sprint", "sparsedit"])
def test_the_mini_size_is_one_flag_for_every_model(model):
    cfg = train.parse_args(["--model", model, "--size", "mini"])
    net = models.create_model(models.ModelConfig(cfg.model, cfg.size, 2, 16, 3, 9))
    assert (net.cfg.hidden_size, net.cfg.num_heads, net.cfg.depths) == (128, 4, (2, 8, 2))   # B's split, narrowed
    assert sum(isinstance(m, sprint.Block) for m in net.modules()) == 12      # SparseDiT: its 12 layers, 1,2,2,1
    v = net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 8]))
    assert v.shape == (2, 3, 16, 16)


def test_log_records_training_seconds_without_evaluation_and_resume_continues_them(tmp_path, monkeypatch):
    held_out = train.held_out_loss

    def slow(*args, **kwargs):                                          # an evaluation that takes 0.3 s
        time.sleep(0.3)
        return held_out(*args, **kwargs)
    monkeypatch.setattr(train, "held_out_loss", slow)
    begin = time.perf_counter()
    run_dir = run(tmp_path, "--steps", "4", "--eval-every", "1")       # 5 evaluations: >= 1.5 s of waiting
    wall = time.perf_counter() - begin
    recs = records(run_dir)
    seconds = [rec["train_s"] for rec in recs]                          # on every record, never decreasing
    assert seconds == sorted(seconds) and seconds[0] == 0 and 0 < seconds[-1] < wall - 1.5
    assert {rec["step"] for rec in recs if "eval_loss" in rec} == {0, 1, 2, 3, 4}
    ckpt = torch.load(run_dir / "checkpoints" / "0000004.pt", weights_only=True)
    assert ckpt["train_s"] == seconds[-1]
    run(tmp_path, "--resume", str(run_dir), "--steps", "6", "--eval-every", "0")
    resumed = [rec["train_s"] for rec in records(run_dir)][len(recs):]
    assert len(resumed) > 0 and all(s > ckpt["train_s"] for s in resumed)


def test_an_npz_of_pixels_is_resized_to_the_image_size_with_antialiasing(tmp_path):
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)            # 1-pixel checkerboard
    np.savez(tmp_path / "px.npz", x=np.repeat(checker[None, ..., None], 12, 0).repeat(3, -1), y=np.arange(12) % 3)
    args = train.parse_args(["--data", str(tmp_path / "px.npz"), "--image-size", "16"])
    dataset, num_classes = data.load_data(args)
    x = dataset[:][0]
    assert x.shape == (12, 3, 16, 16) and num_classes == 3
    assert (x.float() - 127.5).abs().max() <= 1                         # averaged to grey, not aliased to 0 or 255
    np.savez(tmp_path / "latents.npz", x=np.zeros((12, 4, 8, 8), np.float16), y=np.arange(12) % 3)
    with pytest.raises(ValueError, match=r"--image-size 16: .*latents\.npz holds 8x8 latents, which cannot be resized"):
        data.load_data(train.parse_args(["--data", str(tmp_path / "latents.npz"), "--image-size", "16"]))
