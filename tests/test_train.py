"""train.py as a specification: the training loss is the official SPRINT code's from the same random
draws; the draws are the papers' (t logit-normal or uniform timesteps, 10% label drop and 10% path
drop apart from each other, k tokens kept per group); a step is AdamW on the clipped gradient, then
the EMA update; both SPRINT stages in one loop, stage 2 from the EMA weights, seeing every token,
with the official warm-up; a run resumes exactly from its step alone (also after kill -9), two DDP
processes train as one does, with one writer, and the log measures training seconds. Data sources:
test_data.py; the command line and bad input: test_train_cli.py."""
import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scipy import stats

import sample
import sprint
import train
import tiny
from tiny import (ENV, TINY, TRAIN, assert_same_training_state, fixture, randomize, records, run,
                  tiny_model, two_ranks, write_safetensors)

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py
LOSS = np.load(fixture("sprint_train_loss.npz"))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


#################################################################################
#       The objective: the official SPRINT training loss, from its draws        #
#################################################################################

@pytest.fixture(scope="module")
def official_loss(tmp_path_factory):
    """snap-research/Sprint's FlowMatching.compute_loss on its SiT in training mode, every draw
    recorded (tests/fixtures/sprint_train_loss.npz): the model read from its weights written as a
    released .safetensors, the recorded draws as train.py's Draws, the recorded results."""
    config = json.loads(str(LOSS["config"]))
    path = tmp_path_factory.mktemp("official") / "sprint_train_loss.safetensors"
    write_safetensors(path, {k[3:]: torch.from_numpy(LOSS[k]) for k in LOSS.files
                             if k.startswith("sd/")}, "F32")
    model = sample.load_model(path, input_size=config["context_size"]).train()
    f = {k: torch.from_numpy(LOSS[k]) for k in LOSS.files if k != "config" and "/" not in k}
    sparse = {"ids_keep": f["ids_keep"]} if "ids_keep" in f else {}
    if "path_dropped" in f:
        sparse["path_drop"] = f["path_dropped"]
    draws = train.Draws(f["t"].float(), f["y_used"], f["noise"].float(), sparse)
    return model, f["images"], draws, f


# train_step's settings for SPRINT on a CPU: fp32, clipping at 1.0, no loss scaling
STEP = dict(accum=1, ema_decay=0.9999, ddpm=None, precision="fp32", grad_clip=1.0,
            scaler=torch.amp.GradScaler("cpu", enabled=False))


def test_the_training_loss_is_the_official_sprint_loss_from_the_same_draws(official_loss):
    model, images, draws, f = official_loss
    outputs = []
    hook = model.register_forward_hook(lambda module, inputs, out: outputs.append(out))
    per_sample = train.loss_at(model, images, draws, ddpm=None)
    hook.remove()
    assert rel(outputs[0], f["model_out"]) < 1e-5                     # the path, t, drops
    assert rel(per_sample, f["loss_per_sample"]) < 1e-5               # the target eps - x
    # the step train.py takes trains on, and reports, their mean
    ema = copy.deepcopy(model)
    opt = train.make_optimizer(model, 1e-4, torch.device("cpu"))
    loss, _ = train.train_step(model, model, ema, opt, images, draws, **STEP)
    assert abs(loss.item() / f["loss"].item() - 1) < 1e-5


#################################################################################
#                        The draws, as the papers make them                     #
#################################################################################

G = 20_000                      # samples per statistical test; each test is seeded


def draws_of(stage, diffusion="flow", num_classes=10, G=G):
    """train.draw for a global batch of G labels, on a 4 x 4 token grid -> (labels, draws)."""
    model = "dit" if diffusion == "ddpm" else "sprint"        # SPRINT trains with flow matching
    cfg = sprint.ModelConfig(model=model, input_size=8, patch_size=2, num_classes=num_classes,
                             hidden_size=32, num_heads=2, depths=(1, 1, 1), diffusion=diffusion)
    torch.manual_seed(0)
    y = torch.randint(num_classes, (G,))
    return y, train.draw(y, (1, 1, 1), G, slice(None), stage, cfg)


