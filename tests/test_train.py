"""train.py as a specification: both SPRINT stages in one loop, fine-tuning sees every token, the
official warm-up, a run resumes exactly from its step alone (also after kill -9), two DDP processes
train as one does, with one writer, and the log measures training seconds. Data sources:
test_data.py; the command line and bad input: test_train_cli.py."""
import argparse
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import sprint
import train
import tiny
from tiny import ENV, TINY, TRAIN, assert_same_training_state, records, run, two_ranks

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


#################################################################################
#                         Two stages: drop, then all tokens                     #
#################################################################################

def test_fine_tuning_sees_every_token_and_path_drop_stays_on(tmp_path, monkeypatch):
    seen, forward = [], sprint.SPRINT.forward

    def spy(self, x, t, y, ids_keep=None, path_drop=None):
        seen.append((ids_keep is not None, path_drop is not None))
        return forward(self, x, t, y, ids_keep=ids_keep, path_drop=path_drop)
    monkeypatch.setattr(sprint.SPRINT, "forward", spy)

    # one invocation
    run_dir = run(tmp_path, "--drop", "0.75", "--steps", "3", "--finetune-steps", "2")
    assert seen == [(True, True)] * 3 + [(False, True)] * 2
    assert [rec["stage"] for rec in records(run_dir) if "loss" in rec] == [1, 1, 1, 2, 2]
    # stage 2 on its own, from stage 1's end
    seen.clear()
    run(
        tmp_path,
        "--init",
        str(run_dir / "checkpoints" / "0000003.pt"),
        "--drop",
        "0",
        "--steps",
        "2",
    )
    assert seen == [(False, True)] * 2


def test_the_warm_up_is_the_official_linear_lr_from_one_percent_with_ema_0999():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-4)
    official = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5)
    args = argparse.Namespace(steps=100, drop=0.75, mask_type="structured", path_drop=0.1, lr=1e-4,
                              ema_decay=0.9999, ft_lr=2e-4, ft_warmup=5, ft_ema_decay=0.9999)
    # stage 2 starts at step 100; the lr of its s-th optimizer step
    for s in range(8):
        stage = train.stage_at(args, 100 + s, sparse_path=True)
        assert stage.lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        assert (stage.drop, stage.path_drop) == (0.0, 0.1)
        opt.step()
        official.step()
    assert [train.stage_at(args, 100 + s, True).ema_decay for s in (0, 4, 5)] == [0.999, 0.999,
                                                                                  0.9999]
    # stage 1, no warm-up: the lr from the start; no sparse path: no drop at all
    assert train.stage_at(args, 0, True) == (0.75, "structured", 0.1, 1e-4, 0.9999)
    assert train.stage_at(args, 0, False)[::2] == (0.0, 0.0, 0.9999)


def test_the_held_out_loss_is_measured_at_the_end_of_each_stage(tmp_path):
    run_dir = run(
        tmp_path, "--drop", "0.75", "--steps", "2", "--finetune-steps", "1", "--eval-every", "100"
    )
    evals = [rec for rec in records(run_dir) if "eval_loss" in rec]
    # the gap before and after fine-tuning
    assert [rec["step"] for rec in evals] == [0, 2, 3]
    assert all("eval_loss_drop" in rec for rec in evals)


#################################################################################
#                             Resume: exactly, after kill -9                    #
#################################################################################

def test_resume_alone_continues_the_run_with_its_own_flags(tmp_path):
    run_dir = run(tmp_path, "--drop", "0.5", "--steps", "2", "--finetune-steps", "2")
    whole = (run_dir / "checkpoints" / "0000004.pt").rename(tmp_path / "whole.pt")
    # no other flag: the run's own (a tiny model, drop 0.5) and not the defaults (B, 0.75)
    train.main(["--resume", str(run_dir / "checkpoints" / "0000002.pt")])       # no --results-dir
    assert_same_training_state(whole, run_dir / "checkpoints" / "0000004.pt")


