"""The miniature's runner against the core it runs: every command line it plans is one its script
takes, the model it trains is the miniature's, a sample job reads the checkpoint its training job
writes; sample_like.py gives the samples the data's class proportions, as sample.py's --classes."""
import os
import shlex
from dataclasses import asdict
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch

import quality
import run
import sample
import sample_like
import train
from jobs import ENTRY_POINTS
from sprint import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
# each script's parser, as its entry point reads the line (sample_like.py passes the rest on)
PARSERS = {"train.py": lambda argv: train.parse_args(argv)[0],
           run.SAMPLE_LIKE: lambda argv: sample.parse_args(sample_like.parse_args(argv)[1]),
           run.QUALITY: quality.parse_args}


#################################################################################
#                The runner's command lines, against the scripts                #
#################################################################################

def test_every_planned_line_runs_a_script_that_takes_it(tmp_path):
    args = run.parse_args(["--out", str(tmp_path / "out")])
    jobs = [job for group in run.plan(args) for job in group]
    assert len(jobs) == 72                      # 2 classifiers; 2 seeds x (7 runs, 14 sets scored)
    for job in jobs:
        env, python, script, *argv = shlex.split(job.command())
        assert (env, python) == ("OMP_NUM_THREADS=1", "python") and (ROOT / script).is_file()
        assert script in ENTRY_POINTS
        PARSERS[script](argv)                   # argparse refuses a flag it lacks: SystemExit


def test_the_arms_train_the_miniature_model_and_sample_their_own_checkpoints(tmp_path):
    args = run.parse_args(["--out", str(tmp_path / "out")])
    jobs = [job for group in run.plan(args) for job in group]
    made = {}
    for job in jobs:
        if job.script == run.QUALITY and job.name.startswith("classifier"):   # 16 px, 32 px
            continue
        seed, kind, arm = job.name.split("/")
        if kind == "train":
            flags = PARSERS["train.py"](job.argv())
            meta = torch.device("meta")                         # shapes only, no weights
            start = flags.init
            flags.init = None
            with meta:
                cfg = train.build_model(flags, 3, 8, 9, meta)[0].cfg   # as train.py builds it
            flags.init = start
            grid = run.ARMS[arm][4]                             # (d): the paper's token grid
            width = 64 if grid else 128
            assert (cfg.hidden_size, cfg.num_heads, cfg.depths) == (width, 4, (2, 8, 2))
            assert flags.image_size // flags.patch_size == (16 if grid else 8)
            assert (flags.diffusion == "ddpm") == (arm == "dit32")  # the others: flow, or --init's
            made[seed, arm] = train.run_folder(flags)          # NNN-model-size-patch, as train.py
            assert made[seed, arm].endswith(f"-{flags.model}-S-2")
            if flags.init:                                      # from the DiT's final checkpoint
                assert flags.init == os.path.join(made[seed, "dit32"], "checkpoints", "0002000.pt")
        if kind == "sample":
            ckpt = PARSERS[run.SAMPLE_LIKE](job.argv()).ckpt
            trained = job.inputs[0]
            run_arm = trained.name.split("/")[-1]
            assert os.path.dirname(os.path.dirname(ckpt)) == made[seed, run_arm]
            assert fnmatch(ckpt, trained.output) != ("stage1" in arm)   # its final checkpoint


#################################################################################
#                  sample_like.py: the data's class proportions                 #
#################################################################################

def test_labels_follow_the_data_proportions_by_largest_remainder():
    y = np.repeat(np.arange(3), [50, 30, 20])
    for n, counts in ((10, [5, 3, 2]), (7, [4, 2, 1]), (1, [1, 0, 0])):
        labels = sample_like.labels_like(y, n, seed=0)
        assert np.bincount(labels, minlength=3).tolist() == counts
    assert sample_like.labels_like(y, 100, 1) != sample_like.labels_like(y, 100, 2)
    with np.load(ROOT / run.parse_args([]).data) as f:
        emoji = f["y"]
    share = np.bincount(emoji) / len(emoji) * 900
    assert np.abs(np.bincount(sample_like.labels_like(emoji, 900, 0)) - share).max() < 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-class pixel model of 8 x 8 with random weights, in train.py's checkpoint layout, and a
    dataset whose labels are 60%, 30%, 10% classes 0, 1, 3 -> (checkpoint, data)."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = ModelConfig(model="sprint", input_size=8, patch_size=4, in_channels=3, num_classes=4,
                      hidden_size=16, num_heads=1, depths=(1, 1, 1))
    torch.manual_seed(0)
    model = train.MODELS[cfg.model](cfg)
    with torch.no_grad():                     # adaLN-Zero and the zero final layer would give 0
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    weights = model.state_dict()
    torch.save({"model": weights, "ema": weights, "config": asdict(cfg), "args": {}, "step": 1},
               tmp / "tiny.pt")
    y = np.repeat([0, 1, 3], [6, 3, 1])
    np.savez(tmp / "data.npz", x=np.zeros((10, 8, 8, 3), np.uint8), y=y)
    return str(tmp / "tiny.pt"), str(tmp / "data.npz")


def test_a_sample_like_run_writes_those_labels_and_sample_pys_images(tiny, tmp_path):
    ckpt, data = tiny
    flags = ["--ckpt", ckpt, "--sampler", "euler", "--steps", "1", "--cfg-scale", "2",
             "--per-proc-batch-size", "8", "--num-samples", "20", "--seed", "3"]
    sample_like.main(["--labels-from", data, *flags, "--out", str(tmp_path / "like.npz")])
    labels = sample_like.labels_like(np.load(data)["y"], 20, 3)
    assert np.bincount(labels).tolist() == [12, 6, 0, 2]
    sample.main([*flags, "--classes", *map(str, labels), "--out", str(tmp_path / "classes.npz")])
    with np.load(tmp_path / "like.npz") as like, np.load(tmp_path / "classes.npz") as classes:
        assert like["arr_1"].tolist() == labels
        assert np.array_equal(like["arr_0"], classes["arr_0"])


def test_sample_like_refuses_labels_it_cannot_give_in_one_line(tiny, tmp_path):
    ckpt, _ = tiny
    np.savez(tmp_path / "wide.npz", x=np.zeros((3, 8, 8, 3), np.uint8), y=np.array([0, 2, 7]))
    np.savez(tmp_path / "unlabelled.npz", x=np.zeros((3, 8, 8, 3), np.uint8))
    cases = [(tmp_path / "wide.npz",
              r"wide\.npz: its labels reach 7, but .*tiny\.pt has 4 classes"),
             (tmp_path / "unlabelled.npz", r"unlabelled\.npz: holds no labels y"),
             (tmp_path / "none.npz", r"none\.npz: no such file")]
    for data, message in cases:
        error = r"^sample_like\.py: error: --labels-from .*" + message
        with pytest.raises(SystemExit, match=error):
            sample_like.main(["--labels-from", str(data), "--ckpt", ckpt, "--num-samples", "9",
                              "--out", str(tmp_path / "x.npz")])
    assert not (tmp_path / "x.npz").exists()
