"""Compare two fixtures key by key: the same keys, shapes and dtypes, equal strings, and the largest
relative difference of each array (max |a - b| / max |b|, b the second file's).

    python tools/conformance/compare.py tests/fixtures/dit_official.npz /tmp/new/dit_official.npz

Reads .npz and .safetensors files; exits 1 when the keys, shapes or dtypes differ or any array
differs by more than --tol (default 1e-5: float32 rounding through a network, as the same fixture
made on two CPUs differs).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sample import read_safetensors                                      # noqa: E402


def load(path):
    """name -> numpy array of an .npz or .safetensors file."""
    if path.suffix == ".safetensors":
        return {k: v.numpy() for k, v in read_safetensors(path).items()}
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def difference(a, b):
    """The largest relative difference of two arrays of one shape (0 for equal strings, inf for
    unequal ones)."""
    if a.dtype.kind in "US" or b.dtype.kind in "US":
        return 0.0 if np.array_equal(a, b) else float("inf")
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    error = np.abs(a - b).max() if b.size else 0.0
    if error == 0:                                          # equal (also all zeros, or empty)
        return 0.0
    scale = np.abs(b).max()
    return float(error / scale) if scale > 0 else float("inf")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--tol", type=float, default=1e-5)
    args = p.parse_args(argv)
    a, b = load(args.a), load(args.b)
    problems = [f"only in {args.a.name}: {k}" for k in sorted(a.keys() - b.keys())]
    problems += [f"only in {args.b.name}: {k}" for k in sorted(b.keys() - a.keys())]
    worst = ("", 0.0)
    for k in sorted(a.keys() & b.keys()):
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
            problems.append(f"{k}: {a[k].dtype}{list(a[k].shape)} vs "
                            f"{b[k].dtype}{list(b[k].shape)}")
            continue
        d = difference(a[k], b[k])
        print(f"{k:40s} {str(a[k].dtype):8s} {str(list(a[k].shape)):18s} {d:.2e}")
        if d > worst[1]:
            worst = (k, d)
        if d > args.tol:
            problems.append(f"{k}: relative difference {d:.2e} > {args.tol:g}")
    print(f"{len(a.keys() & b.keys())} keys in common; largest relative difference "
          f"{worst[1]:.2e}" + (f" ({worst[0]})" if worst[0] else ""))
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
