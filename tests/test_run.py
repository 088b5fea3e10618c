"""A multi-day run as the official SPRINT loop runs it, on the tiny model: a step in micro-batches is
the same step (also resumed with another split) and DDP all-reduces its gradients once; activation
checkpointing gives the same gradients in less memory and still one compiled graph; the EMA's
samples while training are sample.py's, its FID fid.py's (over the ranks too); checkpoints are
pruned to the newest, the stages' ends and the milestones; the held-out loss of the EMA weights is
logged beside the raw weights'; tools/plot.py draws the log."""
import copy
import ctypes
import ctypes.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import sample
import sprint
import train
from test_fid import fixture_model
import tiny
from sprint import SPRINT
from tiny import (TINY, npz, peak_growth, randomize, records, run, save_ckpt, tiny_model,
                  tool)

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py
M_MMAP_THRESHOLD = -3                   # glibc's mallopt parameter


def checkpoint(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"{step:07d}.pt", weights_only=True)


def max_rel(a, b):
    """The largest relative difference of two state dicts' tensors (norm of the difference over
    the norm of the tensor)."""
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)).item()
               for k in b if b[k].is_floating_point())


#################################################################################
#        Gradient accumulation: micro-batches of the same global batch          #
#################################################################################

def test_a_step_in_micro_batches_is_the_same_step_to_rounding_also_resumed(tmp_path):
    """Every draw is made for the global batch and cut into micro-batches: 4 micro-batches of 2 take
    the step one batch of 8 takes (loss, gradient norm, weights, EMA, AdamW's moments to float
    rounding), through both stages; a run resumed with another split continues the same run."""
    flags = ("--steps", "4", "--finetune-steps", "2", "--ft-warmup", "1")
    whole = run(tmp_path / "whole", *flags)
    split = run(tmp_path / "split", *flags, "--grad-accum", "4")
    half = run(tmp_path / "half", *flags, "--grad-accum", "2", "--ckpt-every", "3")
    (half / "checkpoints" / "0000006.pt").unlink()
    run(tmp_path, "--resume", str(half), "--grad-accum", "4")        # from step 4, stage 2's start
    assert "batch 8 = 1 x 4 x 2" in (split / "log.txt").read_text()
    logged = [[rec for rec in records(d) if "loss" in rec] for d in (whole, split, half)]
    assert [rec["step"] for rec in logged[2]] == [*range(1, 7), 5, 6]
    for other in (logged[1], logged[2][:4] + logged[2][6:]):
        for a, b in zip(logged[0], other, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    a = checkpoint(whole, 6)
    for other in (split, half):
        b = checkpoint(other, 6)
        assert max_rel(b["model"], a["model"]) < 1e-5 and max_rel(b["ema"], a["ema"]) < 1e-5
        for i, state in a["opt"]["state"].items():
            assert max_rel(b["opt"]["state"][i], state) < 1e-4


def test_ddp_all_reduces_the_gradients_once_a_step_after_the_last_micro_batch(tmp_path):
    """With --grad-accum 4, DDP (one gloo process here) all-reduces each gradient bucket as often as
    with 1: once a step, after the last micro-batch (no_sync before it), not after each."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0,
                                         world_size=1)
    try:
        raw = randomize(tiny_model())
        model = torch.nn.parallel.DistributedDataParallel(raw)
        reduced = []

        def count(state, bucket):                      # a comm hook: the bucket, not reduced
            reduced.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future
        model.register_comm_hook(None, count)
        ema = copy.deepcopy(raw).requires_grad_(False)
        opt = train.make_optimizer(raw, 1e-3, torch.device("cpu"))
        x, y = torch.randn(8, 4, 8, 8), torch.arange(8)
        stage = train.Stage(drop=0.75, mask_type="structured", path_drop=0.1, lr=1e-3,
                            ema_decay=0.9)
        per_step = []
        for accum in (1, 4):
            reduced.clear()
            draws = train.draw(y, x.shape[1:], 8, slice(None), stage, raw.cfg)
            train.train_step(model, raw, ema, opt, x, draws, accum=accum, ema_decay=0.9,
                             ddpm=None, precision="fp32", grad_clip=1.0,
                             scaler=torch.amp.GradScaler("cpu", enabled=False))
            per_step.append(sorted(reduced))
        assert per_step[0] == per_step[1] and per_step[0]
    finally:
        torch.distributed.destroy_process_group()


#################################################################################
#           Activation checkpointing: same gradients, less memory               #
#################################################################################

@pytest.mark.parametrize("name", ["sprint", "sparsedit"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_in_one_compiled_graph(name):
    """Each block recomputed in the backward pass (non-reentrant torch.utils.checkpoint): the same
    loss and gradients; torch.compile still traces the checkpointed forward without a break."""
    kw = {"extra": {"layout": [1, 1, 0, 0]}} if name == "sparsedit" else {}
    plain = randomize(tiny_model(name, **kw))
    checkpointed = tiny_model(name, **kw)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.checkpoint_blocks()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 10])
    sparse = {"ids_keep": sprint.sample_ids_keep(4, 4, 0.75)} if name == "sprint" else {}
    losses = []
    for model in (plain, checkpointed):
        loss = (model(x, t, y, **sparse) ** 2).mean()
        loss.backward()
        losses.append(loss)
    assert torch.equal(*losses)
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9)
    compiled = torch.compile(lambda x: (checkpointed(x, t, y, **sparse) ** 2).mean(),
                             fullgraph=True, backend="eager")
    assert torch.isclose(compiled(x), losses[0])
    compiled(x).backward()


def test_activation_checkpointing_trains_in_less_memory_measured_on_the_cpu():
    """A forward and backward of 8 blocks over 16 x 64 tokens: the resident memory grows by less
    than half as much with each block recomputed in the backward pass. glibc maps and unmaps blocks
    of 64 KiB and more meanwhile, and first gives back its free heap, so that the resident size
    follows the tensors alive."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    model = SPRINT(sprint.ModelConfig(size="toy", input_size=16, patch_size=2, in_channels=4,
                                      num_classes=10, depths=(2, 4, 2)))

    def step(batch):
        x, t, y = torch.randn(batch, 4, 16, 16), torch.rand(batch), torch.zeros(batch).long()
        model(x, t, y).square().mean().backward()

    def plain():
        for block in model.modules():
            block.__dict__.pop("forward", None)           # the class's forward again
    peaks = []
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
    try:
        for setting in (model.checkpoint_blocks, plain):
            setting()
            step(1)                                       # what a first call loads, loaded
            libc.malloc_trim(0)                           # the free heap given back to the system
            peaks.append(peak_growth(lambda: step(16), files=False)[1])
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    checkpointed, whole = peaks
    assert 0 < checkpointed < whole / 2, (checkpointed, whole)


