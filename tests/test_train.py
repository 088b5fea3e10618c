"""train.py as a specification: both SPRINT stages in one loop, fine-tuning sees every token, the
official warm-up, a killed run resumes exactly, DDP ranks stay equal with one writer, every data
source works, and the log measures training seconds."""
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import models
import sprint
import train
from tiny import ENV, TINY, TRAIN, assert_same_training_state, cli, image_folder, records, run

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
    # starting at step 100
    stage = train.Stage(begin=100, token_drop=None, lr=2e-4, warmup=5, ema_decay=0.9999)
    # the lr of the s-th optimizer step
    for s in range(8):
        assert stage.lr_at(100 + s) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        official.step()
    assert [stage.ema_decay_at(100 + s) for s in (0, 4, 5)] == [0.999, 0.999, 0.9999]
    no_warmup = train.Stage(begin=0, token_drop=None, lr=2e-4, warmup=0, ema_decay=0.9999)
    # no warm-up: the lr from the start
    assert no_warmup.lr_at(0) == 2e-4


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
    # no other flag
    train.main(train.parse_args(["--resume", str(run_dir / "checkpoints" / "0000002.pt")]))
    assert_same_training_state(whole, run_dir / "checkpoints" / "0000004.pt")


def test_n_steps_then_resume_then_n_steps_equals_2n_steps(tmp_path):
    # evaluation must not disturb the RNG
    flags = ("--eval-every", "3", "--sample-every", "3")
    whole = run(tmp_path / "a", "--steps", "6", *flags)
    half = run(tmp_path / "b", "--steps", "3", *flags)
    assert (
        run(
            tmp_path / "b",
            "--resume",
            str(half / "checkpoints" / "0000003.pt"),
            "--steps",
            "6",
            *flags
        )
        == half
    )
    assert_same_training_state(
        whole / "checkpoints" / "0000006.pt", half / "checkpoints" / "0000006.pt"
    )


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint_exactly(tmp_path):
    flags = (
        "--image-size",
        "16",
        "--steps",
        "3",
        "--finetune-steps",
        "17",
        "--ckpt-every",
        "1",
        "--eval-every",
        "5",
        # the resume crosses into stage 2
        "--sample-every",
        "0",
    )
    proc = subprocess.Popen(
        [sys.executable, TRAIN, *TINY, *flags, "--results-dir", "killed"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "killed" / "000-sprint-S-4" / "checkpoints"
    deadline = time.time() + 120
    while not list(ckpts.glob("*.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert len(list(ckpts.glob("*.pt"))) < 20                           # killed mid-run
    # the rest in process
    assert run(tmp_path, *flags, "--resume", str(ckpts.parent)) == ckpts.parent.resolve()
    whole = run(tmp_path / "whole", *flags) / "checkpoints"
    assert_same_training_state(ckpts / "0000020.pt", whole / "0000020.pt")


#################################################################################
#                         DDP: equal ranks, one writer                          #
#################################################################################

def test_ddp_on_two_processes_keeps_the_ranks_equal_and_only_rank_0_writes(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    r = cli(
        tmp_path,
        "--image-size",
        "16",
        "--steps",
        "2",
        "--ckpt-every",
        "1",
        "--eval-every",
        "1",
        "--sample-every",
        "2",
        launcher=(torchrun, "--standalone", "--nproc_per_node=2"),
    )
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == ["results"] and os.listdir(tmp_path / "results") == [
        "000-sprint-S-4"
    ]
    recs = records(tmp_path / "results" / "000-sprint-S-4")
    # one writer: no repeated lines
    assert [rec["step"] for rec in recs if "loss" in rec] == [1, 2]
    digests = [rec["rank_weights"] for rec in recs if "checkpoint" in rec]
    assert len(digests) == 2 and all(len(d) == 2 and d[0] == d[1] for d in digests)
    ckpt = torch.load(
        tmp_path / "results" / "000-sprint-S-4" / "checkpoints" / "0000002.pt", weights_only=True
    )
    # every rank's RNG state, for resume
    assert len(ckpt["rng"]) == 2


#################################################################################
#                                 Data sources                                  #
#################################################################################

def test_the_embedded_data_is_fixed_and_its_classes_differ():
    (x, y), (x2, y2) = data.embedded_dataset(16, 500), data.embedded_dataset(16, 500)
    assert x.shape == (500, 16, 16, 3) and x.dtype == np.uint8 and set(y) == set(range(10))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    # each class its own hue
    colours = np.stack([x[y == k].reshape(-1, 3).max(0) for k in range(10)])
    assert len({tuple(c // 32) for c in colours}) == 10
    train_idx, held_out = data.split(500)
    assert (
        len(held_out) == 50
        and not set(train_idx) & set(held_out)
        and np.array_equal(held_out, data.split(500)[1])
    )


def test_an_image_folder_is_decoded_in_workers_and_sets_the_classes(tmp_path):
    folder = image_folder(tmp_path / "images", classes=3)
    run_dir = run(
        tmp_path, "--data", str(folder), "--num-workers", "1", "--steps", "2", "--eval-every", "2"
    )
    cfg = torch.load(run_dir / "checkpoints" / "0000002.pt", weights_only=True)["config"]
    assert (cfg["in_channels"], cfg["input_size"], cfg["num_classes"]) == (3, 16, 3)
    assert any("eval_loss" in rec for rec in records(run_dir))


@pytest.mark.parametrize("kind", ["pixels", "latents"])
def test_an_npz_of_pixels_or_latents_sets_channels_size_and_classes(tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "pixels":
        x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)          # grey images N x H x W
    else:
        x = rng.standard_normal((40, 4, 8, 8)).astype(np.float16)     # latents N x C x H x W
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(40) % 5)
    run_dir = run(
        tmp_path,
        "--data",
        str(tmp_path / "data.npz"),
        "--image-size",
        "8",
        "--patch-size",
        "2",
        "--latent-scale",
        "0.5",
        "--steps",
        "2",
        "--sample-every",
        "2",
    )
    cfg = torch.load(run_dir / "checkpoints" / "0000002.pt", weights_only=True)["config"]
    assert (cfg["in_channels"], cfg["input_size"], cfg["num_classes"]) == (
        (1, 8, 5) if kind == "pixels" else (4, 8, 5)
    )
    # latents: channels 0-2, normalised
    assert (run_dir / "samples" / "0000002.png").is_file()


def test_encode_latents_stores_every_image_and_its_mirror_with_its_label(tmp_path, monkeypatch):
    """With a stand-in for diffusers' AutoencoderKL whose latent is the 8 x 8 average of the pixels
    (and a fourth channel of zeros)."""
    class FakeVAE(torch.nn.Module):
        def encode(self, x):
            z = torch.nn.functional.avg_pool2d(x, 8)                      # (B, 3, H/8, W/8)
            z = torch.cat([z, torch.zeros_like(z[:, :1])], dim=1)         # (B, 4, H/8, W/8)
            return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=lambda: z))

    fake = types.ModuleType("diffusers")
    fake.AutoencoderKL = types.SimpleNamespace(from_pretrained=lambda name: FakeVAE())
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    folder = image_folder(tmp_path / "images", classes=2, per_class=3, size=(40, 32))
    data.encode_latents(folder, tmp_path / "latents.npz", size=16, device="cpu", batch=4, workers=0)
    saved = np.load(tmp_path / "latents.npz")
    x, y = saved["x"], saved["y"]
    assert x.shape == (12, 4, 2, 2) and x.dtype == np.float16       # 6 images, each twice
    assert y.tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1]       # batches of 4: images, mirrors
    pixels = data.ImageFolder(folder, 16)[range(6)][0].float() / 127.5 - 1
    expected = torch.nn.functional.avg_pool2d(pixels, 8).half().numpy()
    assert np.array_equal(x[:4, :3], expected[:4])                    # the first batch of images
    # ... then their mirror images (summed in another order: equal to float16 rounding)
    mirrors = expected[:4, :, :, ::-1].astype(np.float32)
    assert np.allclose(x[4:8, :3].astype(np.float32), mirrors, rtol=0, atol=1e-3)


#################################################################################
#              The CPU miniature: one size flag, timed training                 #
#################################################################################

@pytest.mark.parametrize("model", ["dit", "sprint", "sparsedit"])
def test_the_mini_size_is_one_flag_for_every_model(model):
    cfg = train.parse_args(["--model", model, "--size", "mini"])
    net = models.create_model(sprint.ModelConfig(cfg.model, cfg.size, 2, 16, 3, 9))
    # B's split, narrowed
    assert (net.cfg.hidden_size, net.cfg.num_heads, net.cfg.depths) == (128, 4, (2, 8, 2))
    # SparseDiT: its 12 layers, 1,2,2,1
    assert sum(isinstance(m, sprint.Block) for m in net.modules()) == 12
    v = net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 8]))
    assert v.shape == (2, 3, 16, 16)


def test_log_records_training_seconds_without_evaluation_and_resume_continues_them(
    tmp_path, monkeypatch
):
    held_out = train.held_out_loss

    # an evaluation that takes 0.3 s
    def slow(*args, **kwargs):
        time.sleep(0.3)
        return held_out(*args, **kwargs)
    monkeypatch.setattr(train, "held_out_loss", slow)
    begin = time.perf_counter()
    # 5 evaluations: >= 1.5 s of waiting
    run_dir = run(tmp_path, "--steps", "4", "--eval-every", "1")
    wall = time.perf_counter() - begin
    recs = records(run_dir)
    # on every record, never decreasing
    seconds = [rec["train_s"] for rec in recs]
    assert seconds == sorted(seconds) and seconds[0] == 0 and 0 < seconds[-1] < wall - 1.5
    assert {rec["step"] for rec in recs if "eval_loss" in rec} == {0, 1, 2, 3, 4}
    ckpt = torch.load(run_dir / "checkpoints" / "0000004.pt", weights_only=True)
    assert ckpt["train_s"] == seconds[-1]
    run(tmp_path, "--resume", str(run_dir), "--steps", "6", "--eval-every", "0")
    resumed = [rec["train_s"] for rec in records(run_dir)][len(recs):]
    assert len(resumed) > 0 and all(s > ckpt["train_s"] for s in resumed)


def test_an_npz_of_pixels_is_resized_to_the_image_size_with_antialiasing(tmp_path):
    # 1-pixel checkerboard
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    np.savez(
        tmp_path / "px.npz",
        x=np.repeat(checker[None, ..., None], 12, 0).repeat(3, -1),
        y=np.arange(12) % 3,
    )
    args = train.parse_args(["--data", str(tmp_path / "px.npz"), "--image-size", "16"])
    dataset, num_classes = data.load_data(args)
    x = dataset[:][0]
    assert x.shape == (12, 3, 16, 16) and num_classes == 3
    # averaged to grey, not aliased to 0 or 255
    assert (x.float() - 127.5).abs().max() <= 1
    np.savez(tmp_path / "latents.npz", x=np.zeros((12, 4, 8, 8), np.float16), y=np.arange(12) % 3)
    with pytest.raises(
        ValueError,
        match=r"--image-size 16: .*latents\.npz holds 8x8 latents, which cannot be resized",
    ):
        data.load_data(
            train.parse_args(["--data", str(tmp_path / "latents.npz"), "--image-size", "16"])
        )
