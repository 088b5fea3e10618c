"""
Models by name, and models from files: the registry, and reading checkpoints (ours, which carry
their config, and the official SPRINT weights, whose parameter names are mapped to ours).

    model = create_model(ModelConfig(model="sprint", size="XL"))          # dit | sprint | sparsedit
    model = load_model("results/000-sprint-B-2/checkpoints/0400000.pt")   # config and EMA weights
    # official names mapped to ours
    load_weights(model, "sprint_xl.safetensors")
    init_from(sparsedit_model, "results/000-dit-B-2/checkpoints/0400000.pt")   # train.py --init

Writing checkpoints, with the whole training state, is a training run's business: runs.py.
"""
import json
import os
import re
import struct

import torch

from sparsedit import SparseDiT
from sprint import DiT, SPRINT, ModelConfig

# The only list of models: train.py's and sample.py's --model choices come from here.
MODELS = {"dit": DiT, "sprint": SPRINT, "sparsedit": SparseDiT}


def create_model(cfg):
    """Build dit / sprint / sparsedit from a ModelConfig or its dict (as stored in checkpoints)."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig(**cfg)
    if cfg.model not in MODELS:
        raise ValueError(f"--model {cfg.model!r}: choose {', '.join(MODELS)}")
    return MODELS[cfg.model](cfg)


#################################################################################
#                 Reading checkpoint files: ours and official ones              #
#################################################################################

OFFICIAL_NAMES = {
    "encoder_blocks.": "encoder.",
    "middle_blocks.": "middle.",
    "decoder_blocks.": "decoder.",
    "renoise_linear.": "fuse.",
}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# the config fields that decide a model's parameters (what two checkpoints must share to be swapped)
# (SparseDiT's layout and density show in its parameter names, which are checked key by key)
ARCHITECTURE = ("model", "hidden_size", "num_heads", "depths", "mlp_ratio", "patch_size",
                "input_size", "in_channels", "num_classes")


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}: 8-byte little-endian header length, JSON header, raw
    data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; supported: "
                                 f"F32, F16, BF16")
            begin, end = info["data_offsets"]
            f.seek(8 + n + begin)
            data = bytearray(f.read(end - begin))
            if len(data) != end - begin:                                # the file ends early
                raise EOFError(name)
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            tensors[name] = torch.frombuffer(data, dtype=dtype).reshape(info["shape"])
    return tensors


def read_checkpoint(path):
    """Our .pt checkpoint as train.py saves it; a .safetensors file or a bare state dict becomes
    {"model": ...}. A file that is cut short or damaged is a ValueError naming it (callers add their
    flag)."""
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":            # torch.save (zip or pickle)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            return ckpt if isinstance(ckpt, dict) and "model" in ckpt else {"model": ckpt}
        if len(head) >= 9 and head[8:9] == b"{":                       # safetensors' JSON header
            return {"model": read_safetensors(path)}
    except (RuntimeError, EOFError, struct.error, UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a readable checkpoint (truncated?)") from None
    raise ValueError(f"{path}: neither a PyTorch checkpoint (.pt) nor a .safetensors file")


def checkpoint_weights(ckpt, ema=True):
    """The EMA (if asked and present) or raw weights of a read checkpoint, named as in our
    models."""
    sd = {}
    for name, tensor in ckpt["ema" if ema and "ema" in ckpt else "model"].items():
        # DDP / torch.compile wrappers
        name = re.sub(r"^(module\.|_orig_mod\.)+", "", name)
        for official, ours in OFFICIAL_NAMES.items():
            name = name.replace(official, ours)
        sd[name] = tensor
    return sd


def architecture_differences(stored, cfg):
    """'field file vs model' for each architecture field in which a checkpoint's stored config (a
    dict) differs from the model's ModelConfig."""
    differ = []
    for key in ARCHITECTURE:
        value = getattr(cfg, key)
        saved = stored.get(key, value)
        if key == "depths":
            saved = tuple(saved)
        if saved != value:
            differ.append(f"{key} {saved} vs {value}")
    return differ


def load_weights(model, path, ema=True, ckpt=None):
    """Load our checkpoints (EMA weights if asked and present) or official SPRINT ones into model,
    checked: by the stored config where the file has one, else key by key."""
    ckpt = ckpt or read_checkpoint(path)
    cfg = model.cfg
    stored = ckpt.get("config")
    if stored:
        differ = architecture_differences(stored, cfg)
        if stored["model"] != cfg.model:
            raise ValueError(f"{path} holds a {stored['model']}-{stored.get('size')} model, not a "
                             f"{cfg.model} one: use --model {stored['model']}")
        if differ:
            raise ValueError(f"{path} does not fit this {cfg.model}-{cfg.size} model (file vs "
                             f"model: {', '.join(differ)}); check --size/--hidden-size/--depths/"
                             f"--patch-size/--image-size")
    sd = checkpoint_weights(ckpt, ema)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        def show(items):
            more = f" ... ({len(items)} in all)" if len(items) > 8 else ""
            return ", ".join(items[:8]) + more
        problems = [f"\n  {name}: {show(items)}"
                    for name, items in (("missing", missing), ("unexpected", unexpected),
                                        ("shape mismatch", mismatched)) if items]
        raise ValueError(f"{path} does not fit this {cfg.model}-{cfg.size} model (check --model/"
                         f"--size/--patch-size/--image-size):" + "".join(problems))
    model.load_state_dict(sd)
    return model


def load_model(path, cfg=None, ema=True, ckpt=None):
    """A model rebuilt from the config our checkpoints carry (or from cfg, for official files),
    weights loaded."""
    ckpt = ckpt or read_checkpoint(path)
    if "config" in ckpt:
        cfg = ckpt["config"]
    elif cfg is None:
        raise ValueError(f"{path} carries no model config: give the architecture (--model, --size, "
                         f"--patch-size, --image-size, --num-classes)")
    return load_weights(create_model(cfg), path, ema, ckpt)


def init_from(model, path, ema=True):
    """train.py --init: a SparseDiT from a dense DiT checkpoint (mapped by SparseDiT.from_dit), else
    this model's own weights (EMA if asked and present). Every error names --init and the file."""
    if not os.path.isfile(path):
        raise ValueError(f"--init {path}: no such file")
    try:
        ckpt = read_checkpoint(path)
        stored = ckpt.get("config", {})
        if not (isinstance(model, SparseDiT) and stored.get("model") == "dit"):
            return load_weights(model, path, ema, ckpt)
        try:
            dense = model.from_dit(ModelConfig(**stored), checkpoint_weights(ckpt, ema))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return load_weights(model, path, ema=False, ckpt={"model": dense})
    except ValueError as e:
        raise ValueError(f"--init {e}") from None