def stage_of(*flags, step=0):
    """train.py's stage at `step` for these flags (the defaults: SPRINT's 75% and 10% drops)."""
    return train.stage_at(train.parser().parse_args(list(flags)), step, sparse_path=True)


def binomial_ok(hits, n, p):
    """A count within 4.5 standard deviations of n p."""
    return abs(hits - n * p) < 4.5 * (n * p * (1 - p)) ** 0.5


def test_flow_matching_draws_t_logit_normal():
    """t = sigmoid(n), n ~ N(0, 1) (SiT's lognormal weighting): logit(t) is standard normal."""
    _, draws = draws_of(stage_of())
    logit = torch.logit(draws.t.double()).numpy()
    assert stats.kstest(logit, "norm").pvalue > 1e-3
    assert draws.eps.shape == (G, 1, 1, 1)
    assert stats.kstest(draws.eps.flatten(), "norm").pvalue > 1e-3


def test_ddpm_draws_every_timestep_uniformly():
    _, draws = draws_of(stage_of(), diffusion="ddpm")
    assert draws.t.dtype == torch.long and (draws.t.min(), draws.t.max()) == (0, 999)
    counts = torch.bincount(draws.t // 100, minlength=10).numpy()     # ten bins of 100 timesteps
    assert stats.chisquare(counts).pvalue > 1e-3


def test_label_drop_and_path_drop_are_each_10_percent_and_independent():
    y, draws = draws_of(stage_of())
    null = draws.y == 10                                              # the null label
    path = draws.sparse["path_drop"]
    assert torch.equal(draws.y[~null], y[~null])                      # the others keep theirs
    assert binomial_ok(null.sum().item(), G, 0.1) and binomial_ok(path.sum().item(), G, 0.1)
    assert binomial_ok((null & path).sum().item(), G, 0.1 * 0.1)      # P(both) = P(one) P(other)


@pytest.mark.parametrize("drop, n, k", [(0.75, 2, 1), (0.5, 2, 2)])
def test_token_drop_keeps_exactly_k_tokens_of_every_n_by_n_group(drop, n, k):
    _, draws = draws_of(stage_of("--drop", str(drop)), G=1000)
    ids = draws.sparse["ids_keep"]                                    # (G, M), a 4 x 4 grid
    group = (ids // 4 // n) * (4 // n) + ids % 4 // n
    counts = torch.zeros(1000, (4 // n) ** 2, dtype=torch.long).scatter_add_(
        1, group, torch.ones_like(group))
    assert (counts == k).all()


def test_stage_2_draws_every_token_and_path_drop_stays_at_10_percent():
    _, draws = draws_of(stage_of("--steps", "5", "--finetune-steps", "5", step=5))
    assert set(draws.sparse) == {"path_drop"}
    assert binomial_ok(draws.sparse["path_drop"].sum().item(), G, 0.1)


#################################################################################
#                   A step: AdamW on the clipped gradient, then EMA              #
#################################################################################

def test_a_step_is_adamw_on_the_gradient_clipped_to_norm_1_then_the_ema_update():
    model = randomize(tiny_model())                       # random weights: a gradient norm > 1
    ema = randomize(tiny_model(), seed=1)                 # an EMA apart from the weights
    before, ema_before = copy.deepcopy(model), copy.deepcopy(ema)
    lr, decay = 1e-3, 0.75
    opt = train.make_optimizer(model, lr, torch.device("cpu"))
    assert opt.defaults["weight_decay"] == 0 and opt.defaults["betas"] == (0.9, 0.999)
    grads = []
    adamw_step = opt.step

    def spy():
        grads.append([p.grad.clone() for p in model.parameters()])
        adamw_step()
    opt.step = spy
    x = torch.randn(8, 4, 8, 8)
    _, draws = draws_of(stage_of(), G=8)
    step = {**STEP, "ema_decay": decay}
    _, grad_norm = train.train_step(model, model, ema, opt, x, draws, **step)
    clipped = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[0]]))
    assert grad_norm > 2 and abs(clipped - 1) < 1e-5                  # SPRINT's max_grad_norm 1.0
    for p0, g, p1, e0, e1 in zip(before.parameters(), grads[0], model.parameters(),
                                 ema_before.parameters(), ema.parameters()):
        # AdamW's first step: its bias corrections make it lr * g / (|g| + eps); no weight decay
        torch.testing.assert_close(p1, p0 - lr * g / (g.abs() + 1e-8), rtol=0, atol=1e-7)
        torch.testing.assert_close(e1, decay * e0 + (1 - decay) * p1, rtol=1e-6, atol=1e-7)


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


