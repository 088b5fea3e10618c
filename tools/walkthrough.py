"""A batch followed through one forward of the toy SPRINT and one of the toy SparseDiT: every line
of the forward that makes a tensor, with the tensor's name and shape, nested calls indented
(README's chapters show this output; tests/test_readme.py checks that they show what it prints).

    python tools/walkthrough.py

The models are train.py's toy ones (16x16x3 images, patch 2: 64 tokens) with random weights, a
batch of 32: SPRINT in training (75% structured token drop, 10% path drop) and in PDG's null pass
(the middle skipped); SparseDiT at a noisy t (its smallest grid) and a clean one (its largest).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train                                                              # noqa: E402
from sprint import sample_ids_keep                                        # noqa: E402

# the functions whose lines are printed (their callees are shown only through what they return)
FOLLOWED = {"Backbone.embed", "Backbone.unembed", "SPRINT.forward", "SPRINT.deep_path",
            "SparseDiT.forward", "SparseDiT.sparse_grid", "SDTM.forward"}


def shape(value):
    """A tensor's shape as (32, 64, 96), a tuple's shapes, a NamedTuple's by field; None for a value
    that holds no tensor."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, tuple) and any(shape(v) for v in value):
        names = getattr(value, "_fields", [""] * len(value))
        parts = [f"{n} {shape(v)}".strip() for n, v in zip(names, value)]
        return f"{type(value).__name__ if names[0] else ''}({', '.join(parts)})"
    return None


def follow(run):
    """Run `run()` under a line tracer -> rows (depth, file, line number, [(name, shape)]) for each
    executed line of a FOLLOWED function that bound a new tensor or returned one, each row followed
    by the rows of the FOLLOWED calls its line made."""
    stack = []          # per FOLLOWED frame running: its line, tensors before it, rows, calls' rows
    top = []            # the outermost call's rows: (file, line, [(name, shape)], the calls' rows)

    def finish(f, frame, extra=()):
        """Add the row of the line that just ran in `frame` (f: its stack entry)."""
        tensors = {k: v for k, v in frame.f_locals.items() if shape(v)}
        new = [(k, shape(v)) for k, v in tensors.items() if f["before"].get(k) is not v]
        new += extra
        if f["line"] is not None and new:
            f["rows"].append((frame.f_code.co_filename, f["line"], new, f["calls"]))
        else:                                   # a line that made nothing: its calls' rows stay
            f["rows"].extend(f["calls"])
        f.update(line=frame.f_lineno, before=tensors, calls=[])

    def local(frame, event, arg):
        if event == "line":
            finish(stack[-1], frame)
        elif event == "return":
            finish(stack[-1], frame, [("returns", shape(arg))] if shape(arg) else [])
            rows = stack.pop()["rows"]
            (stack[-1]["calls"] if stack else top).extend(rows)
        return local

    def call(frame, event, arg):
        if frame.f_code.co_qualname not in FOLLOWED:
            return None
        stack.append({"line": None, "before": {}, "rows": [], "calls": []})
        return local

    sys.settrace(call)
    try:
        run()
    finally:
        sys.settrace(None)

    def flat(rows, depth):
        for file, line, new, calls in rows:
            yield depth, file, line, new
            yield from flat(calls, depth + 1)
    return list(flat(top, 1))


def show(title, inputs, rows):
    """Print the inputs, then each row's line of code and what it made; a loop's repeated line
    once, with its count."""
    print(f"== {title}")
    print("inputs: " + ", ".join(f"{k} {shape(v)}" for k, v in inputs.items()))
    lines = [(d, Path(f).read_text().splitlines()[n - 1].split("  #")[0].strip(), new)
             for d, f, n, new in rows]
    i = 0
    while i < len(lines):
        repeats = 1
        while i + repeats < len(lines) and lines[i + repeats] == lines[i]:
            repeats += 1
        d, code, new = lines[i]
        code = "    " * (d - 1) + code + (f"   (x{repeats})" if repeats > 1 else "")
        made = "# " + ", ".join(f"{name} {s}" for name, s in new)
        line = f"{code:<46}  {made}"
        print(line if len(line) <= 100 else f"{code}\n{' ' * (4 * d)}{made}")
        i += repeats
    print()


def toy(*flags):
    """train.py's toy model for these flags (16x16x3 images, 10 classes), every weight drawn (none
    left at its zero initialisation, which would make every block the identity)."""
    net = train.new_model(train.parser().parse_args(flags), 3, 16, 10).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return net


def main():
    torch.manual_seed(0)
    B = 32
    x = torch.randn(B, 3, 16, 16)
    t = torch.rand(B)
    y = torch.randint(0, 10, (B,))
    net = toy("--model", "sprint")
    ids_keep = sample_ids_keep(B, net.cfg.grid, 0.75)                     # (B, 16) of 64
    path_drop = torch.rand(B) < 0.1
    null = torch.full_like(y, net.cfg.num_classes)
    with torch.no_grad():
        show("SPRINT in training: 75% token drop, 10% path drop",
             {"x": x, "t": t, "y": y, "ids_keep": ids_keep, "path_drop": path_drop},
             follow(lambda: net(x, t, y, ids_keep=ids_keep, path_drop=path_drop)))
        show("SPRINT in PDG's null pass: the null label, the middle skipped",
             {"x": x, "t": t, "y": null}, follow(lambda: net(x, t, null, skip_middle=True)))
        # the toy depth with two sparse blocks in its SDTM: 1 Poolingformer, 1 SDTM of 2, 1 on top
        net = toy("--model", "sparsedit", "--depths", "1", "5", "1", "--layout", "1,1,2,1")
        for level in (0.9, 0.1):
            side = net.sampling_kwargs(level)["side"]
            tt = torch.full((B,), level)
            show(f"SparseDiT sampling at t = {level}: a {side}x{side} sparse grid",
                 {"x": x, "t": tt, "y": y}, follow(lambda: net(x, tt, y, side=side)))


if __name__ == "__main__":
    main()
