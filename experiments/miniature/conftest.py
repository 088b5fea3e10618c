"""The miniature's tests import its scripts (run, sample_like, quality) and the core's (train,
sample), from the repository root (python -m pytest -q) or alone (pytest experiments/miniature)."""
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models and a small classifier gain nothing from a second thread, and on a busy shared
    CPU extra threads spin: use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