@pytest.mark.parametrize("model, diffusion, recipe", [("sprint", "flow", ("bf16", 1.0, "none")),
                                                      ("dit", "flow", ("bf16", 1.0, "none")),
                                                      ("dit", "ddpm", ("fp32", 0.0, "step")),
                                                      ("sparsedit", "ddpm", ("fp16", 0.0, "none"))])
def test_each_model_trains_as_its_official_code_does(model, diffusion, recipe):
    """SPRINT's code trains SPRINT and its SiT in bf16, clips at 1.0 and never flips; DiT's trains
    in fp32 (TF32), mirroring half the images each step; SparseDiT's in fp16 on fast-DiT's features
    (one view each, flipped or not at extraction), not flipped; neither clips (README's table)."""
    cfg = sprint.ModelConfig(model=model, diffusion=diffusion, depths=(1, 2, 1))
    assert cfg.paper_recipe == recipe


def test_without_clipping_adamw_sees_the_whole_gradient():
    model = randomize(tiny_model("dit"))
    opt = train.make_optimizer(model, 1e-3, torch.device("cpu"))
    norms, adamw_step = [], opt.step

    def spy():
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm()
                                                           for p in model.parameters()])))
        adamw_step()
    opt.step = spy
    _, draws = draws_of(train.stage_at(train.parser().parse_args([]), 0, sparse_path=False), G=8)
    x, ema = torch.randn(8, 4, 8, 8), copy.deepcopy(model)
    _, grad_norm = train.train_step(model, model, ema, opt, x, draws, **{**STEP, "grad_clip": 0.0})
    assert grad_norm > 2 and torch.isclose(norms[0], grad_norm)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_fp16_scales_its_loss(tmp_path, precision):
    """--precision on a CPU (the papers' own default only on CUDA): a finite loss, and for fp16 a
    loss scale that the checkpoint keeps for an exact resume."""
    run_dir = run(tmp_path, "--steps", "3", "--precision", precision, "--eval-every", "3")
    losses = [rec["loss"] for rec in records(run_dir) if "loss" in rec]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert f"; {precision}, grad clip 1.0, flip none;" in (run_dir / "log.txt").read_text()
    scaler = torch.load(run_dir / "checkpoints" / "0000003.pt", weights_only=True)["scaler"]
    assert (scaler.get("scale", 0) > 0) == (precision == "fp16")


def test_fp16_steps_whose_gradient_overflows_are_skipped_not_fatal(tmp_path, monkeypatch):
    """A loss scale too large for fp16 makes the gradient infinite: GradScaler skips those steps and
    halves the scale; the loss stays finite and the run goes on."""
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: scaler(*a, init_scale=2.0 ** 60,
                                                                        **k))
    run_dir = run(tmp_path, "--steps", "4", "--precision", "fp16")
    logged = [rec for rec in records(run_dir) if "loss" in rec]
    assert len(logged) == 4 and not np.isfinite(logged[0]["grad_norm"])
    assert np.isfinite([rec["loss"] for rec in logged]).all()