#################################################################################
#                   The EMA's samples and FID while training                    #
#################################################################################

def test_sample_every_writes_the_emas_grid_as_sample_py_draws_it(tmp_path):
    """samples/STEP.png: ten classes from the same noise, a row unguided, with CFG 4 and with PDG 4,
    Euler 50 steps (the official loop's): what sample.py draws from that step's EMA weights. From
    random weights (--init), so that labels and guidance change the images."""
    init = save_ckpt(tmp_path / "init.pt", randomize(tiny_model(input_size=16, patch_size=4,
                                                                in_channels=3, depths=(1, 1, 1))))
    run_dir = run(tmp_path, "--steps", "2", "--sample-every", "2", "--init", init)
    grid = np.asarray(Image.open(run_dir / "samples" / "0000002.png"))
    cell = (grid.shape[0] - 2) // 3                                  # 3 rows, 2-pixel borders
    unguided, cfg, pdg = (grid[2 + r * cell: r * cell + cell] for r in range(3))
    assert not np.array_equal(unguided, cfg) and not np.array_equal(cfg, pdg)
    ckpt = run_dir / "checkpoints" / "0000002.pt"
    rows = []
    for guidance in (["--cfg-scale", "1"], ["--cfg-scale", "4"], ["--cfg-scale", "4", "--pdg"]):
        out = tmp_path / f"{len(rows)}.npz"
        sample.main(["--ckpt", str(ckpt), "--sampler", "euler", "--steps", "50", "--classes",
                     *map(str, range(10)), "--num-samples", "10", "--out", str(out), *guidance])
        rows.append(npz(out)["arr_0"])
    expected = tmp_path / "expected.png"
    sample.save_grid(np.concatenate(rows), expected, nrow=10)
    assert np.array_equal(grid, np.asarray(Image.open(expected)))


