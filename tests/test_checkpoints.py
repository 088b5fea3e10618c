"""Checkpoint files as a specification (sample.py reads them, train.py --init and --resume too):
official SPRINT files load under our names, in any precision; our checkpoints carry their config
and prefer the EMA weights; a file that does not fit says why in one message."""
import json
import struct
from pathlib import Path

import pytest
import torch

from sample import create_model, load_model, load_weights, read_safetensors
from sprint import SPRINT, ModelConfig
from tiny import randomize, tiny_model
from train import init_from


def write_safetensors(path, tensors, dtype="BF16"):
    """A minimal safetensors writer: header length, JSON header, raw little-endian data."""
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    header = {}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        raw = t.to(torch_dtype).contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    meta = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(meta)) + meta + b"".join(blobs))


#################################################################################
#                    Official files, our files, the EMA weights                 #
#################################################################################

@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_safetensors_half_precision(tmp_path, dtype):
    model = randomize(tiny_model())
    # DDP's and torch.compile's wrapper prefixes are stripped
    sd = {("module._orig_mod." + k): v for k, v in model.state_dict().items()}
    write_safetensors(tmp_path / "w.safetensors", sd, dtype)
    read = read_safetensors(tmp_path / "w.safetensors")
    expected = {"F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    assert read["module._orig_mod.fuse.weight"].dtype == expected
    fresh = load_weights(tiny_model(), tmp_path / "w.safetensors")
    # rounding of weights of size <= 0.4: half of bf16's 2^-8 or float16's 2^-11 relative step
    tol = 2e-3 if dtype == "BF16" else 2e-4
    assert torch.allclose(fresh.fuse.weight, model.fuse.weight, atol=tol)


def test_official_names_are_mapped_to_ours(tmp_path):
    model = randomize(tiny_model())
    official = {}
    for name, tensor in model.state_dict().items():
        for ours, theirs in (("encoder.", "encoder_blocks."), ("middle.", "middle_blocks."),
                             ("decoder.", "decoder_blocks."), ("fuse.", "renoise_linear.")):
            name = name.replace(ours, theirs)
        official[name] = tensor
    write_safetensors(tmp_path / "official.safetensors", official, "F32")
    loaded = load_weights(tiny_model(), tmp_path / "official.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values()))


def test_our_checkpoint_roundtrip_prefers_ema(tmp_path):
    model = randomize(tiny_model(), 1)
    ema = randomize(tiny_model(), 2)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "config": vars(model.cfg)}
    torch.save(ckpt, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt")
    assert torch.equal(loaded.fuse.weight, ema.fuse.weight)
    assert torch.equal(load_model(tmp_path / "c.pt", ema=False).fuse.weight, model.fuse.weight)


#################################################################################
#                  Files that do not fit: one message, naming why               #
#################################################################################

def test_a_file_without_a_config_is_checked_key_by_key(tmp_path):
    big = tiny_model(hidden_size=64)
    torch.save({"model": big.state_dict()}, tmp_path / "big.pt")
    small = tiny_model().state_dict()
    # every tensor whose size follows the width differs: all but the mask token's buffer count
    differ = sum(big.state_dict()[k].shape != small[k].shape for k in small)
    with pytest.raises(ValueError, match=r"shape mismatch: decoder.0.adaLN_modulation.1.bias: "
                                         rf"file \(384,\) vs model \(192,\).* \({differ} in all\)"):
        load_weights(tiny_model(), tmp_path / "big.pt")
    torch.save({"model": tiny_model("dit").state_dict()}, tmp_path / "dit.pt")
    with pytest.raises(ValueError, match=r"missing: decoder\.0.*\n  unexpected: blocks\.0"):
        load_weights(tiny_model(), tmp_path / "dit.pt")


def test_a_file_with_a_config_says_which_model_or_size_it_holds(tmp_path):
    dit = tiny_model("dit")
    torch.save({"model": dit.state_dict(), "config": vars(dit.cfg)}, tmp_path / "dit.pt")
    message = r"^--init .*dit\.pt holds a dit-B model, not a sprint one: use --model dit$"
    with pytest.raises(ValueError, match=message):
        init_from(tiny_model(), str(tmp_path / "dit.pt"))
    wide = tiny_model(hidden_size=64)
    torch.save({"model": wide.state_dict(), "config": vars(wide.cfg)}, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"^--init .*wide\.pt does not fit this sprint-B model "
                                         r"\(file vs model: hidden_size 64 vs 32\)"):
        init_from(tiny_model(), str(tmp_path / "wide.pt"))


def test_not_a_checkpoint_and_no_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a PyTorch checkpoint"):
        load_weights(tiny_model(), tmp_path / "notes.txt")
    write_safetensors(tmp_path / "w.safetensors", tiny_model().state_dict(), "F32")
    with pytest.raises(ValueError, match="carries no model config"):
        load_model(tmp_path / "w.safetensors")
    assert isinstance(load_model(tmp_path / "w.safetensors", cfg=tiny_model().cfg), SPRINT)


def test_a_truncated_checkpoint_is_one_message_naming_the_file(tmp_path):
    torch.save({"model": tiny_model().state_dict()}, tmp_path / "whole.pt")
    write_safetensors(tmp_path / "whole.safetensors", tiny_model().state_dict(), "F32")
    for suffix in (".pt", ".safetensors"):
        data = (tmp_path / f"whole{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
        message = rf"cut{suffix}: not a readable checkpoint \(truncated\?\)$"
        with pytest.raises(ValueError, match=message):
            load_weights(tiny_model(), tmp_path / f"cut{suffix}")


def test_an_unknown_model_name_is_refused_where_the_model_is_built():
    with pytest.raises(ValueError, match="--model 'unet': choose dit, sprint, sparsedit"):
        create_model(ModelConfig(model="unet"))