def test_n_steps_then_resume_then_n_steps_equals_2n_steps(tmp_path):
    # evaluation and grids must not disturb the RNG
    flags = ("--eval-every", "2", "--sample-every", "2")
    whole = run(tmp_path / "a", "--steps", "4", *flags)
    half = run(tmp_path / "b", "--steps", "2", *flags)
    resumed = run(tmp_path / "b", "--resume", str(half / "checkpoints" / "0000002.pt"),
                  "--steps", "4")
    assert resumed == half
    assert_same_training_state(whole / "checkpoints" / "0000004.pt",
                               half / "checkpoints" / "0000004.pt")


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint_exactly(tmp_path):
    # a checkpoint every step; the resume crosses into stage 2
    flags = ["--data", tiny.TOY_DATA, "--image-size", "16", "--steps", "2", "--finetune-steps", "6",
             "--ckpt-every", "1", "--eval-every", "0", "--sample-every", "0"]
    proc = subprocess.Popen([sys.executable, TRAIN, *TINY, *flags, "--results-dir", "killed"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "000-sprint-toy-4" / "checkpoints"
    deadline = time.time() + 120
    while not list(ckpts.glob("*.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert len(list(ckpts.glob("*.pt"))) < 8                            # killed mid-run
    # the rest in process
    # the rest, in this process: --resume, the run's own flags
    resumed = train.main(["--resume", str(ckpts.parent)])
    assert resumed == str(ckpts.parent)
    whole = run(tmp_path / "whole", *flags) / "checkpoints"
    assert_same_training_state(ckpts / "0000008.pt", whole / "0000008.pt")


#################################################################################
#          DDP: two processes train as one does, and only rank 0 writes         #
#################################################################################

def test_two_gloo_processes_train_as_one_process_does_and_only_rank_0_writes(tmp_path):
    """Every random draw covers the global batch and each rank takes its rows, the data order
    too: two processes of 4 see what one process of 8 sees, and DDP averages their gradients."""
    flags = [*TINY, "--data", tiny.TOY_DATA, "--steps", "2", "--ckpt-every", "1", "--eval-every",
             "1", "--sample-every", "2"]
    (tmp_path / "two").mkdir()
    for code, stderr in two_ranks("train.py", *flags, cwd=tmp_path / "two"):
        assert code == 0, stderr
    assert os.listdir(tmp_path / "two") == ["results"]
    two = tmp_path / "two" / "results" / "000-sprint-toy-4"
    assert os.listdir(tmp_path / "two" / "results") == [two.name]
    one = run(tmp_path / "one", *flags)
    steps = [[rec for rec in records(d) if "loss" in rec] for d in (one, two)]
    assert [rec["step"] for rec in steps[1]] == [1, 2]                 # one writer: no repeats
    # the first step's loss: the same inputs, summed in another order
    assert steps[1][0]["loss"] == pytest.approx(steps[0][0]["loss"], rel=1e-6)
    a, b = (torch.load(d / "checkpoints" / "0000002.pt", weights_only=True) for d in (one, two))
    for k in a["ema"]:
        torch.testing.assert_close(a["ema"][k], b["ema"][k], rtol=0, atol=1e-5)   # 7e-7 in 20 steps


#################################################################################
#             Flags: the toy run by default; what a size builds                 #
#################################################################################

def test_without_flags_train_py_is_the_toy_run():
    args, _ = train.parse_args([])
    assert (args.model, args.size, args.data, args.drop, args.path_drop) == ("sprint", "toy", None,
                                                                            0.75, 0.1)
    assert (args.global_batch_size, args.lr, args.steps, args.ema_decay) == (32, 1e-3, 2000, 0.995)


def test_size_xl_on_the_embedded_data_builds_an_xl_model(tmp_path, monkeypatch):
    built = []

    class Built(Exception):
        """Raised once the config is known: an XL model is not allocated here."""

    def create(cfg):
        built.append(cfg)
        raise Built
    monkeypatch.setitem(train.MODELS, "sprint", create)
    with pytest.raises(Built):
        train.main(["--size", "XL", "--results-dir", str(tmp_path)])
    cfg = built[0]
    # XL's width, heads and 2/24/2 blocks, on the embedded data's 16 px images
    assert (cfg.size, cfg.hidden_size, cfg.num_heads, cfg.depths) == ("XL", 1152, 16, (2, 24, 2))
    assert (cfg.input_size, cfg.in_channels) == (16, 3)


def test_log_records_training_seconds_without_evaluation_and_resume_continues_them(
        tmp_path, monkeypatch):
    held_out = train.held_out_loss

    def slow(*args, **kwargs):                                      # an evaluation of 0.1 s
        time.sleep(0.1)
        return held_out(*args, **kwargs)
    monkeypatch.setattr(train, "held_out_loss", slow)
    begin = time.perf_counter()
    # 4 evaluations (steps 0 to 3) with the drop and without: >= 0.7 s of waiting
    run_dir = run(tmp_path, "--steps", "3", "--eval-every", "1")
    wall = time.perf_counter() - begin
    recs = records(run_dir)
    # on every record, never decreasing
    seconds = [rec["train_s"] for rec in recs]
    assert seconds == sorted(seconds) and seconds[0] == 0 and 0 < seconds[-1] < wall - 0.7
    assert {rec["step"] for rec in recs if "eval_loss" in rec} == {0, 1, 2, 3}
    ckpt = torch.load(run_dir / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["train_s"] == seconds[-1]
    run(tmp_path, "--resume", str(run_dir), "--steps", "4")
    resumed = [rec["train_s"] for rec in records(run_dir)][len(recs):]
    assert len(resumed) > 0 and all(s > ckpt["train_s"] for s in resumed)