def test_a_latent_model_without_diffusers_trains_with_a_note_and_no_grids(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)                 # not installed
    (tmp_path / "latents").mkdir()
    np.save(tmp_path / "latents" / "x.npy", np.random.default_rng(0).standard_normal(
        (40, 4, 8, 8)).astype(np.float32))
    np.save(tmp_path / "latents" / "y.npy", np.arange(40) % 4)
    run_dir = run(tmp_path, "--data", str(tmp_path / "latents"), "--steps", "2",
                  "--sample-every", "1")
    lines = (run_dir / "log.txt").read_text().splitlines()
    assert lines[1] == ("no sample grids: the SD-VAE stabilityai/sd-vae-ft-ema needs the optional "
                        "package diffusers: pip install diffusers")
    assert not (run_dir / "samples").exists()
    with pytest.raises(ValueError, match="^--fid-every: the SD-VAE .* pip install diffusers$"):
        run(tmp_path, "--data", str(tmp_path / "latents"), "--steps", "2", "--fid-every", "1",
            "--fid-ref", "ref.npz")


@pytest.fixture
def reference(tmp_path, monkeypatch):
    """fid.py's Inception with the fixture's weights (as released, a file in torch's hub cache),
    the first 64 of its 2048 dimensions scored (the full square root takes 10-60 s; fid.py's own
    tests cover it), and a reference's statistics (mu, sigma) in an .npz."""
    network = fixture_model()
    monkeypatch.setattr(fid, "released", lambda cls, url, device="cpu": network)
    distance = fid.frechet_distance
    monkeypatch.setattr(fid, "frechet_distance", lambda mu1, s1, mu2, s2: distance(
        mu1[:64], s1[:64, :64], mu2[:64], s2[:64, :64]))
    rng = np.random.default_rng(0)
    features = rng.standard_normal((200, 2048)).astype(np.float32) * 0.01 + 0.05
    np.savez(tmp_path / "ref.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    return tmp_path / "ref.npz"


def test_fid_every_logs_fid_pys_fid_of_sample_pys_samples_of_the_ema(tmp_path, reference, capsys):
    """--fid-every: --fid-samples unguided EMA samples, Euler 50 (the official eval_fid's), scored
    against --fid-ref: what fid.py prints for sample.py's samples of the checkpoint at that step."""
    run_dir = run(tmp_path, "--steps", "2", "--fid-every", "2", "--fid-ref", str(reference),
                  "--fid-samples", "3")
    (logged,) = [rec for rec in records(run_dir) if "fid" in rec]
    assert logged["step"] == 2 and f"step 2: FID {logged['fid']:.3f} of 3 EMA samples" in (
        run_dir / "log.txt").read_text()
    samples = tmp_path / "samples.npz"
    sample.main(["--ckpt", str(run_dir / "checkpoints" / "0000002.pt"), "--sampler", "euler",
                 "--steps", "50", "--cfg-scale", "1", "--num-samples", "3",
                 "--per-proc-batch-size", "8", "--out", str(samples)])
    capsys.readouterr()
    fid.main([str(samples), str(reference), "--fid-only", "--json", "--batch-size", "8"])
    assert logged["fid"] == pytest.approx(json.loads(capsys.readouterr().out)["FID"], rel=1e-6)


def test_the_fid_of_samples_drawn_over_two_ranks_is_the_fid_of_one(monkeypatch):
    """Rank r samples batches r, r + 2, ... (as sample.py shards them) and the features are gathered
    on every rank: rank 0's FID is the one process's."""
    ema = randomize(tiny_model(in_channels=3)).eval()
    network = types.SimpleNamespace(features=lambda images: (
        torch.from_numpy(images).float().mean((1, 2)),))           # a colour per image: 3 dims
    ref = {"mu": np.full(3, 100.0), "sigma": np.eye(3) * 50}
    sampling = ("euler", 5, "fp32", None, 1.0)
    args = types.SimpleNamespace(fid_samples=7, seed=0)               # 7 samples, batches of 2
    one = train.ema_fid(ema, network, ref, args, 2, 0, 1, sampling)
    shares = []

    def all_gather_object(output, obj):          # rank 1's call first; rank 0's gets both shares
        shares.append(obj)
        output[:] = [obj, *shares[:1]] if len(shares) == 2 else [obj, obj]
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    train.ema_fid(ema, network, ref, args, 2, 1, 2, sampling)
    two = train.ema_fid(ema, network, ref, args, 2, 0, 2, sampling)
    assert two == pytest.approx(one, rel=1e-6)


#################################################################################
#        Checkpoints kept, the EMA's held-out loss, the log as a picture        #
#################################################################################

def test_keep_last_deletes_older_checkpoints_but_stage_ends_and_milestones(tmp_path):
    run_dir = run(tmp_path, "--steps", "3", "--finetune-steps", "5", "--ckpt-every", "1",
                  "--keep-last", "2", "--keep-every", "5")
    kept = sorted(os.listdir(run_dir / "checkpoints"))
    # stage 1's end (3), the milestone (5), the newest two (7, 8)
    assert kept == ["0000003.pt", "0000005.pt", "0000007.pt", "0000008.pt"]


def test_the_emas_held_out_loss_is_logged_beside_the_raw_weights(tmp_path):
    """eval_loss_ema: the held-out loss of the EMA weights (what sampling uses), with all tokens and
    the draws of eval_loss; equal to it at step 0, where the EMA is the model."""
    run_dir = run(tmp_path, "--steps", "3", "--eval-every", "3", "--ema-decay", "0.5")
    evals = [rec for rec in records(run_dir) if "eval_loss" in rec]
    assert [rec["step"] for rec in evals] == [0, 3]
    assert evals[0]["eval_loss_ema"] == evals[0]["eval_loss"]
    ckpt = checkpoint(run_dir, 3)
    args = train.parse_args([*TINY, "--data", tiny.TOY_DATA])[0]
    dataset, _ = train.load_data(args)
    x, y = dataset[train.split(len(dataset))[1]]
    ema = train.MODELS["sprint"](sprint.ModelConfig(**ckpt["config"]))
    ema.load_state_dict(ckpt["ema"])
    stage = train.stage_at(args, 0, True)._replace(drop=0.0, path_drop=0.0)
    value = train.held_out_loss(ema, train.model_inputs(x, 1.0), y, slice(None), len(y), stage,
                                None, "fp32")
    assert evals[1]["eval_loss_ema"] == pytest.approx(value.item(), rel=1e-6)
    assert evals[1]["eval_loss_ema"] != evals[1]["eval_loss"]


def test_plot_draws_each_runs_curves_with_stage_2_marked_and_names_a_folder_without_a_log(
        tmp_path):
    """tools/plot.py: three runs overlaid, each in its colour, a grey line where each run's stage 1
    ends (run 0 at step 6 of 8, run 1 at 4, run 2 a stage 2 alone); a folder without train.py's
    log is one line."""
    plot = tool("plot")
    for k, stage_1 in enumerate((6, 4, 0)):                     # run 2: stage 2 alone
        logged = [{"step": s, "stage": 1 if s <= stage_1 else 2, "loss": 1 / s, "lr": 1e-3}
                  for s in range(1, 9)]
        logged += [{"step": s, "eval_loss": 1 / (s + 1), "eval_loss_ema": 1.2 / (s + 1)}
                   for s in (0, 4, 8)]
        logged += [{"step": s, "fid": 100 / s} for s in (4, 8)] if k == 0 else []
        (tmp_path / f"run{k}").mkdir()
        (tmp_path / f"run{k}" / "log.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                                for r in logged))
    out = plot.plot([str(tmp_path / f"run{k}") for k in range(3)], str(tmp_path / "c.png"))
    pixels = np.asarray(Image.open(out))
    assert set(plot.COLOURS[:3]) <= {tuple(p) for p in pixels.reshape(-1, 3)}
    for stage_1 in (6, 4):                         # the first panel's column at stage 1's end
        column = pixels[30:30 + plot.H, plot.MARGIN + int(plot.W * stage_1 / 8)]
        assert (column == plot.GREY).all(-1).mean() > 0.5
    with pytest.raises(SystemExit, match=r"^plot\.py: error: .*nowhere: no readable log\.jsonl"):
        plot.main([str(tmp_path / "nowhere")])
