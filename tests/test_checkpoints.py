"""Checkpoint files as a specification (sample.py reads them, train.py --init too): the released
SPRINT files load under our names in any precision, their architecture read off their tensors, the
REPA one's projector head set aside in one line; our checkpoints carry their config and prefer the
EMA weights; a file that does not fit, or is cut short, is one message naming it."""
import re

import pytest
import torch

from sample import load_model
from sprint import SIZES, SPRINT
from tiny import damaged_files, randomize, tiny_model, write_safetensors

OFFICIAL = {"encoder.": "encoder_blocks.", "middle.": "middle_blocks.", "decoder.": "decoder_blocks.",
            "fuse.": "renoise_linear."}


def official_layout(model):
    """A model's state dict under the official SPRINT code's names, as its released files hold it."""
    sd = {}
    for name, tensor in model.state_dict().items():
        for ours, theirs in OFFICIAL.items():
            name = name.replace(ours, theirs)
        sd[name] = tensor
    return sd


#################################################################################
#              Released SPRINT files: names, precision, REPA's head             #
#################################################################################

@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_released_safetensors_load_under_our_names_in_any_precision(tmp_path, dtype):
    model = randomize(tiny_model())
    write_safetensors(tmp_path / "w.safetensors", official_layout(model), dtype)
    loaded = load_model(tmp_path / "w.safetensors", input_size=8)
    assert isinstance(loaded, SPRINT) and loaded.cfg.depths == (1, 2, 1)
    assert (loaded.cfg.hidden_size, loaded.cfg.num_heads, loaded.cfg.num_classes) == (32, 2, 10)
    # rounding of weights of size <= 0.4: half of bf16's 2^-8 or float16's 2^-11 relative step
    tol = {"F32": 0, "F16": 2e-4, "BF16": 2e-3}[dtype]
    for (name, ours), theirs in zip(loaded.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=0, msg=name)


def test_the_repa_files_projector_head_is_set_aside_in_one_line(tmp_path, capsys):
    """sprint_XL_REPA_imagenet256 also holds REPA's projector (Linear D -> 2048, SiLU, 2048 ->
    2048, SiLU, 2048 -> 768), used only in training: the file samples as the plain one."""
    model = randomize(tiny_model()).eval()
    plain = official_layout(model)
    head = {"projectors.0.weight": (2048, 32), "projectors.0.bias": (2048,),
            "projectors.2.weight": (2048, 2048), "projectors.2.bias": (2048,),
            "projectors.4.weight": (768, 2048), "projectors.4.bias": (768,)}
    repa = {**plain, **{name: torch.randn(shape) for name, shape in head.items()}}
    write_safetensors(tmp_path / "plain.safetensors", plain, "F32")
    write_safetensors(tmp_path / "repa.safetensors", repa, "F32")
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        outputs = [load_model(tmp_path / f"{name}.safetensors", input_size=8)(x, t, y)
                   for name in ("plain", "repa")]
    assert torch.equal(*outputs)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["ignored projectors.* of the checkpoint: REPA's projector head, for training "
                     "only"]


#################################################################################
#           Our files: the config they carry, EMA first; files that do not fit  #
#################################################################################

def test_our_checkpoint_carries_its_config_and_prefers_ema(tmp_path):
    model = randomize(tiny_model(), 1)
    ema = randomize(tiny_model(), 2)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "config": vars(model.cfg)}
    torch.save(ckpt, tmp_path / "c.pt")
    assert torch.equal(load_model(tmp_path / "c.pt").fuse.weight, ema.fuse.weight)
    assert torch.equal(load_model(tmp_path / "c.pt", ema=False).fuse.weight, model.fuse.weight)


def test_a_file_that_does_not_fit_is_load_state_dicts_report_on_one_line(tmp_path):
    dit = tiny_model("dit")
    torch.save({"model": dit.state_dict(), "config": vars(tiny_model().cfg)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "odd.pt")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'odd.pt'} does not fit this "
                                                      f"sprint model: Error(s) in loading")
    assert "Missing key(s) in state_dict: " in message and '"blocks.0.attn.qkv.weight"' in message
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: not a readable checkpoint"):
        load_model(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: neither train\.py's checkpoint nor a "
                                         r"released SPRINT or DiT file \(no 'x_embedder"):
        load_model(tmp_path / "other.pt")


def test_a_damaged_or_foreign_file_is_one_message_naming_it(tmp_path):
    for name in damaged_files(tmp_path, official_layout(tiny_model())):
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: (not a readable checkpoint "
                                             rf"\(cut short, damaged, or not one: \w+\)|neither "
                                             rf"train\.py's checkpoint nor a released)"):
            load_model(tmp_path / name, input_size=8)


def misshapen(tensor, k):
    """The k-th of three wrong shapes for a tensor: a scalar, flat and one value short, one axis
    more."""
    return [tensor.flatten()[0], tensor.flatten()[:-1], tensor[None]][k % 3]


def test_a_released_file_whose_tensors_do_not_fit_their_names_is_one_message_naming_it(
        tmp_path, monkeypatch):
    """Every tensor of a released SPRINT file and of a released DiT file, each replaced in turn by
    one of three wrong shapes: the architecture read off the tensors or the strict load refuses it
    in one line that names the file (sample.py --ckpt and train.py --init read files this way)."""
    from test_recipes import released_dit
    monkeypatch.setitem(SIZES, "T", (32, 2, (1, 2, 1)))       # a DiT's heads: by its width
    released = {"sprint.safetensors": official_layout(randomize(tiny_model())),
                "dit.pt": released_dit(tiny_model("dit", diffusion="ddpm", positions="table",
                                                  qk_norm=False).cfg)}
    for name, sd in released.items():
        for k, key in enumerate(sd):
            path = tmp_path / f"{k}-{name}"
            bad = {**sd, key: misshapen(sd[key], k)}
            if name.endswith(".pt"):
                torch.save(bad, path)
            else:
                write_safetensors(path, bad, "F32")
            with pytest.raises(ValueError) as e:
                load_model(path, input_size=8)
            message = str(e.value)
            assert message.startswith(str(path)) and "\n" not in message, (key, message)
