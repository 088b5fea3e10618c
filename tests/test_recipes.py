"""README's recipes at scale, run as printed on a tiny stand-in: every command of its chapter 4 in
order (encoding ImageNet's latents, SPRINT's two stages at 256 and at 512 px, sampling the released
SPRINT and DiT files and scoring them, SparseDiT's two layouts from DiT-XL-2-256x256.pt, the DiT
paper's model, your own images), in this process, with paths, lengths, batch sizes and sampling
steps made tiny, the XL and B sizes a 32-wide model of depth 4 (SparseDiT's layout fitted to it),
the released files random-weight ones in their released layouts (served by name as torch's
downloader would), and stand-ins for the SD-VAE and for fid.py's networks."""
import glob
import json
import re
import shlex
import types

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import sample
import sprint
import train
from sparsedit import MODELS
from test_checkpoints import official_layout
from tiny import ROOT, randomize, tool, write_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py

README = (ROOT / "README.md").read_text()
# lengths and batch sizes of the stand-in; a 0 (stage 2 alone: --steps 0) stays 0
TINY = {"--steps": "2", "--finetune-steps": "2", "--ckpt-every": "1", "--eval-every": "1",
        "--log-every": "1", "--global-batch-size": "8", "--num-samples": "4",
        "--per-proc-batch-size": "2", "--fid-every": "2", "--fid-samples": "4",
        "--keep-every": "2"}


def recipes():
    """The commands of README's chapter 4, in order, continuation lines joined -> [words]."""
    chapter = README.split("## 4. At scale")[1].split("\n## ")[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", chapter, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if any(word.endswith(".py") for word in words):
                commands.append(words)
    return commands


def stand_in(words, tmp):
    """A command as printed -> (script, argv) on the stand-in: torchrun's one process, tiny lengths,
    the stand-in's paths, no compilation, no DataLoader workers."""
    words = words[next(i for i, word in enumerate(words) if word.endswith(".py")):]
    script, argv, i = words[0], [], 1
    while i < len(words):
        word = words[i]
        if word in TINY and words[i + 1] != "0":
            argv += [word, TINY[word]]
            i += 1                                         # and its value
        elif re.fullmatch(r"results/\d+-.*/checkpoints/\d+\.pt", word):
            run = word.split("/")[1].split("-", 1)[1]      # e.g. sprint-XL-2: its newest run's last
            argv.append(max(glob.glob(str(tmp / f"results/*-{run}/checkpoints/*.pt"))))
        elif word == "--layout":                           # the stand-in's depth of 4
            argv += [word, "1,1,0,0"]
            i += 1
        elif word != "--compile":
            argv.append({"/path/to/imagenet/train": str(tmp / "images"),
                         "/path/to/folder": str(tmp / "images")}.get(word, word))
        i += 1
    if script in ("tools/encode_latents.py", "train.py"):
        argv += ["--num-workers", "0"]
    if script == "sample.py" and "--steps" not in argv:                # the default's 250
        argv += ["--steps", "2"]
    return script, argv


def released_dit(cfg):
    """A random-weight DiT in the released file's layout: a Conv2d patch embedding, the final
    Linear's outputs in (p1, p2, c) order, the position table."""
    sd = randomize(MODELS["dit"](cfg)).state_dict()
    p, C = cfg.patch_size, cfg.in_channels
    sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"].unflatten(1, (C, p, p))
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        sd[key] = sd[key].unflatten(0, (-1, p, p)).movedim(0, 2).flatten(0, 2)
    return sd


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """The machine of the recipes, tiny: sizes, the VAE, the released files, fid's networks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for size in ("XL", "B"):
        monkeypatch.setitem(sprint.SIZES, size, (32, 2, (1, 2, 1)))
    rng = np.random.default_rng(0)
    for c in range(4):                                  # ImageNet: 4 classes of 5 images
        (tmp_path / "images" / f"n{c:08d}").mkdir(parents=True)
        for i in range(5):
            image = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "images" / f"n{c:08d}" / f"{i}.png")
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz",
             arr_0=rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8))

    class VAE(torch.nn.Module):
        """The SD-VAE's shapes: 8x down to 4 channels (a posterior), 8x up to 3."""
        dtype = torch.float32

        def encode(self, x):
            pooled = torch.nn.functional.avg_pool2d(x, 8)                     # (B, 3, h, w)
            mean = torch.cat([pooled, pooled[:, :1]], dim=1)
            posterior = types.SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.1))
            return types.SimpleNamespace(latent_dist=posterior)

        def decode(self, z):
            image = z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)
            return types.SimpleNamespace(sample=torch.tanh(image))
    diffusers = types.ModuleType("diffusers")
    diffusers.AutoencoderKL = types.SimpleNamespace(from_pretrained=lambda *a, **k: VAE())
    monkeypatch.setitem(__import__("sys").modules, "diffusers", diffusers)

    def download(url, dst, *args, **kwargs):            # the released files, by their names
        cfg = dict(size="XL", input_size=32, in_channels=4, num_classes=4)   # the stand-in's
        if url.endswith(".safetensors"):
            model = randomize(MODELS["sprint"](sprint.ModelConfig(model="sprint", **cfg)))
            write_safetensors(dst, official_layout(model), "BF16")
        else:
            torch.save(released_dit(sprint.ModelConfig(model="dit", **cfg, diffusion="ddpm",
                                                       positions="table", qk_norm=False)), dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)

    class Network(torch.nn.Module):
        """fid.py's networks' interface; features: an image's mean colour, in three dimensions
        (Inception's pool3 and spatial features, DINOv2's CLS token)."""
        def __init__(self, url):
            super().__init__()
            self.outputs = 2 if url == fid.INCEPTION_URL else 1

        def features(self, batch):
            colour = torch.from_numpy(batch).float().mean((1, 2)) / 255
            return (colour, colour.flip(1))[:self.outputs]

        def logits(self, pool3):
            return 10 * pool3
    monkeypatch.setattr(fid, "released", lambda network, url, device="cpu": Network(url))
    return tmp_path


