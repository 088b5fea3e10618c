"""
sample.py with labels in a dataset's proportions: the N samples get N labels whose class counts are
DATA's, scaled to N and rounded by largest remainder, in an order shuffled by --seed. The miniature
compares class-conditional samples with real images, so the samples share the real images' class
balance. Every other flag is sample.py's, passed on as given.

    python experiments/miniature/sample_like.py \\
        --labels-from experiments/miniature/emoji_google_32.npz --num-samples 900 \\
        --ckpt results/miniature/seed0/dit/000-dit-S-2/checkpoints/0000450.pt \\
        --sampler euler --steps 8 --cfg-scale 2 --out dit-cfg2.npz

It runs sample.main with `--classes` and the N labels: sample i gets label i (sample.py cycles
--classes, and there are N of them) and, as always, the noise of seed + i whatever its label, so
its images are sample.py's for these labels.
"""
import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

# the repository root, two folders up, for sample.py: the script runs from any folder
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import sample


def read_labels(path):
    """The labels y (N,) of an .npz dataset (train.py's --data), integers >= 0."""
    if not os.path.isfile(path):
        raise ValueError(f"--labels-from {path}: no such file")
    if not zipfile.is_zipfile(path):                          # an .npz is a zip of .npy files
        raise ValueError(f"--labels-from {path}: not an .npz file (with labels y)")
    with np.load(path) as f:
        labels = f["y"] if "y" in f.files else np.zeros(0)
    if not len(labels) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"--labels-from {path}: holds no labels y (integers >= 0)")
    return labels


def labels_like(labels, n, seed):
    """n labels in the proportions of `labels` (class counts rounded by largest remainder), in an
    order shuffled by seed."""
    counts = np.bincount(labels)
    share = counts / counts.sum() * n
    k = np.floor(share).astype(int)
    k[np.argsort(k - share, kind="stable")[: n - k.sum()]] += 1     # largest remainders: one more
    order = np.random.default_rng(seed).permutation(n)
    return np.repeat(np.arange(len(counts)), k)[order].tolist()


def check_classes(labels, data, ckpt):
    """A ValueError if the labels reach past the checkpoint's classes, said in one line (sample.py
    would list all N labels). A checkpoint it cannot read is sample.py's to report."""
    if not ckpt:
        return
    try:
        config = sample.read_checkpoint(ckpt).get("config") or {}
    except (ValueError, OSError):
        return
    if max(labels) >= config.get("num_classes", max(labels) + 1):
        raise ValueError(f"--labels-from {data}: its labels reach {max(labels)}, but {ckpt} has "
                         f"{config['num_classes']} classes")


def parse_args(argv=None):
    """The command line -> (this script's flags, sample.py's: the flags given but --labels-from)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False,
                                epilog="Every other flag is sample.py's (python sample.py --help).")
    p.add_argument("--labels-from", required=True, metavar="DATA",
                   help="an .npz with labels y, such as train.py's --data")
    p.add_argument("--num-samples", type=int, required=True, help="how many samples (and labels)")
    p.add_argument("--seed", type=int, default=0, help="sample.py's --seed; it also shuffles the "
                   "labels (default %(default)s)")
    args, passed = p.parse_known_args(argv)
    if any(flag.split("=")[0] == "--classes" for flag in passed):
        p.error("--classes: the labels come from --labels-from; give one or the other")
    return args, [*passed, "--num-samples", str(args.num_samples), "--seed", str(args.seed)]


def main(argv=None):
    """Sample as sample.py does, with --labels-from's labels as --classes."""
    args, sample_argv = parse_args(argv)
    try:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples {args.num_samples}: must be at least 1")
        labels = labels_like(read_labels(args.labels_from), args.num_samples, args.seed)
        check_classes(labels, args.labels_from, sample.parse_args(sample_argv).ckpt)
    except ValueError as e:
        raise SystemExit(f"sample_like.py: error: {e}")
    return sample.main([*sample_argv, "--classes", *map(str, labels)])


if __name__ == "__main__":
    main()
