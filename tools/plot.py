"""
train.py's log.jsonl as a picture, drawn with Pillow: the training loss, the held-out losses (the
raw weights' with all tokens and at stage 1's drop, the EMA's), the learning rate and the FID
against the step, several runs overlaid, each run's stage 2 marked by a vertical line.

    python tools/plot.py results/000-sprint-toy-2                         # -> curves.png
    python tools/plot.py results/000-sprint-toy-2 results/001-dit-toy-2 --out runs.png

Losses and the FID are drawn on a log scale, the learning rate on a linear one; a panel without any
value logged (the FID of a run without --fid-every) says so.
"""
import argparse
import json
import math
import os

from PIL import Image, ImageDraw

WHITE, INK, GREY = (255, 255, 255), (40, 40, 40), (200, 200, 200)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
# panel: (title, [(record key, line width, dotted)], log scale)
PANELS = [("training loss (the log's mean over --log-every steps)", [("loss", 2, False)], True),
          ("held-out loss: raw (thick), raw at stage 1's drop (thin), EMA (dotted)",
           [("eval_loss", 3, False), ("eval_loss_drop", 1, False), ("eval_loss_ema", 2, True)],
           True),
          ("learning rate", [("lr", 2, False)], False),
          ("FID of the EMA's samples (--fid-every)", [("fid", 2, False)], True)]
W, H, MARGIN = 460, 250, 60                    # a panel's plot area, and the room around it


def read_run(folder):
    """A run folder's log.jsonl -> its records (dicts), or an error naming the folder."""
    path = os.path.join(folder, "log.jsonl")
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise SystemExit(f"plot.py: error: {folder}: no readable log.jsonl of train.py ({e})")


def scale(values, log):
    """(low, high) of the values (positive ones on a log scale), padded a little; a linear scale of
    values >= 0 starts at 0 at the lowest."""
    values = [math.log10(v) if log else v for v in values if v > 0 or not log]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low) or 0.5
    return (low - pad if log or low < 0 else max(low - pad, 0.0)), high + pad


def draw_panel(canvas, x0, y0, title, series, log, runs, last_step):
    """One panel at (x0, y0): axes, the y range's ends, each run's series, stage 2's start."""
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([x0, y0, x0 + W, y0 + H], outline=GREY)
    draw.text((x0, y0 - 16), title, fill=INK)
    points = {key: [[(r["step"], r[key]) for r in records if key in r] for records in runs]
              for key, _, _ in series}
    values = [v for lines in points.values() for line in lines for _, v in line]
    if not any(v > 0 or not log for v in values):
        draw.text((x0 + W // 3, y0 + H // 2), "nothing logged", fill=INK)
        return
    low, high = scale(values, log)

    def xy(step, value):
        y = math.log10(value) if log else value
        return x0 + W * step / last_step, y0 + H * (high - y) / (high - low)

    for end, anchor in ((high, y0), (low, y0 + H)):          # the range, in the values' units
        draw.text((x0 - MARGIN + 4, anchor - 6), f"{10 ** end if log else end:.3g}", fill=INK)
    for run, records in enumerate(runs):
        if any(r.get("stage") == 2 for r in records):    # stage 1 ends at its last record
            stage_1 = [r["step"] for r in records if r.get("stage") == 1]
            x = x0 + W * max(stage_1, default=0) / last_step      # 0: a run of stage 2 alone
            draw.line([x, y0, x, y0 + H], fill=GREY, width=1)
        for key, width, dotted in series:
            line = [xy(s, v) for s, v in points[key][run] if v > 0 or not log]
            colour = COLOURS[run % len(COLOURS)]
            if len(line) > 1 and not dotted:
                draw.line(line, fill=colour, width=width)
            else:                                         # dots (also a single value)
                for px, py in line:
                    draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)


def plot(folders, out):
    """Every panel for the runs in `folders` -> out (a PNG)."""
    runs = [read_run(folder) for folder in folders]
    last_step = max([r["step"] for records in runs for r in records if "step" in r] + [1])
    width, height = 2 * (W + MARGIN + 20), 2 * (H + 70) + 30 + 16 * len(runs)
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    for k, (title, series, log) in enumerate(PANELS):
        x0 = MARGIN + (k % 2) * (W + MARGIN + 20)
        y0 = 30 + (k // 2) * (H + 70)
        draw_panel(canvas, x0, y0, title, series, log, runs, last_step)
        draw.text((x0 + W - 150, y0 + H + 6), f"step (0 to {last_step}); grey: stage 2",
                  fill=INK)
    for run, folder in enumerate(folders):                    # the legend: a run a line
        y = 2 * (H + 70) + 20 + 16 * run
        draw.line([MARGIN, y + 6, MARGIN + 30, y + 6], fill=COLOURS[run % len(COLOURS)], width=3)
        draw.text((MARGIN + 40, y), os.path.basename(os.path.normpath(folder)), fill=INK)
    canvas.save(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("runs", nargs="+", metavar="RUN", help="train.py's run folders")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default %(default)s)")
    args = p.parse_args(argv)
    print(f"wrote {plot(args.runs, args.out)}")


if __name__ == "__main__":
    main()
