"""Tiny models, runs and data that several test files share: train.py runs of a 16-token model on
400 images of the embedded data, checkpoints in train.py's layout, image folders, two-process
launches, and the resident memory of this process."""
import importlib.util
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sample
import sprint
import train
from sparsedit import MODELS

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
# a 16-token model: tiny enough for a CPU test, with a 2x2 structured drop and a sparse path to
# skip; stage 1 alone unless a test asks for stage 2
TINY = ("--hidden-size 32 --num-heads 2 --depths 1 1 1 --patch-size 4 --global-batch-size 8 "
        "--num-workers 0 --log-every 1 --lr 2e-3 --finetune-steps 0").split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}     # subprocesses use one thread (conftest.one_thread)
TOY_DATA = None                                  # an .npz of 400 embedded images (conftest.toy_data)


def fixture(name):
    """tests/fixtures/NAME, or NAME in the folder $CONFORMANCE_FIXTURES where it is there: a fixture
    that a generator in tools/conformance made for another configuration (conftest prints which)."""
    other = Path(os.environ.get("CONFORMANCE_FIXTURES", ROOT / "tests" / "fixtures")) / name
    return other if other.exists() else ROOT / "tests" / "fixtures" / name


#################################################################################
#                              train.py runs                                    #
#################################################################################

def run(tmp_path, *flags):
    """train.main in this process on the tiny model, by default on 400 images of the embedded data
    at 16 px -> the run folder."""
    if "--resume" in flags:                         # a resumed run takes its own flags
        return Path(train.main(list(flags)))
    data = [] if "--data" in flags else ["--data", TOY_DATA]
    args = [*TINY, *data, "--eval-every", "0", *flags]
    return Path(train.main([*args, "--results-dir", str(tmp_path / "results")]))


def records(run_dir):
    """A run's log.jsonl, one dict per line."""
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def assert_same_training_state(a, b):
    """Two checkpoints hold the same step, weights, EMA and optimizer state."""
    a = torch.load(a, weights_only=True)
    b = torch.load(b, weights_only=True)
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for i, state in a["opt"]["state"].items():
        assert all(torch.equal(state[k], b["opt"]["state"][i][k]) for k in state)


def image_folder(root, classes=2, per_class=10, size=(24, 20)):
    """An ImageNet-layout folder of random PNGs (width x height = size) -> root."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(root / f"class{c}")
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def two_ranks(script, *flags, cwd):
    """`script` in 2 gloo processes, with the environment torchrun gives its workers (without
    torchrun's own agent process: one torch import less) -> their return codes and stderr."""
    with socket.socket() as s:                      # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / script), *map(str, flags)], cwd=cwd,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


#################################################################################
#                    Models, and checkpoints to sample from                     #
#################################################################################

def tiny_model(model="sprint", **kw):
    """An 8 x 8 latent, 16-token model with 1/2/1 blocks of width 32 and 10 classes."""
    cfg = dict(model=model, input_size=8, patch_size=2, in_channels=4, hidden_size=32, num_heads=2,
               depths=(1, 2, 1), num_classes=10)
    cfg = sprint.ModelConfig(**{**cfg, **kw})
    return MODELS[cfg.model](cfg)


def randomize(model, seed=0):
    """Random weights everywhere (adaLN-Zero makes a fresh model's blocks inert)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def sampling_model(model="sprint", in_channels=3, seed=0):
    """An 8 x 8, 4-class model with random weights everywhere (adaLN-Zero and the zero final layer
    would output 0)."""
    cfg = sprint.ModelConfig(model=model, input_size=8, patch_size=2, in_channels=in_channels,
                             hidden_size=32, num_heads=2, depths=(1, 1, 1), num_classes=4)
    m = MODELS[model](cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def save_ckpt(path, model, **extra):
    """A checkpoint in train.py's layout -> its path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    ckpt = {"model": sd, "ema": sd, "config": asdict(model.cfg), "args": {}, "step": 1, **extra}
    torch.save(ckpt, path)
    return str(path)


def write_safetensors(path, tensors, dtype="BF16"):
    """A .safetensors file as the released SPRINT files are: header length, JSON header, the raw
    little-endian data."""
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    header = {}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        raw = t.to(torch_dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    meta = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(meta)) + meta + b"".join(blobs))


class Other:
    """An object a pickle may hold, which torch.load(weights_only=True) refuses."""


def damaged_files(tmp_path, released):
    """Files in tmp_path that are no checkpoint -> their names: cut short (a checkpoint of ours and
    the released file `released`, a state dict), random bytes, pickles of other objects,
    safetensors files with a damaged header."""
    torch.save({"model": tiny_model().state_dict()}, tmp_path / "whole.pt")
    write_safetensors(tmp_path / "whole.safetensors", released, "F32")
    files = {}
    for suffix in (".pt", ".safetensors"):
        data = (tmp_path / f"whole{suffix}").read_bytes()
        files[f"cut{suffix}"] = data[: len(data) // 2]
    files["random.pt"] = np.random.default_rng(0).bytes(4096)
    files["list.pt"] = pickled([torch.zeros(2), 3])
    files["object.pt"] = pickled({"model": Other()})
    header = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    files["long_header.safetensors"] = struct.pack("<Q", 10**6) + header + bytes(8)
    files["entry_not_a_mapping.safetensors"] = struct.pack("<Q", 8) + b'{"a": 1}' + bytes(8)
    files["header_a_list.safetensors"] = struct.pack("<Q", 6) + b'[1, 2]' + bytes(8)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


def pickled(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def run_sample(*argv):
    """sample.py's main in this process."""
    return sample.main([str(a) for a in argv])


def npz(path):
    """An .npz's arrays as a dict."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


#################################################################################
#                     Resident memory, for the streaming tests                  #
#################################################################################

def resident_bytes(files=True):
    """This process's resident memory now (Linux: /proc/self/statm); files=False leaves out the
    pages shared with files (the code of torch's kernels, paged in on first use; a memory map)."""
    with open("/proc/self/statm") as f:
        resident, shared = map(int, f.read().split()[1:3])
    return (resident if files else resident - shared) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(fn, files=True):
    """(fn(), the most this process's resident memory grew above its level at the start while fn
    ran), sampled every millisecond by a thread: ru_maxrss would report the test session's own
    earlier peak."""
    base = resident_bytes(files)
    peak = [base]
    done = threading.Event()

    def watch():
        while not done.wait(0.001):
            peak[0] = max(peak[0], resident_bytes(files))
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = fn()
    finally:
        done.set()
        watcher.join()
    return result, max(peak[0], resident_bytes(files)) - base


def tool(name):
    """tools/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
