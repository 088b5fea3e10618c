"""
README.md's figures, drawn from the code itself with Pillow, so that they stay true when it changes:

    python tools/figures.py                 # all five, the samples from the newest SPRINT run
    python tools/figures.py --ckpt results/000-sprint-toy-2/checkpoints/0002500.pt

assets/sprint_tokens.png     the tokens SPRINT's middle blocks see under 75% drop (sprint.
                             sample_ids_keep), structured and random, on a real image's token grid
assets/sparsedit_grid.png    SparseDiT's sparse grid along the sampling trajectory (sparsedit.
                             density_schedule) and the pooled grid at three noise levels
                             (sparsedit.pooled_grid)
assets/pdg_cfg.png           the toy data's ten classes, then the walkthrough model's samples of the
                             same seeds with path-drop guidance and with CFG (sample.sample, SDE
                             250 steps, scale 4)
assets/training_grid.png     the walkthrough run's last samples/STEP.png (train.py --sample-every:
                             its EMA, Euler 50 steps), enlarged, its rows and classes named
assets/schedules.png         the training's schedules: the density of t that train.draw draws
                             (logit-normal), SPRINT's recipe's learning rate and EMA decay around
                             stage 2's start (train.stage_at)

The image is a Noto emoji (experiments/miniature/emoji_google_32.npz, Apache-2.0) at 32 px: with
patch 2 its token grid is 16 x 16, the grid of SPRINT's and SparseDiT's 256 px ImageNet models.
"""
import argparse
import glob
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import sample                                                                    # noqa: E402
import plot                                                                      # noqa: E402
import train                                                                     # noqa: E402
from sparsedit import DENSITY, density_schedule, pooled_grid                     # noqa: E402
from sprint import sample_ids_keep                                               # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMOJI = os.path.join(ROOT, "experiments", "miniature", "emoji_google_32.npz")
GRID, ZOOM = 16, 12                         # tokens a side (32 px, patch 2); screen pixels a token
WHITE, INK, GREY = (255, 255, 255), (40, 40, 40), (200, 200, 200)


def emoji(index=1234):
    """One 32 x 32 emoji, uint8 (32, 32, 3)."""
    with np.load(EMOJI) as f:
        return f["x"][index]


def enlarged(image, size=GRID * ZOOM):
    """uint8 (H, W, 3) -> a Pillow image of size x size, nearest (the pixels stay visible)."""
    return Image.fromarray(image).resize((size, size), Image.NEAREST)


def label(canvas, xy, text):
    ImageDraw.Draw(canvas).text(xy, text, fill=INK)


def tokens_figure(path):
    """The 16 x 16 token grid of an image; dropped tokens faded, kept ones as they are."""
    image = emoji()
    torch.manual_seed(0)
    panels = [("all 256 tokens (the encoder, the decoder)", np.arange(GRID * GRID))]
    for kind in ("structured", "random"):
        kept = sample_ids_keep(1, GRID, 0.75, kind)[0].numpy()
        panels.append((f"75% drop, {kind}: 64 kept", kept))
    side = GRID * ZOOM
    canvas = Image.new("RGB", (3 * side + 4 * 20, side + 50), WHITE)
    for k, (title, kept) in enumerate(panels):
        keep = np.zeros(GRID * GRID, bool)
        keep[kept] = True
        mask = np.repeat(np.repeat(keep.reshape(GRID, GRID), 2, 0), 2, 1)[..., None]   # (32, 32)
        shown = np.where(mask, image, (0.25 * image + 0.75 * 255).astype(np.uint8))
        x0 = 20 + k * (side + 20)
        canvas.paste(enlarged(shown), (x0, 35))
        draw = ImageDraw.Draw(canvas)
        step = 2 if "structured" in title else 1        # the 2 x 2 groups it keeps one token of
        for i in range(0, GRID + 1, step):
            draw.line([(x0 + i * ZOOM, 35), (x0 + i * ZOOM, 35 + side)], fill=GREY)
            draw.line([(x0, 35 + i * ZOOM), (x0 + side, 35 + i * ZOOM)], fill=GREY)
        label(canvas, (x0, 12), title)
    canvas.save(path)