def test_stage_2_starts_from_the_stage_1_ema_weights_with_a_fresh_optimizer(tmp_path, monkeypatch):
    entering = []                              # (weights, optimizer state) as each step begins
    step = train.train_step

    def spy(model, raw, ema, opt, *args, **kwargs):
        entering.append(({k: v.clone() for k, v in raw.state_dict().items()}, len(opt.state)))
        return step(model, raw, ema, opt, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", spy)
    run_dir = run(tmp_path, "--steps", "2", "--finetune-steps", "1")
    ema = torch.load(run_dir / "checkpoints" / "0000002.pt", weights_only=True)["ema"]
    (raw_1, state_1), (raw_2, state_2) = entering[1], entering[2]
    assert state_1 > 0 and state_2 == 0
    assert all(torch.equal(raw_2[k], ema[k]) for k in ema)
    assert not all(torch.equal(raw_1[k], ema[k]) for k in ema)        # the EMA is not the weights


@pytest.mark.parametrize("flip", ["none", "step"])
def test_a_step_sees_its_images_in_minus_1_to_1_mirrored_as_flip_says(tmp_path, monkeypatch, flip):
    """The pixels mapped to [-1, 1]; --flip none (SPRINT's and SparseDiT's code): every image as it
    is; step (DiT's): each mirrored at random each time, so an image seen twice is seen both ways
    (stored latents: their mirror's view, test_data.py)."""
    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", x=images, y=np.arange(40) % 10)
    seen, step = [], train.train_step

    def spy(model, raw, ema, opt, x, *args, **kwargs):
        seen.append(x.clone())
        return step(model, raw, ema, opt, x, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", spy)
    # 10 steps of 8 from 36 images to train on: each seen about twice
    run(tmp_path, "--data", str(tmp_path / "images.npz"), "--steps", "10", "--flip", flip)
    x = torch.cat(seen)[:, None]                                      # (80, 1, 3, 16, 16)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()[None] / 127.5 - 1
    as_is = (x == pixels).flatten(2).all(-1)                          # (80, 40): which image
    mirrored = (x == pixels.flip(-1)).flatten(2).all(-1)
    assert (as_is | mirrored).any(1).all()
    ways = {(image, True) for image in mirrored.nonzero()[:, 1].tolist()}
    ways |= {(image, False) for image in as_is.nonzero()[:, 1].tolist()}
    both = {image for image, _ in ways if (image, not _) in ways}     # seen mirrored and not
    if flip == "none":
        assert not mirrored.any()
    else:
        assert as_is.any() and mirrored.any() and len(both) > 0


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


def test_the_held_out_loss_is_measured_at_the_end_of_each_stage_with_the_same_noise_in_both_columns(
        tmp_path):
    run_dir = run(
        tmp_path, "--drop", "0.75", "--steps", "2", "--finetune-steps", "1", "--eval-every", "100"
    )
    evals = [rec for rec in records(run_dir) if "eval_loss" in rec]
    # the gap before and after fine-tuning
    assert [rec["step"] for rec in evals] == [0, 2, 3]
    assert all("eval_loss_drop" in rec for rec in evals)
    # at step 0 the model outputs 0 whatever it sees: the columns differ only if their noise does
    assert evals[0]["eval_loss"] == evals[0]["eval_loss_drop"]
    assert evals[1]["eval_loss"] != evals[1]["eval_loss_drop"]


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
    # evaluations must not disturb the RNG
    flags = ("--eval-every", "2")
    whole = run(tmp_path / "a", "--steps", "4", *flags)
    half = run(tmp_path / "b", "--steps", "2", *flags)
    resumed = run(tmp_path / "b", "--resume", str(half / "checkpoints" / "0000002.pt"),
                  "--steps", "4")
    assert resumed == half
    assert_same_training_state(whole / "checkpoints" / "0000004.pt",
                               half / "checkpoints" / "0000004.pt")


def test_a_resumed_run_keeps_its_precision_clipping_and_loss_scale(tmp_path):
    """The recipe a run resolved (on a CPU fp32, SPRINT's clip 1.0) is in its flags, so a resume on
    another device keeps it; fp16's GradScaler continues where it stopped."""
    plain = run(tmp_path / "plain", "--steps", "1")
    stored = torch.load(plain / "checkpoints" / "0000001.pt", weights_only=True)["args"]
    assert (stored["precision"], stored["grad_clip"]) == ("fp32", 1.0)
    whole = run(tmp_path / "a", "--steps", "4", "--precision", "fp16")
    half = run(tmp_path / "b", "--steps", "2", "--precision", "fp16")
    run(tmp_path / "b", "--resume", str(half / "checkpoints" / "0000002.pt"), "--steps", "4")
    a, b = (torch.load(d / "checkpoints" / "0000004.pt", weights_only=True) for d in (whole, half))
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 4
    assert_same_training_state(whole / "checkpoints" / "0000004.pt",
                               half / "checkpoints" / "0000004.pt")


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint_exactly(tmp_path):
    """Killed at any moment, also while older checkpoints are being deleted (--keep-last): the
    newest whole one resumes the run, which ends as an unbroken run ends, the same files kept."""
    # a checkpoint every step; the resume crosses into stage 2
    flags = ["--data", tiny.TOY_DATA, "--image-size", "16", "--steps", "2", "--finetune-steps", "6",
             "--ckpt-every", "1", "--eval-every", "0", "--keep-last", "2", "--keep-every", "4"]
    proc = subprocess.Popen([sys.executable, TRAIN, *TINY, *flags, "--results-dir", "killed"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "000-sprint-toy-4" / "checkpoints"
    deadline = time.time() + 120
    while not list(ckpts.glob("*.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (ckpts / "0000008.pt").exists()                          # killed mid-run
    # the rest in process
    # the rest, in this process: --resume, the run's own flags
    resumed = train.main(["--resume", str(ckpts.parent)])
    assert resumed == str(ckpts.parent)
    whole = run(tmp_path / "whole", *flags) / "checkpoints"
    assert_same_training_state(ckpts / "0000008.pt", whole / "0000008.pt")
    # stage 1's end, the milestone, the newest two
    kept = ["0000002.pt", "0000004.pt", "0000007.pt", "0000008.pt"]
    assert sorted(os.listdir(ckpts)) == sorted(os.listdir(whole)) == kept


#################################################################################
#          DDP: two processes train as one does, and only rank 0 writes         #
#################################################################################

def test_two_gloo_processes_train_and_evaluate_as_one_process_does_and_only_rank_0_writes(tmp_path):
    """Every random draw covers the global batch and each rank takes its rows, the data order
    too: two processes of 2 micro-batches of 2 see what one process of 8 sees, and DDP averages
    their gradients (once a step: no_sync before the last micro-batch). The held-out loss is each
    rank's share of the held-out images, summed: what one process gets. No warning is printed."""
    flags = [*TINY, "--data", tiny.TOY_DATA, "--steps", "2", "--ckpt-every", "1", "--eval-every",
             "1"]
    (tmp_path / "two").mkdir()
    for code, stderr in two_ranks("train.py", *flags, "--grad-accum", "2", cwd=tmp_path / "two"):
        assert code == 0, stderr
        assert "Warning" not in stderr, stderr
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
    evals = [[rec for rec in records(d) if "eval_loss" in rec] for d in (one, two)]
    assert [rec["step"] for rec in evals[1]] == [0, 1, 2]
    assert evals[1][0]["eval_loss"] == pytest.approx(evals[0][0]["eval_loss"], rel=1e-6)
    assert evals[1][0]["eval_loss_drop"] == pytest.approx(evals[0][0]["eval_loss_drop"], rel=1e-6)


#################################################################################
#             Flags: the toy run by default; what a size builds                 #
#################################################################################

def test_without_flags_train_py_is_the_toy_run():
    args, _ = train.parse_args([])
    assert (args.model, args.size, args.data) == ("sprint", "toy", None)
    assert (args.drop, args.path_drop) == (0.75, 0.1)
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

    def slow(*args, **kwargs):                                      # a held-out loss of 0.05 s
        time.sleep(0.05)
        return held_out(*args, **kwargs)
    monkeypatch.setattr(train, "held_out_loss", slow)
    begin = time.perf_counter()
    # 4 evaluations (steps 0 to 3) with the drop, without it and of the EMA: >= 0.6 s of waiting
    run_dir = run(tmp_path, "--steps", "3", "--eval-every", "1")
    wall = time.perf_counter() - begin
    recs = records(run_dir)
    # on every record, never decreasing
    seconds = [rec["train_s"] for rec in recs]
    assert seconds == sorted(seconds) and seconds[0] == 0 and 0 < seconds[-1] < wall - 0.55
    assert {rec["step"] for rec in recs if "eval_loss" in rec} == {0, 1, 2, 3}
    ckpt = torch.load(run_dir / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["train_s"] == seconds[-1]
    run(tmp_path, "--resume", str(run_dir), "--steps", "4")
    resumed = [rec["train_s"] for rec in records(run_dir)][len(recs):]
    assert len(resumed) > 0 and all(s > ckpt["train_s"] for s in resumed)