def test_readmes_recipes_at_scale_run_as_printed_on_a_tiny_stand_in(stand_ins, capsys):
    run = {"train.py": train.main, "sample.py": sample.main, "fid.py": fid.main,
           "tools/encode_latents.py": tool("encode_latents").main}
    ran = []
    for words in recipes():
        script, argv = stand_in(words, stand_ins)
        run[script](argv)
        ran.append(script)
    assert ran == ["tools/encode_latents.py", "train.py", "train.py", "tools/encode_latents.py",
                   "train.py", "train.py", "sample.py", "fid.py", "sample.py", "fid.py",
                   "tools/encode_latents.py", "train.py", "train.py", "sample.py", "train.py",
                   "train.py", "sample.py"]
    out = capsys.readouterr().out
    scores = [line.split(":")[0] for line in out.splitlines() if re.match(r"\w+: [\d.]+$", line)]
    assert scores == ["FID", "sFID", "IS", "Precision", "Recall", "FDD"] + ["FID", "sFID", "IS",
                                                                           "Precision", "Recall"]
    for npz in ("sprint_pdg.npz", "dit_xl.npz", "sparsedit.npz"):
        with np.load(stand_ins / npz) as f:
            assert f["arr_0"].shape == (4, 256, 256, 3) and f["arr_0"].dtype == np.uint8
    runs = sorted(p.name for p in (stand_ins / "results").iterdir())
    assert runs == ["000-sprint-XL-2", "001-sprint-XL-2", "002-sprint-XL-2", "003-sprint-XL-2",
                    "004-sparsedit-XL-2", "005-sparsedit-XL-2", "006-dit-XL-2", "007-sprint-B-4"]
    dit = torch.load(stand_ins / "results/006-dit-XL-2/checkpoints/0000002.pt", weights_only=True)
    assert {k: dit["config"][k] for k in sprint.DIT_PAPER} == sprint.DIT_PAPER   # from scratch
    assert dit["args"]["flip"] == "step"                                        # DiT's recipe
    stage_2 = torch.load(stand_ins / "results/001-sprint-XL-2/checkpoints/0000002.pt",
                         weights_only=True)
    assert stage_2["args"]["steps"] == 0 and stage_2["config"]["input_size"] == 32
    at_512 = torch.load(stand_ins / "results/003-sprint-XL-2/checkpoints/0000002.pt",
                        weights_only=True)
    assert at_512["config"]["input_size"] == 64 and at_512["args"]["activation_checkpointing"]
    released_layout = torch.load(stand_ins / "results/005-sparsedit-XL-2/checkpoints/0000002.pt",
                                 weights_only=True)
    assert released_layout["config"]["extra"] == {"layout": [1, 1, 0, 0], "density": [8, 8]}
    assert released_layout["args"]["flip"] == "none"                 # features flipped once
    # the first run logged its FID
    assert any("fid" in json.loads(line) for line in open(stand_ins / "results/000-sprint-XL-2/"
                                                            "log.jsonl"))

