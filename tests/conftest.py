"""Fixtures shared by the test files, and the import path: any test file runs alone
(pytest tests/test_X.py)."""
import sys
from pathlib import Path

import pytest
import torch

# the repository root: sprint, train, ...
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the specification of the methods and of their scripts runs first, the command lines after it,
# the experiments' own tests last
ORDER = ("test_sprint", "test_sparsedit", "test_dit", "test_train", "test_sample", "test_fid",
         "test_data")


def pytest_collection_modifyitems(items):
    """Run the files in ORDER first, each whole and in its own order, then the others."""
    here = Path(__file__).parent

    def rank(item):
        if item.path.stem in ORDER:
            return ORDER.index(item.path.stem)
        return len(ORDER) + (item.path.parent != here)
    items.sort(key=rank)


def pytest_report_header():
    """Which fixtures tiny.fixture takes from $CONFORMANCE_FIXTURES rather than tests/fixtures."""
    import os

    import tiny

    folder = os.environ.get("CONFORMANCE_FIXTURES")
    if folder:
        ours = sorted((Path(__file__).parent / "fixtures").iterdir())
        names = [p.name for p in ours if tiny.fixture(p.name) != p]
        return f"fixtures from {folder}: {', '.join(names) or 'none (all from tests/fixtures)'}"


@pytest.fixture(scope="session", autouse=True)
def toy_data(tmp_path_factory):
    """The embedded data's first 400 images as an .npz (360 to train on, 40 held out), written once
    a session: tiny.run's training runs read it rather than draw 4,000 images each, and evaluate on
    40 held-out images rather than 256 (the embedded data itself: test_data.py)."""
    import numpy as np

    import tiny
    import train

    x, y = train.embedded_dataset(16, 400)
    tiny.TOY_DATA = str(tmp_path_factory.mktemp("data") / "toy.npz")
    np.savez(tiny.TOY_DATA, x=x, y=y)
    return tiny.TOY_DATA


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints of a tiny SPRINT and a tiny DiT with random weights, in train.py's layout."""
    from tiny import sampling_model, save_ckpt

    d = tmp_path_factory.mktemp("ckpts")
    return {name: save_ckpt(d / f"{name}.pt", sampling_model(name)) for name in ("sprint", "dit")}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy shared CPU extra threads spin:
    use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
