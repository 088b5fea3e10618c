"""README.md as a specification of itself: every command it prints parses with today's parsers,
every function, class and attribute it names exists where it says, and every number the code
computes itself (parameter counts, FLOPs, sampling costs, sizes) is the number it prints."""
import pydoc
import textwrap
import re
import shlex
import sys

import pytest
import torch

import fid
import sample
import sparsedit
import sprint
import train
from tiny import ROOT, tool

README = (ROOT / "README.md").read_text()
MODULES = {"sprint": sprint, "sparsedit": sparsedit, "train": train, "sample": sample, "fid": fid}


class Parsed(Exception):
    """Raised where a script, its flags parsed, would begin its work."""


def stop(*args, **kwargs):
    raise Parsed


def commands():
    """Every command of a script in README's bash blocks (continuation lines joined, && split; not
    pytest's) -> [argv]."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                if any(word.endswith(".py") for word in words) and "pytest" not in words:
                    found.append(words)
    return found


def test_every_command_readme_prints_parses_with_todays_flags(monkeypatch):
    monkeypatch.setattr(fid, "statistics", stop)
    tools = {name: tool(name) for name in ("encode_latents", "decode_latents", "benchmark")}
    monkeypatch.setattr(tools["encode_latents"], "encode", stop)
    monkeypatch.setattr(tools["decode_latents"], "decode", stop)
    monkeypatch.setattr(tools["benchmark"], "benchmark_train", stop)
    monkeypatch.setattr(tools["benchmark"], "benchmark_sample", stop)
    parse = {"train.py": train.parser().parse_args, "sample.py": sample.parse_args,
             "fid.py": fid.main, **{f"tools/{k}.py": module.main for k, module in tools.items()}}
    for path in (ROOT / "tools" / "conformance").glob("*_*.py"):    # the fixtures' generators
        generator = tool(f"conformance/{path.stem}")
        if hasattr(generator, "OUTPUTS"):
            monkeypatch.setattr(generator.official, "checkout", stop)  # before the official code
            parse[f"tools/conformance/{path.name}"] = lambda argv, main=generator.main: (
                monkeypatch.setattr(sys, "argv", ["generator", *argv]) or main())
    scripts = []
    for words in commands():
        at = next(i for i, word in enumerate(words) if word.endswith(".py"))
        script, argv = words[at], words[at + 1:]
        scripts.append(script)
        try:
            parse[script](argv)
        except Parsed:
            pass
        except SystemExit as e:
            pytest.fail(f"{' '.join(words)}: {e}")
    # the card's two commands, the walkthrough, both papers' recipes, the evaluators, the tools
    assert {"train.py", "sample.py", "fid.py", "tools/encode_latents.py",
            "tools/conformance/dit_official.py"} <= set(scripts)
    assert len(scripts) >= 14


FILES = ("txt", "jsonl", "npy", "npz", "py", "png", "pt", "pth", "safetensors", "md")


def named():
    """The dotted names README gives in backticks, e.g. `train.draw`, `SPRINT.forward` (not the
    files it names, `log.txt`)."""
    names = set(re.findall(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)`", README))
    return sorted(name for name in names if name.rsplit(".", 1)[1] not in FILES)


def defined(name):
    """The object README's `a.b.c` names: a module's attribute or a class's, or None."""
    first, *rest = name.split(".")
    if first == "torch":
        return pydoc.locate(name)
    owners = [MODULES[first]] if first in MODULES else [
        getattr(m, first) for m in MODULES.values() if hasattr(m, first)]
    for obj in owners:
        for part in rest:
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    return None


def test_every_function_and_class_readme_names_exists_where_it_says():
    code = [name for name in named() if name.split(".")[0] in MODULES
            or any(hasattr(m, name.split(".")[0]) for m in MODULES.values())]
    assert len(code) > 25
    assert [name for name in code if defined(name) is None] == []
    # bare names of ours in backticks: functions and classes of the five files
    bare = set(re.findall(r"`([A-Za-z_]\w*)`", README))
    ours = {"PatchEmbed", "rope", "Attention", "Backbone", "ModelConfig", "DiT", "SparseDiT",
            "SDTM", "Poolingformer", "MODELS", "training_flops", "flops"}
    assert ours <= bare
    for name in ours:
        owners = [*MODULES.values(), *sparsedit.MODELS.values()]
        assert any(hasattr(owner, name) for owner in owners), name


def text(number, digits):
    return f"{number:.{digits}f}"