def density_figure(path):
    """The sparse grid side over the noise level (sampling runs from noise, 1, to the data, 0), and
    the image's tokens pooled at three levels: each shows the mean of the cell it reads."""
    image = emoji().astype(np.float32)
    side = GRID * ZOOM
    canvas = Image.new("RGB", (side + 3 * (side + 20) + 60, side + 80), WHITE)
    draw = ImageDraw.Draw(canvas)
    # the schedule: side against noise level, axes in screen pixels
    x0, y0, width, height = 40, 35, side, side
    level = torch.linspace(0, 1, 201)
    sides = density_schedule(level, *DENSITY).numpy()
    lo, hi = DENSITY[0] - 1, DENSITY[1] + 1
    points = [(x0 + width * (1 - float(t)), y0 + height * (hi - s) / (hi - lo))
              for t, s in zip(level, sides)]
    draw.rectangle([x0, y0, x0 + width, y0 + height], outline=GREY)
    draw.line(points, fill=INK, width=2)
    for s in range(DENSITY[0], DENSITY[1] + 1):
        draw.text((x0 - 18, y0 + height * (hi - s) / (hi - lo) - 6), str(s), fill=INK)
    for t in (1, 0.75, 0.5, 0.25, 0):
        draw.line([(x0 + width * (1 - t), y0 + height), (x0 + width * (1 - t), y0 + height + 4)],
                  fill=INK)
        draw.text((x0 + width * (1 - t) - 8, y0 + height + 6), f"{t:g}", fill=INK)
    draw.text((x0, y0 + height + 22), "noise level t (sampling runs this way ->)", fill=INK)
    draw.text((x0, 12), "side s of the sparse grid, by t", fill=INK)
    # the pooled image at three noise levels, cells outlined, centres (their RoPE positions) dotted
    for k, t in enumerate((1.0, 0.5, 0.0)):
        s = int(density_schedule(torch.tensor([t]), *DENSITY))
        pool, centres, up = pooled_grid(GRID, s)
        tokens = image.reshape(GRID, 2, GRID, 2, 3).mean((1, 3)).reshape(GRID * GRID, 3)
        pooled = (pool.numpy() @ tokens)[up.numpy()]           # each token shows its cell's mean
        px = x0 + width + 40 + k * (side + 20)
        canvas.paste(enlarged(pooled.reshape(GRID, GRID, 3).round().astype(np.uint8)), (px, y0))
        starts = sorted({int(c) for c in torch.nonzero(torch.diff(up[:GRID]))} | {-1})
        for b in [c + 1 for c in starts] + [GRID]:                     # cell borders, in tokens
            draw.line([(px + b * ZOOM, y0), (px + b * ZOOM, y0 + side)], fill=GREY)
            draw.line([(px, y0 + b * ZOOM), (px + side, y0 + b * ZOOM)], fill=GREY)
        for r, c in centres.tolist():
            cx, cy = px + (c + 0.5) * ZOOM, y0 + (r + 0.5) * ZOOM
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=INK)
        draw.text((px, 12), f"t = {t:g}: {s} x {s} sparse tokens", fill=INK)
    canvas.save(path)


SHAPES = ("disc", "square", "diamond", "ring", "plus", "cross", "triangle", "rows", "columns",
          "checks")                                    # train.embedded_dataset's ten classes


