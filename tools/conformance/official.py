"""What the fixture generators share: a local clone of the official code, checked against the commit
the generator is pinned to and put on the import path, the command line every generator takes, and
the fixture written whole or not at all.

Each generator in this folder names its official repositories and their commits in `PINNED` and the
files it writes in `OUTPUTS` (tests/test_tools.py checks that every file in tests/fixtures has one).
"""
import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def parser(doc, pinned):
    """The generator's command line: a clone of each pinned repository (`--dit PATH`, ...), the
    folder to write to (tests/fixtures by default) and the seed of every random draw."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for repo, commit in pinned.items():
        p.add_argument(f"--{repo.split('/')[1].lower()}", type=Path, required=True, metavar="CLONE",
                       help=f"a clone of github.com/{repo} at commit {commit}")
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures",
                   help="folder to write the fixture to (default: tests/fixtures)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every random draw (default: %(default)s)")
    return p


def checkout(clone, repo, commit):
    """Check that `clone` is `repo` at `commit` and put it first on the import path; exit with the
    command that fixes it otherwise."""
    clone = Path(clone).resolve()
    try:
        head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit(f"{clone}: not a git clone; get one with\n  git clone "
                 f"https://github.com/{repo} {clone} && git -C {clone} checkout {commit}")
    if head != commit:
        sys.exit(f"{clone} is at {head}; this generator is pinned to {repo} at {commit}:\n"
                 f"  git -C {clone} checkout {commit}")
    print(f"official code: {repo} at {commit} ({clone})")
    sys.path.insert(0, str(clone))
    return clone


def checkouts(args, pinned):
    """checkout() of each pinned repository's clone on the command line -> the clones, in order."""
    return [checkout(getattr(args, repo.split("/")[1].lower().replace("-", "_")), repo, commit)
            for repo, commit in pinned.items()]


def module(name, path):
    """Import the file `path` as module `name` (for two official files both called models.py)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def save_npz(path, arrays):
    """Write `arrays` (name -> array, str or JSON-able dict) to `path` atomically and list them."""
    arrays = {k: np.asarray(json.dumps(v) if isinstance(v, dict) else v) for k, v in arrays.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    print(f"wrote {path}: {len(arrays)} arrays, {path.stat().st_size / 1e6:.1f} MB")