def test_the_numbers_the_code_computes_are_the_ones_readme_prints():
    with torch.device("meta"):
        models = {k: sparsedit.MODELS[k](sprint.ModelConfig(model=k, size="XL", input_size=32))
                  for k in sparsedit.MODELS}
        released = sparsedit.SparseDiT(sprint.ModelConfig(
            model="sparsedit", size="XL", input_size=32, extra={"layout": [1, 4, 3, 3],
                                                               "density": [8, 8]}))
        inception, dinov2 = fid.FIDInceptionV3(), fid.DINOv2()
    dit, spr, sparse = models["dit"], models["sprint"], models["sparsedit"]
    g = 1e9
    printed = [
        f"{spr.num_params() / 1e6:.1f} M parameters",
        f"| DiT-XL/2 | {dit.flops() / g:.1f} | {dit.flops() / 2 / g:.1f} (the DiT paper: 118.6) |",
        " / ".join(text(spr.flops(**kw) / g, 1) for kw in ({}, {"drop": 0.75},
                                                           {"skip_middle": True})),
        " / ".join(text(spr.flops(**kw) / 2 / g, 1) for kw in ({}, {"drop": 0.75},
                                                               {"skip_middle": True})),
        f"{sparse.flops() / g:.1f} / {sparse.training_flops() / g:.1f}",
        f"{sparse.flops() / 2 / g:.1f} (the paper: 68.05) / {sparse.training_flops() / 2 / g:.1f}",
        f"| 6 → 10 along $t$ | {sparse.flops() / 2 / g:.1f} G (the schedule's mean) |",
        f"| 8, fixed | {released.flops() / 2 / g:.1f} G |",             # the released run's layout
        f"attention products that SDPA computes ({2 * 256 * 256 * 1152 / g:.3f} G a dense block",
        f"costs {spr.flops(drop=0.75) / g:.1f} GFLOPs against {spr.flops() / g:.1f}",
        f"{(spr.flops() + spr.flops(skip_middle=True)) / 1e12:.3f} TFLOPs per guided step "
        f"against CFG's {2 * spr.flops() / 1e12:.3f}",
        f"({sum(p.numel() for p in inception.parameters()) / 1e6:.1f} M parameters)",
        f"({sum(p.numel() for p in dinov2.parameters()) / 1e6:.0f} M)",
        # an XL checkpoint: weights, EMA and AdamW's two moments, float32
        f"is {4 * 4 * spr.num_params() / 1e9:.1f} GB",
        # a latent dataset: two views' posterior mean and std, float16, 32 x 32 x 4; at 512 px one
        f"{2 * 2 * 4 * 32 * 32 * 2 // 1024} KiB per image, {1_281_167 * 32 * 1024 / 1e9:.0f} GB",
        f"({2 * 4 * 64 * 64 * 2 // 1024} KiB an image, {1_281_167 * 64 * 1024 / 1e9:.0f} GB)",
    ]
    toy = sparsedit.MODELS["sprint"](sprint.ModelConfig(model="sprint", size="toy", input_size=16,
                                                        in_channels=3, num_classes=10))
    pdg, cfg = (sample.trajectory_flops(toy, "sde", 250, cfg_scale=4.0, pdg=pdg) / 1e12
                for pdg in (True, False))
    printed.append(f"{pdg:.4f} instead of CFG's {cfg:.4f} forward")
    printed.append(f"{toy.num_params() / 1e6:.2f}M parameters")            # the walkthrough's
    with torch.device("meta"):                    # the CPU benchmark's S/2: a step, a guided step
        small = {k: sparsedit.MODELS[k](sprint.ModelConfig(model=k, size="S", input_size=32))
                 for k in ("dit", "sprint")}
    printed.append(f"its FLOPs allow {small['dit'].flops() / small['sprint'].flops(0.75):.1f}×")
    cfg_step, pdg_step = 2 * small["sprint"].flops(), (small["sprint"].flops()
                                                       + small["sprint"].flops(skip_middle=True))
    printed.append(f"their FLOPs allow {cfg_step / pdg_step:.2f}×")
    flowing = " ".join(README.split())                   # README's text, its lines joined
    assert [line for line in printed if line not in flowing] == []


def test_the_first_command_prints_what_readme_shows(tmp_path, capsys, one_thread, monkeypatch):
    """README's excerpt of `python train.py --model sprint --drop 0.75`: its first two lines (the
    run and the held-out loss at step 0) as the same run prints them before its first step."""
    excerpt = re.search(r"```text\n(sprint-toy/2: .*?)\n```", README, re.S).group(1).splitlines()

    def first_step(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train_step", first_step)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--model", "sprint", "--drop", "0.75", "--results-dir",
                    str(tmp_path / "results")])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].replace(str(tmp_path) + "/", "") == excerpt[0]
    assert printed[1] == excerpt[1]


def inside(lines, name):
    """The line numbers of the body of function `name` (`f` or `Class.f`) in a file's lines."""
    *owner, function = name.split(".")
    after = next(i for i, line in enumerate(lines) if line.startswith(f"class {owner[0]}(")
                 ) if owner else 0
    start = next(i for i in range(after, len(lines))
                 if re.match(rf"\s*def {function}\(", lines[i]))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip()
                and len(lines[i]) - len(lines[i].lstrip()) <= indent), len(lines))
    return range(start + 1, end)


def test_every_code_excerpt_is_the_codes_own_lines():
    """Each ```python block opens with `# FILE, NAME` and is lines of function NAME in FILE, in
    order, their indentation relative to the excerpt's first line kept."""
    excerpts = re.findall(r"```python\n# (\S+), (\S+)\n(.*?)```", README, re.S)
    assert len(excerpts) == len(re.findall(r"```python\n", README)) >= 8
    for path, name, code in excerpts:
        lines = (ROOT / path).read_text().splitlines()
        want = textwrap.dedent(code).splitlines()
        body = inside(lines, name)
        assert any(textwrap.dedent("\n".join(lines[i:i + len(want)])).splitlines() == want
                   for i in body if i + len(want) <= body.stop), f"{path}, {name}: not its lines"


def test_the_walkthrough_shows_what_tools_walkthrough_prints(capsys, one_thread):
    """README's ```text blocks that open with `== ` are tools/walkthrough.py's output, `...`
    skipping lines (at the end too)."""
    tool("walkthrough").main()
    printed = "\n" + capsys.readouterr().out
    blocks = re.findall(r"```text\n(== .*?)\n```", README, re.S)
    assert len(blocks) == 4
    for block in blocks:
        at = 0
        for part in block.removesuffix("\n...").split("\n...\n"):
            at = printed.index("\n" + part + "\n", at) + len(part)   # ValueError: not printed