def samples_figure(path, ckpt, steps=250, scale=4.0):
    """Training images of the toy data's ten classes, then samples of the same seeds (sample i:
    seed i) with PDG and with CFG."""
    model = sample.load_model(ckpt)
    shape = (model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
    images, labels = train.embedded_dataset(shape[-1])
    rows = [("data", np.stack([images[labels == c][0] for c in range(10)]))]
    for pdg in (True, False):
        z, y, gens = sample.sample_inputs(range(10), 0, list(range(10)), 10, shape, "cpu")
        x = sample.sample(model, z, y, "sde", steps, gens, cfg_scale=scale, pdg=pdg)
        rows.append((f"{'PDG' if pdg else 'CFG'} {scale:g}", sample.to_uint8(x, "flow")))
    size = 4 * shape[-1]
    canvas = Image.new("RGB", (70 + 10 * (size + 4), 20 + 3 * (size + 4)), WHITE)
    for c, name in enumerate(SHAPES):
        label(canvas, (70 + c * (size + 4), 4), name)
    for r, (name, row) in enumerate(rows):
        label(canvas, (8, 20 + r * (size + 4) + size // 2 - 6), name)
        for c, img in enumerate(row):
            canvas.paste(enlarged(img, size), (70 + c * (size + 4), 20 + r * (size + 4)))
    canvas.save(path)


def training_grid_figure(path, ckpt):
    """The newest samples/STEP.png of the run that `ckpt` belongs to, enlarged, rows and columns
    named (train.py writes a row each unguided, with CFG 4 and with PDG 4)."""
    run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    grid = np.asarray(Image.open(max(glob.glob(os.path.join(run, "samples", "*.png")))))
    cell = (grid.shape[1] - 2) // 10                      # 10 images a row, 2-pixel borders
    rows = [grid[2 + r * cell: r * cell + cell, 2: 2 + 10 * cell] for r in range(3)]
    size = 4 * (cell - 2)
    canvas = Image.new("RGB", (90 + 10 * (size + 4), 20 + 3 * (size + 4)), WHITE)
    for c, name in enumerate(SHAPES):
        label(canvas, (90 + c * (size + 4), 4), name)
    for r, name in enumerate(["unguided", "CFG 4", "PDG 4"]):
        label(canvas, (8, 20 + r * (size + 4) + size // 2 - 6), name)
        for c in range(10):
            image = rows[r][:, c * cell: c * cell + cell - 2]
            canvas.paste(enlarged(image, size), (90 + c * (size + 4), 20 + r * (size + 4)))
    canvas.save(path)


def schedules_figure(path):
    """Three panels drawn as tools/plot.py draws a log: the density of train.draw's t (a histogram
    of 100,000 draws), and the learning rate and EMA decay of SPRINT's recipe (chapter 4) by step
    around stage 2's start: the last 10,000 steps of stage 1, the first 20,000 of stage 2."""
    args = train.parser().parse_args(
        "--model sprint --drop 0.75 --lr 1e-4 --ema-decay 0.9999 --steps 10000 --finetune-steps "
        "20000 --ft-lr 2e-4 --ft-warmup 5000 --ft-ema-decay 0.9999".split())
    cfg = train.new_model(args, 3, 16, 10).cfg
    torch.manual_seed(0)
    stage = train.stage_at(args, 0, True)
    t = train.draw(torch.zeros(100_000, dtype=torch.long), (1,), 100_000, slice(None), stage, cfg).t
    density = torch.histc(t, bins=50, min=0, max=1) / len(t) * 50
    steps = range(0, 30001, 50)
    stages = [train.stage_at(args, s, True) for s in steps]
    runs = {"p": [[{"step": i + 0.5, "p": float(d)} for i, d in enumerate(density)]],
            **{k: [[{"step": s, k: getattr(st, k), "stage": 1 + (s >= args.steps)}
                    for s, st in zip(steps, stages)]] for k in ("lr", "ema_decay")}}
    panels = [("density of t = sigmoid(n), n ~ N(0, 1), over t from 0 to 1", "p", 50),
              ("learning rate: the last 10 K steps of stage 1, 20 K of stage 2", "lr", 30000),
              ("EMA decay, the same steps (grey: stage 2 begins)", "ema_decay", 30000)]
    canvas = Image.new("RGB", (3 * (plot.W + plot.MARGIN + 20), plot.H + 60), WHITE)
    for k, (title, key, last) in enumerate(panels):
        plot.draw_panel(canvas, plot.MARGIN + k * (plot.W + plot.MARGIN + 20), 30, title,
                        [(key, 2, False)], False, runs[key], last)
    canvas.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--ckpt", help="the SPRINT run to sample (default: the newest in results/)")
    p.add_argument("--out", default=os.path.join(ROOT, "assets"), help="the figures' folder")
    args = p.parse_args(argv)
    ckpt = args.ckpt or max(glob.glob("results/*-sprint-*/checkpoints/*.pt"), default=None)
    if ckpt is None:
        raise SystemExit("figures.py: error: no SPRINT checkpoint in results/: run python train.py "
                         "--model sprint --drop 0.75 first, or give --ckpt")
    os.makedirs(args.out, exist_ok=True)
    tokens_figure(os.path.join(args.out, "sprint_tokens.png"))
    density_figure(os.path.join(args.out, "sparsedit_grid.png"))
    samples_figure(os.path.join(args.out, "pdg_cfg.png"), ckpt)
    training_grid_figure(os.path.join(args.out, "training_grid.png"), ckpt)
    schedules_figure(os.path.join(args.out, "schedules.png"))
    print(f"wrote sprint_tokens.png, sparsedit_grid.png, pdg_cfg.png, training_grid.png ({ckpt}), "
          f"schedules.png to {args.out}")


if __name__ == "__main__":
    main()
