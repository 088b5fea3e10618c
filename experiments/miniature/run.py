"""
The CPU miniature in one command: the main README's comparisons with a measure of sample quality,
over several seeds, into one report with its tables and figures. From the repository root:

    python experiments/miniature/run.py                        # the protocol: 2 seeds, 2 jobs
    python experiments/miniature/run.py --seeds 0 --scale 0.1 --samples 200  # a ~10x shorter pilot
    python experiments/miniature/run.py --out results/mini-64 \\
        --train-flags "--hidden-size 64 --num-heads 2"

It trains quality.py's classifiers on the real images (at 16 and 32 px), then for each seed the
ARMS below (at 16 px: DiT; SPRINT; SPRINT with random drop. At 32 px, SparseDiT's token grid: the
DiT paper's DDPM model, then SparseDiT converted from it and the same DiT, each trained 10% more),
samples them with labels in the data's proportions (sample_like.py), scores the samples, and writes
--out/report.md: the hardware, the wall time, the protocol, the tables (every seed, their mean and
spread, the measure's floor and ceiling), the figures (matplotlib) and every command.

Each job is one command line of train.py, sample_like.py or quality.py: printed, logged to
--out/logs and listed in the report exactly as a user types it, from the repository root, to rerun
that job alone; jobs.py runs them in --jobs persistent workers, one thread each. The jobs of a
group (the two arms of a comparison: DiT beside SPRINT, whose cost is compared in training
seconds) start together, each on its own core. A job whose output exists is skipped, so an
interrupted run continues where it stopped; --out remembers its settings and refuses others.
"""
import argparse
import glob
import json
import os
import shlex
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import torch

# the repository root, two folders up, for train.py and sample.py: the script runs from any folder
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import quality
import sample
import train
from jobs import HERE, QUALITY, SAMPLE_LIKE, Job, run_jobs

#################################################################################
#                                  The protocol                                 #
#################################################################################

IMAGE_SIZE = 16
# what every training run shares (scaled_flags adds --ema-decay, --eval-every): SiT-S's 2/8/2
# blocks narrowed to 128 wide, 4 heads (3.7 M parameters), on 8 x 8 tokens of 16 px images, half
# of them mirrored each step in every arm (as measured), no sample grids
TRAIN = (f"--size S --hidden-size 128 --num-heads 4 --image-size {IMAGE_SIZE} "
         f"--global-batch-size 64 --lr 1e-3 --flip step --sample-every 0")
# --ema-decay, and SPRINT's --ft-ema-decay: a horizon of 100 steps, so that after the shortest
# stage (225 steps) the EMA holds 10% of where it started and after 450 steps 1%
EMA_DECAY = 0.99
EVAL_EVERY = 150           # held-out loss every N steps (and at the end of each stage)
FINETUNE = "--ft-lr 1e-3"  # SPRINT's stage 2 (scaled_flags adds --ft-warmup, --ft-ema-decay)
FT_WARMUP = 10
# (d) SparseDiT's claim at its paper's token grid: 32 px in patches of 2 is 16 x 16 tokens, as
# 256 px is through the SD-VAE, so the sparse grid grows from 6 x 6 to 10 x 10 as the paper's does.
# The DiT paper's own model (--diffusion ddpm: learned variance, sin-cos table), 12 blocks 64 wide
# (0.93 M parameters; SparseDiT's 12-block layout: a Poolingformer, 2 SDTMs, a dense block)
GRID_IMAGE_SIZE = 32
TRAIN_GRID = (f"--size S --hidden-size 64 --num-heads 4 --image-size {GRID_IMAGE_SIZE} "
              f"--global-batch-size 32 --lr 1e-3 --flip step --sample-every 0")
# arm: (its train.py flags, stage-1 steps, fine-tuning steps, the arm it starts from, whether it is
# (d)'s, at 32 px). A SPRINT step at 75% drop costs about half a DiT step here (0.168 vs 0.334
# GFLOPs an image), so 750 + 75 SPRINT steps take about the training seconds of 450 DiT steps.
# (d): the DiT until its held-out loss has flattened, then 10% more steps as SparseDiT (converted
# by --init) and as the DiT itself (the control); the paper fine-tunes for about 6%, but that is
# 400 K steps: sparsedit32-long (held-out loss only) asks whether 50% brings SparseDiT back.
ARMS = {
    "dit": ("--model dit", 450, 0, None, False),
    "sprint": ("--model sprint --drop 0.75", 750, 75, None, False),
    "sprint-random": ("--model sprint --drop 0.75 --mask-type random", 750, 75, None, False),
    "dit32": ("--model dit --diffusion ddpm", 2000, 0, None, True),
    "sparsedit32": ("--model sparsedit", 200, 0, "dit32", True),
    "dit32-control": ("--model dit", 200, 0, "dit32", True),
    "sparsedit32-long": ("--model sparsedit", 1000, 0, "dit32", True),
}
# every sample set: one sampler, the same noise (sampling seed 0); + --steps, --num-samples
SAMPLE = "--sampler euler --seed 0 --per-proc-batch-size 100"
# (d)'s: the DiT paper's sampler (DDPM, its 250 steps respaced to 25) at its FID's guidance, 1.5
GRID_SAMPLE = "--sampler ddpm --seed 0 --per-proc-batch-size 100"
GRID_SAMPLER_STEPS = 25
GRID_SCALE = 1.5
SCALES = (1.5, 2, 3, 4)        # SPRINT's final checkpoint with CFG and with PDG at each
SCALE = 2                      # every other sample set: CFG at this scale
SEEDS = (0, 1)
SAMPLES = 900
# 22 sample sets of 900 images at 16 px: at ~0.007 s per image and model pass on one core, Euler 8
# keeps them to 32 min of one core (every set uses the same sampler, so they compare alike); (d)'s
# 6 sets of DDPM 25 take 44 min
SAMPLER_STEPS = 8
# what --out remembers: a later call may add seeds or change --jobs, not these
SETTINGS = ("data", "samples", "scale", "sampler_steps", "train_flags")
# how the report reads a difference: stated once at its top, applied by `differences`
RULE = ("Two seeds are few, so a difference is called an effect only by this rule. A paired "
        "comparison, on the same checkpoint and noise (c: CFG vs PDG) or of the same run before "
        "and after its fine-tune (b), is read per seed: it is an effect where both seeds agree on "
        "its sign. An unpaired comparison, between different runs (a, d, e), is an effect where "
        "both seeds agree on its sign and, in each seed, it is larger than the seed spread "
        "(largest minus smallest) of either arm.")


def scaled(n, scale, least=1):
    """A training length of the protocol times --scale, rounded, at least `least`."""
    return max(least, round(n * scale))


def lengths(args, arm):
    """(stage-1 steps, fine-tuning steps) of an arm at --scale."""
    _, steps, finetune, _, _ = ARMS[arm]
    return scaled(steps, args.scale), scaled(finetune, args.scale) if finetune else 0


def scaled_flags(args, grid=False):
    """The train.py flags every arm (of (d) if grid) shares and SPRINT's fine-tuning flags, at
    --scale: the evaluation interval and the warm-up scale with it, and so does the EMA's horizon
    1 / (1 - decay), as decay^(1/scale): a short run's EMA forgets its start as a long one's."""
    ema = f"{EMA_DECAY ** (1 / args.scale):.4g}"
    shared = [*(TRAIN_GRID if grid else TRAIN).split(), "--ema-decay", ema,
              "--eval-every", str(scaled(EVAL_EVERY, args.scale))]
    finetune = [*FINETUNE.split(), "--ft-warmup", str(scaled(FT_WARMUP, args.scale, least=0)),
                "--ft-ema-decay", ema]
    return shared, finetune


#################################################################################
#             Jobs: the commands, their inputs and outputs, the groups          #
#################################################################################

def classifier_path(args, size):
    """quality.py's classifier for samples of `size` px (the 16 px one keeps its earlier name)."""
    return os.path.join(args.out, "classifier.pt" if size == IMAGE_SIZE else f"classifier{size}.pt")


def final_checkpoint(args, seed, arm):
    """The glob of an arm's final checkpoint, in a numbered run folder (000-dit-S-2, ...)."""
    step = sum(lengths(args, arm))
    return os.path.join(args.out, f"seed{seed}", arm, "*", "checkpoints", f"{step:07d}.pt")


def run_dir(args, seed, arm):
    """The run folder of an arm's finished training (the newest, if a killed run left another);
    before it has run, the folder train.py makes first in the arm's --results-dir."""
    found = glob.glob(final_checkpoint(args, seed, arm))
    if found:
        return os.path.dirname(os.path.dirname(max(found, key=os.path.getmtime)))
    flags, _ = train.parse_args(train_argv(args, seed, arm))
    return os.path.join(flags.results_dir, f"000-{flags.model}-{flags.size}-{flags.patch_size}")


def checkpoint(args, seed, arm, step=None):
    """An arm's checkpoint at `step` (default: its final one), in its run folder."""
    step = sum(lengths(args, arm)) if step is None else step
    return os.path.join(run_dir(args, seed, arm), "checkpoints", f"{step:07d}.pt")


def train_argv(args, seed, arm):
    """train.py's arguments for one arm and seed; --train-flags come last, so they win."""
    flags, _, _, init, grid = ARMS[arm]
    steps, finetune = lengths(args, arm)
    shared, finetune_flags = scaled_flags(args, grid)
    argv = [*flags.split(), *shared, "--data", args.data, "--steps", str(steps),
            "--finetune-steps", str(finetune)]
    if finetune:
        argv += finetune_flags
    if init:
        argv += ["--init", checkpoint(args, seed, init)]
    results = os.path.join(args.out, f"seed{seed}", arm)
    return argv + ["--seed", str(seed), "--results-dir", results, *args.train_flags]


def sample_name(arm, scale, pdg=False, stage1=False):
    """A sample set's name: ARM[-stage1]-cfgW or ARM-pdgW."""
    return f"{arm}{'-stage1' if stage1 else ''}-{'pdg' if pdg else 'cfg'}{scale:g}"


def samples_path(args, seed, name):
    """Where a sample set of this seed goes; its score goes beside it, as .json."""
    return os.path.join(args.out, f"seed{seed}", "samples", f"{name}.npz")


def sample_argv(args, seed, arm, scale, pdg=False, stage1=False):
    """sample_like.py's arguments: --samples images of one checkpoint, labels in the data's
    proportions, the protocol's sampler and noise, CFG or PDG at this scale."""
    step = lengths(args, arm)[0] if stage1 else None
    name = sample_name(arm, scale, pdg, stage1)
    grid = ARMS[arm][4]
    sampler = [*GRID_SAMPLE.split(), "--steps", str(GRID_SAMPLER_STEPS)] if grid else [
        *SAMPLE.split(), "--steps", str(args.sampler_steps)]
    return ["--ckpt", checkpoint(args, seed, arm, step), "--labels-from", args.data,
            "--num-samples", str(args.samples), *sampler,
            "--cfg-scale", f"{scale:g}", *(["--pdg"] if pdg else []),
            "--out", samples_path(args, seed, name)]


def plan(args):
    """Every job of the protocol, in groups whose jobs start together, in the order they start."""
    classifiers = {grid: Job("classifier" + f"{size}" * grid, QUALITY, lambda size=size: [
        "train", "--data", args.data, "--image-size", str(size),
        "--out", classifier_path(args, size),
        "--epochs", str(scaled(quality.EPOCHS, args.scale))], classifier_path(args, size))
        for grid, size in ((False, IMAGE_SIZE), (True, GRID_IMAGE_SIZE))}
    trained = {(seed, arm): Job(f"seed{seed}/train/{arm}", "train.py",
                                lambda seed=seed, arm=arm: train_argv(args, seed, arm),
                                final_checkpoint(args, seed, arm))
               for seed in args.seeds for arm in ARMS}
    for (seed, arm), job in trained.items():
        init = ARMS[arm][3]
        job.inputs = [trained[seed, init]] if init else []

    def sampled(seed, arm, scale, pdg=False, stage1=False):
        """A sample job and the job that scores it."""
        name = sample_name(arm, scale, pdg, stage1)
        path = samples_path(args, seed, name)
        job = Job(f"seed{seed}/sample/{name}", SAMPLE_LIKE,
                  lambda: sample_argv(args, seed, arm, scale, pdg, stage1), path,
                  [trained[seed, arm]])
        classifier = classifiers[ARMS[arm][4]]
        scored = Job(f"seed{seed}/score/{name}", QUALITY, lambda: [
            "score", path, "--classifier", classifier.output, "--out", path[:-4] + ".json"],
            path[:-4] + ".json", [job, classifier])
        return job, scored

    seeds = args.seeds
    groups = [[classifiers[False]]]
    # training runs whose seconds are compared start together, each on its own core: (a), (d)
    groups += [[trained[s, "dit"], trained[s, "sprint"]] for s in seeds]
    groups += [[trained[s, "sprint-random"] for s in seeds]]                        # (e)
    # (d): the two seeds' DiTs side by side, then each seed's two continuations together
    groups += [[classifiers[True]], [trained[s, "dit32"] for s in seeds]]
    groups += [[trained[s, "sparsedit32"], trained[s, "dit32-control"]] for s in seeds]
    groups += [[trained[s, "sparsedit32-long"] for s in seeds]]
    # sampling jobs one at a time, whichever core is free: every one of them runs beside another
    # job, so their seconds per image are measured alike without waiting for a partner
    for s in seeds:
        sets = [sampled(s, "sprint", w, pdg) for w in SCALES for pdg in (False, True)]   # (c)
        sets += [sampled(s, "dit", SCALE), sampled(s, "sprint", SCALE, stage1=True),
                 sampled(s, "sprint-random", SCALE)]
        sets += [sampled(s, arm, GRID_SCALE) for arm in ("dit32", "dit32-control", "sparsedit32")]
        for job, scored in sets:
            groups += [[job], [scored]]
    return groups


#################################################################################
#          Figures: line plots with matplotlib, sample grids with sample.py      #
#################################################################################

def save_plots(panels, path):
    """Line plots side by side in one PNG. panels: [(title, x label, y label, series)], series:
    [(label, xs, ys, colour, dashed)]. matplotlib is imported here only: the report needs it, the
    runs and the tests do not."""
    import matplotlib
    matplotlib.use("Agg")                                  # to a file, without a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    for ax, (title, xlabel, ylabel, series) in zip(axes[0], panels):
        for label, xs, ys, colour, dashed in series:
            ax.plot(xs, ys, "--" if dashed else "-", color=colour, marker="o", markersize=3,
                    label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_class_grid(images, labels, num_classes, path, per_class=4, zoom=4):
    """The first `per_class` of uint8 images (N, S, S, 3) of every class, a column per class (blank
    where a class has fewer), enlarged `zoom` times (nearest), as one grid image."""
    S = images.shape[1]
    cells = np.full((per_class, num_classes, S * zoom, S * zoom, 3), 255, np.uint8)
    for c in range(num_classes):
        for r, img in enumerate(images[labels == c][:per_class]):
            cells[r, c] = img.repeat(zoom, 0).repeat(zoom, 1)
    sample.save_grid(cells.reshape(-1, S * zoom, S * zoom, 3), path, nrow=num_classes)


#################################################################################
#                 The report: what the jobs wrote, as tables                    #
#################################################################################

class Results:
    """What the finished jobs wrote, for the report: the runs' held-out evaluations and training
    seconds, the scores, the jobs' seconds and the calls' (jobs.jsonl), the classifier's bounds."""
    def __init__(self, args):
        self.args = args
        self.seconds = {}
        self.calls = []
        records = os.path.join(args.out, "jobs.jsonl")
        if os.path.exists(records):
            with open(records) as f:
                for record in map(json.loads, f):
                    if "job" in record:
                        self.seconds[record["job"]] = record["seconds"]   # its latest run
                    else:
                        self.calls.append((record["seconds"], record["ran"]))
        self.info = {size: quality.load_classifier(classifier_path(args, size)).info
                     for size in (IMAGE_SIZE, GRID_IMAGE_SIZE)}
        self.logs = {}
        for s in args.seeds:
            for arm in ARMS:
                with open(os.path.join(run_dir(args, s, arm), "log.jsonl")) as f:
                    self.logs[s, arm] = [json.loads(line) for line in f]

    def evals(self, seed, arm):
        """The run's held-out evaluations: {step: record with train_s, eval_loss[, _drop]}."""
        return {r["step"]: r for r in self.logs[seed, arm] if "eval_loss" in r}

    def at_step(self, seed, arm, step=None):
        """The evaluation at `step` (default: the run's last step)."""
        return self.evals(seed, arm)[sum(lengths(self.args, arm)) if step is None else step]

    def loss(self, arm, step=None):
        """seed -> the run's held-out loss at `step` (default: its last), as `differences` reads."""
        return lambda seed: self.at_step(seed, arm, step)["eval_loss"]

    def train_s(self, seed, arm):
        """The run's training seconds (train.py's train_s: training steps, not evaluations)."""
        return max(r.get("train_s", 0.0) for r in self.logs[seed, arm])

    def score(self, seed, name):
        """A sample set's {distance, accuracy, n} and seconds per image (of the whole job)."""
        with open(samples_path(self.args, seed, name)[:-4] + ".json") as f:
            result = json.load(f)
        seconds = self.seconds.get(f"seed{seed}/sample/{name}")
        return {**result, "s_per_image": seconds / result["n"] if seconds else None}

    def quality(self, seed, name):
        """[distance, class accuracy, seconds per image] of a sample set."""
        score = self.score(seed, name)
        return [score["distance"], score["accuracy"], score["s_per_image"]]


def fmt(value, spec):
    """A table cell: a number in `spec`, text as it is, None as a dash."""
    return "–" if value is None else value if isinstance(value, str) else format(value, spec)


def table(header, rows):
    """Markdown table lines."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in rows] + [""])


def seed_table(r, header, specs, settings, size=IMAGE_SIZE):
    """A row per setting and seed, then (with several seeds) the mean and spread of every number;
    under a distance column, the measure's floor and ceiling at `size` px.
    settings: [(label, seed -> [a value per column])]."""
    rows = []
    for label, values_of in settings:
        by_seed = {s: values_of(s) for s in r.args.seeds}
        rows += [[label, str(s)] + [fmt(v, f) for v, f in zip(values, specs)]
                 for s, values in by_seed.items()]
        if len(by_seed) > 1:
            cells = []
            for column, spec in zip(zip(*by_seed.values()), specs):
                if all(isinstance(v, (int, float)) for v in column):       # not text, not None
                    spread = fmt(np.ptp(column), spec.lstrip("+"))
                    cells.append(f"{fmt(np.mean(column), spec)} ({spread})")
                else:
                    cells.append("–")
            rows.append([label, "mean (spread)"] + cells)
    for label, key in (("real held-out images (floor)", "floor"),
                       ("uniform noise (ceiling)", "ceiling")):
        info = r.info[size][key]
        bound = {"distance": info["distance"], "class accuracy": info["accuracy"]}
        if "distance" in header:
            rows.append([label, "–"] + [fmt(bound.get(name), ".3f") for name in header[2:]])
    return table(header, rows)


def differences(r, label, before, after, spec=".3f", paired=False):
    """One line: after(seed) - before(seed) in every seed, their mean, and what RULE makes of it
    (paired or not); "not measured" where a value is None (seconds from before jobs.jsonl)."""
    a = {s: before(s) for s in r.args.seeds}
    b = {s: after(s) for s in r.args.seeds}
    if None in (*a.values(), *b.values()):
        return f"- {label}: not measured."
    diff = {s: b[s] - a[s] for s in r.args.seeds}
    line = f"- {label}: " + ", ".join(f"seed {s} {d:+{spec}}" for s, d in diff.items())
    if len(diff) == 1:
        return line + "."
    line += f"; mean {np.mean(list(diff.values())):+{spec}}; "
    signs = {np.sign(d) for d in diff.values()}
    if len(signs) > 1 or 0 in signs:                            # 0 is no direction
        return line + "not the same sign in every seed: no effect."
    if paired:
        return line + "the same sign in every seed: an effect (paired)."
    spreads = [np.ptp(list(a.values())), np.ptp(list(b.values()))]
    larger = min(abs(d) for d in diff.values()) > max(spreads)
    return (line + f"the same sign in every seed, {'' if larger else 'not '}larger than either "
            f"arm's seed spread ({', '.join(format(x, spec) for x in spreads)}): "
            f"{'an effect' if larger else 'no effect'}.")


def quality_differences(r, label, before, after, paired=False):
    """`differences` of two sample sets' distance, then class accuracy: two lines."""
    return [differences(r, f"{label}, {key}", lambda s: r.score(s, before)[key],
                        lambda s: r.score(s, after)[key], paired=paired)
            for key in ("distance", "accuracy")]


def loss_table(r, name, arm, steps):
    """A seed_table of a run's training seconds and held-out loss at these steps."""
    return seed_table(r, [name, "seed", "training s", "held-out loss"], [".0f", ".4f"],
                      [(f"step {k}", lambda s, k=k: [r.evals(s, arm)[k]["train_s"],
                                                     r.evals(s, arm)[k]["eval_loss"]])
                       for k in steps])


def loss_curves(r, arms, x):
    """save_plots' series: a run's held-out loss, a line per arm and seed (the odd seeds dashed),
    without a new run's step 0 (~1). arms: [(arm, label, colour)]; x: (arm, evaluation) -> x."""
    series = []
    for k, s in enumerate(r.args.seeds):
        for arm, label, colour in arms:
            points = sorted((x(arm, e), e["eval_loss"]) for step, e in r.evals(s, arm).items()
                            if step > 0 or ARMS[arm][3])
            series.append((f"{label}, seed {s}", *zip(*points), colour, k % 2 == 1))
    return series


def cost_section(r, figures):
    """(a) DiT vs SPRINT: held-out loss at equal training seconds; the final checkpoints."""
    notes = []
    settings = []
    for step in sorted(k for k in r.evals(r.args.seeds[0], "dit") if k > 0):
        def values(s, step=step):
            """The DiT's evaluation at this step; SPRINT's held-out loss at its training second."""
            dit = r.evals(s, "dit")[step]
            sprint = r.evals(s, "sprint").values()
            xs, ys = zip(*sorted((e["train_s"], e["eval_loss"]) for e in sprint))
            at = float(np.interp(dit["train_s"], xs, ys))
            if dit["train_s"] > xs[-1]:
                notes.append(f"- Seed {s}: the DiT's step {step} ({dit['train_s']:.0f} s) comes "
                             f"after SPRINT's last evaluation ({xs[-1]:.0f} s): read against it.")
            return [dit["train_s"], dit["eval_loss"], at, at - dit["eval_loss"]]
        settings.append((f"DiT step {step}", values))
    lines = ["## (a) DiT vs SPRINT at equal training seconds", "",
             "Each DiT evaluation of the held-out loss against SPRINT's at the same training "
             "second (`numpy.interp` over SPRINT's evaluations in its log.jsonl; `train_s` counts "
             "training steps only).", ""]
    lines += seed_table(r, ["DiT evaluation", "seed", "training s", "DiT held-out loss",
                            "SPRINT at the same second", "SPRINT − DiT"],
                        [".0f", ".4f", ".4f", "+.4f"], settings)
    lines += notes + ([""] if notes else []) + [f"The final checkpoints, CFG {SCALE:g}:", ""]
    settings = [(label, lambda s, arm=arm: [str(sum(lengths(r.args, arm))), r.train_s(s, arm),
                                            r.at_step(s, arm)["eval_loss"],
                                            *r.quality(s, sample_name(arm, SCALE))])
                for arm, label in (("dit", "DiT"), ("sprint", "SPRINT (after the fine-tune)"))]
    lines += seed_table(r, ["arm", "seed", "steps", "training s", "held-out loss", "distance",
                            "class accuracy", "s per image"],
                        ["", ".0f", ".4f", ".3f", ".3f", ".3f"], settings)
    lines += quality_differences(r, "SPRINT − DiT", sample_name("dit", SCALE),
                                 sample_name("sprint", SCALE))
    lines.append(differences(r, "SPRINT − DiT, final held-out loss", r.loss("dit"),
                             r.loss("sprint"), ".4f"))
    series = loss_curves(r, (("dit", "DiT", "tab:blue"), ("sprint", "SPRINT", "tab:orange")),
                         lambda arm, e: e["train_s"])
    save_plots([("Held-out loss against training seconds (after step 0)",
                 "training seconds (one core)", "held-out loss", series)],
               os.path.join(figures, "loss_vs_seconds.png"))
    return lines + ["", "![held-out loss, training seconds](figures/loss_vs_seconds.png)", ""]


def finetune_section(r):
    """(b) SPRINT at the end of stage 1 vs after its fine-tune: the gap, and quality."""
    steps, finetune = lengths(r.args, "sprint")

    def values(s, stage1):
        """Held-out losses at the stage's end, their gap, the quality of its samples."""
        e = r.at_step(s, "sprint", steps if stage1 else None)
        gap = e["eval_loss"] - e["eval_loss_drop"] if "eval_loss_drop" in e else None
        return [str(e["step"]), e["eval_loss"], e.get("eval_loss_drop"), gap,
                *r.quality(s, sample_name("sprint", SCALE, stage1=stage1))[:2]]

    lines = ["## (b) SPRINT at the end of stage 1 vs after the fine-tune", "",
             f"The same run at step {steps} (75% drop until then) and {steps + finetune} "
             f"({finetune} full-token steps later); held-out loss with all tokens and with the "
             f"training drop; samples with CFG {SCALE:g}.", ""]
    lines += seed_table(r, ["SPRINT", "seed", "step", "held-out loss", "with the drop", "gap",
                            "distance", "class accuracy"],
                        ["", ".4f", ".4f", "+.4f", ".3f", ".3f"],
                        [("end of stage 1", lambda s: values(s, True)),
                         ("after the fine-tune", lambda s: values(s, False))])
    before = sample_name("sprint", SCALE, stage1=True)
    after = sample_name("sprint", SCALE)
    lines += quality_differences(r, "after − before the fine-tune", before, after, paired=True)
    return lines + [""]


def guidance_section(r, figures):
    """(c) CFG vs PDG at every scale, SPRINT's final checkpoint: quality, speed, the figure."""
    settings = [(f"{'PDG' if pdg else 'CFG'} {w:g}",
                 lambda s, w=w, pdg=pdg: r.quality(s, sample_name("sprint", w, pdg)))
                for w in SCALES for pdg in (False, True)]
    lines = ["## (c) CFG vs PDG on the same checkpoint and noise", "",
             "SPRINT's final checkpoint of each seed, the same sampling noise in every row; "
             "seconds per image are the whole sampling job's (one core) over its images.", ""]
    lines += seed_table(r, ["guidance", "seed", "distance", "class accuracy", "s per image"],
                        [".3f", ".3f", ".3f"], settings)
    speed = []
    for w in SCALES:
        lines += quality_differences(r, f"PDG − CFG at {w:g}", sample_name("sprint", w),
                                     sample_name("sprint", w, True), paired=True)
        cfg = [r.score(s, sample_name("sprint", w))["s_per_image"] for s in r.args.seeds]
        pdg = [r.score(s, sample_name("sprint", w, True))["s_per_image"] for s in r.args.seeds]
        speed.append(f"{w:g}: " + ", ".join(f"{c / p:.2f}" for c, p in zip(cfg, pdg) if c and p))
    lines.append(f"- CFG ÷ PDG seconds per image, per seed, at scale {'; '.join(speed)}.")
    panels = []
    for key, title in (("distance", "Distance to the real images (lower is better)"),
                       ("accuracy", "Class accuracy of the samples")):
        series = [(f"{'PDG' if pdg else 'CFG'}, seed {s}", SCALES,
                   [r.score(s, sample_name("sprint", w, pdg))[key] for w in SCALES],
                   "tab:orange" if pdg else "tab:blue", k % 2 == 1)
                  for k, s in enumerate(r.args.seeds) for pdg in (False, True)]
        series.append(("real held-out images", (SCALES[0], SCALES[-1]),
                       (r.info[IMAGE_SIZE]["floor"][key],) * 2, "grey", True))
        panels.append((title, "guidance scale", key, series))
    save_plots(panels, os.path.join(figures, "guidance.png"))
    return lines + ["", "![distance and accuracy, guidance scale](figures/guidance.png)", ""]


def sampling_gflops(args, arm):
    """Forward GFLOPs per image of an arm's whole sampling run (sample.py's count: every model pass
    the sampler makes, CFG's two at every step), from the first seed's final checkpoint."""
    model = sample.load_model(checkpoint(args, args.seeds[0], arm), input_size=GRID_IMAGE_SIZE)
    return sample.trajectory_flops(model, "ddpm", GRID_SAMPLER_STEPS, cfg_scale=GRID_SCALE) / 1e9


def quarters(r, arm):
    """The run's evaluations nearest 0, 1/4, 1/2, 3/4 and all of its steps (the first seed's)."""
    evals = sorted(r.evals(r.args.seeds[0], arm))
    steps = lengths(r.args, arm)[0]
    return sorted({min(evals, key=lambda k: abs(k - steps * q / 4)) for q in range(5)})


def sparsedit_section(r, figures):
    """(d) SparseDiT's claim at its paper's token grid: the DiT's held-out loss flattening, then
    SparseDiT against the DiT given the same steps: quality, sampling FLOPs and measured speed."""
    steps = lengths(r.args, "dit32")[0]
    extra = lengths(r.args, "sparsedit32")[0]
    arms = (("dit32", f"DiT, step {steps}"), ("dit32-control", f"DiT + {extra} steps (control)"),
            ("sparsedit32", f"SparseDiT from it, + {extra} steps"))
    gflops = {arm: sampling_gflops(r.args, arm) for arm, _ in arms}
    shown = quarters(r, "dit32")[1:]
    lines = ["## (d) SparseDiT at its paper's token grid: 16 × 16 tokens, sparse sides 6 → 10", "",
             f"The DiT paper's own model (DDPM with learned variance, the sin-cos table: "
             f"`--diffusion ddpm`) trained from scratch for {steps} steps on the same images at "
             f"{GRID_IMAGE_SIZE} px, in patches of 2: 16 × 16 tokens, SparseDiT's sparse grid "
             f"growing from 6 × 6 to 10 × 10 over the trajectory as at the paper's 256 px. Then "
             f"{extra} more steps ({extra / steps:.0%} of the DiT's; the paper's fine-tune is "
             f"about 6% of DiT's training) as SparseDiT (converted by `--init`) and, as the "
             f"control, as the DiT itself. Its held-out loss, to show where it stands when "
             f"converted:", ""]
    lines += loss_table(r, "DiT", "dit32", shown)
    lines.append(differences(r, f"DiT held-out loss, step {steps} − step {shown[-2]}",
                             r.loss("dit32", shown[-2]), r.loss("dit32"), ".4f", paired=True))
    lines += ["", f"Samples with the DiT paper's sampler, `{GRID_SAMPLE} --steps "
              f"{GRID_SAMPLER_STEPS}`, CFG {GRID_SCALE:g} (its FID's), scored by the "
              f"{GRID_IMAGE_SIZE} px classifier. GFLOPs per image: the whole sampling run's, both "
              f"CFG passes at every step (sample.py's count); seconds per image: the sampling "
              f"job's, every job of this call on one core beside another job; training s: the "
              f"run's own steps.", ""]

    def values(s, arm):
        """An arm's training seconds, held-out loss, quality, sampling cost and speed."""
        distance, accuracy, s_per_image = r.quality(s, sample_name(arm, GRID_SCALE))
        return [r.train_s(s, arm), r.at_step(s, arm)["eval_loss"], distance, accuracy,
                gflops[arm], s_per_image, 1 / s_per_image if s_per_image else None]

    lines += seed_table(r, ["model", "seed", "training s", "held-out loss", "distance",
                            "class accuracy", "sampling GFLOPs per image", "s per image",
                            "images/s"], [".0f", ".4f", ".3f", ".3f", ".1f", ".3f", ".2f"],
                        [(label, lambda s, arm=arm: values(s, arm)) for arm, label in arms],
                        GRID_IMAGE_SIZE)
    control = sample_name("dit32-control", GRID_SCALE)
    sparse = sample_name("sparsedit32", GRID_SCALE)
    lines += quality_differences(r, "SparseDiT − control", control, sparse)
    lines.append(differences(r, "SparseDiT − control, held-out loss", r.loss("dit32-control"),
                             r.loss("sparsedit32"), ".4f"))
    speed = [r.score(s, control)["s_per_image"] / r.score(s, sparse)["s_per_image"]
             for s in r.args.seeds if r.score(s, sparse)["s_per_image"]]
    train_speed = [r.train_s(s, "dit32-control") / r.train_s(s, "sparsedit32")
                   for s in r.args.seeds]
    lines += [f"- Sampling FLOPs per image: SparseDiT {gflops['sparsedit32']:.1f} against the "
              f"DiT's {gflops['dit32-control']:.1f} GFLOPs, "
              f"{gflops['sparsedit32'] / gflops['dit32-control'] - 1:+.0%} (the paper, DiT-XL/2 "
              f"at 256 px: 68.1 against 118.6, −43%).",
              f"- Measured images/s, SparseDiT ÷ control, per seed: "
              f"{', '.join(f'{x:.2f}' for x in speed)} (the paper, on a GPU: 2.95 ÷ 1.58 = 1.87); "
              f"training seconds for the same steps, control ÷ SparseDiT: "
              f"{', '.join(f'{x:.2f}' for x in train_speed)}.",
              "- The paper's quality at those costs: FID 2.38 for SparseDiT against 2.27 for "
              "DiT-XL/2 (50 K samples, DDPM 250 steps, CFG 1.5).", ""]
    long_steps = lengths(r.args, "sparsedit32-long")[0]
    lines += [f"Whether more steps bring SparseDiT back: the same conversion fine-tuned for "
              f"{long_steps} steps ({long_steps / steps:.0%} of the DiT's; held-out loss only), "
              f"against the DiT's weights it started from (the control's step 0).", ""]
    lines += loss_table(r, "SparseDiT, longer", "sparsedit32-long",
                        quarters(r, "sparsedit32-long"))
    lines += [differences(r, f"SparseDiT after {long_steps} steps − the DiT it came from, "
                          f"held-out loss", r.loss("dit32-control", 0),
                          r.loss("sparsedit32-long"), ".4f"), ""]
    # a continuation's step 0 is the DiT's last
    series = loss_curves(r, (("dit32", "DiT", "grey"), ("dit32-control", "control", "tab:blue"),
                             ("sparsedit32", "SparseDiT", "tab:orange"),
                             ("sparsedit32-long", "SparseDiT, longer", "tab:red")),
                         lambda arm, e: e["step"] + (steps if ARMS[arm][3] else 0))
    cost = [(f"Sample {key} against sampling cost", "sampling GFLOPs per image", key,
             [(f"seed {s}: control → SparseDiT", [gflops["dit32-control"], gflops["sparsedit32"]],
               [r.score(s, control)[key], r.score(s, sparse)[key]], "tab:orange", k % 2 == 1)
              for k, s in enumerate(r.args.seeds)])
            for key in ("distance", "accuracy")]
    save_plots([("Held-out loss (DDPM: MSE + VB) after the DiT's step 0", "step", "held-out loss",
                 series)] + cost, os.path.join(figures, "sparsedit.png"))
    return lines + ["![held-out loss by step; quality against sampling GFLOPs](figures/"
                    "sparsedit.png)", ""]


def drop_section(r):
    """(e) structured vs random drop at the same steps."""
    steps, finetune = lengths(r.args, "sprint")
    settings = [(label, lambda s, arm=arm: [r.at_step(s, arm, steps)["eval_loss"],
                                            r.at_step(s, arm)["eval_loss"],
                                            *r.quality(s, sample_name(arm, SCALE))[:2]])
                for arm, label in (("sprint", "structured"), ("sprint-random", "random"))]
    lines = ["## (e) Structured vs random drop", "",
             "SPRINT with 75% structured drop (one token of every 2×2 group) and with 75% random "
             f"drop, the same steps (so the same FLOPs); the final checkpoints sampled with CFG "
             f"{SCALE:g}.", ""]
    lines += seed_table(r, ["drop", "seed", f"held-out loss, step {steps}",
                            f"held-out loss, step {steps + finetune}", "distance",
                            "class accuracy"], [".4f", ".4f", ".3f", ".3f"], settings)
    lines += quality_differences(r, "random − structured", sample_name("sprint", SCALE),
                                 sample_name("sprint-random", SCALE))
    return lines + [""]


def grids_section(r, figures):
    """Sample grids of the first seed, every arm beside the real held-out images."""
    s = r.args.seeds[0]
    grids = ((IMAGE_SIZE, 4, "real held-out images", "grid-real.png",
              [("DiT", sample_name("dit", SCALE)), ("SPRINT", sample_name("sprint", SCALE)),
               ("SPRINT, PDG", sample_name("sprint", SCALE, pdg=True)),
               ("SPRINT, end of stage 1", sample_name("sprint", SCALE, stage1=True)),
               ("SPRINT, random drop", sample_name("sprint-random", SCALE))]),
             (GRID_IMAGE_SIZE, 2, "real held-out images, 32 px", "grid-real32.png",
              [("DiT (d)", sample_name("dit32", GRID_SCALE)),
               ("DiT control (d)", sample_name("dit32-control", GRID_SCALE)),
               ("SparseDiT (d)", sample_name("sparsedit32", GRID_SCALE))]))
    rows = []
    for size, zoom, real, real_png, sets in grids:
        images, labels = quality.real_images(r.args.data, size)
        held = quality.split(labels)[1]
        num_classes = int(labels.max()) + 1
        save_class_grid(images[held], labels[held], num_classes, os.path.join(figures, real_png),
                        zoom=zoom)
        shown = [(real, real_png)]
        for label, name in sets:
            png = f"grid-seed{s}-{name}.png"
            with np.load(samples_path(r.args, s, name)) as f:
                save_class_grid(f["arr_0"], f["arr_1"], num_classes, os.path.join(figures, png),
                                zoom=zoom)
            shown.append((f"{label} ({name})", png))
        for k in range(0, len(shown), 4):                           # at most 4 grids a row
            rows += table([label for label, _ in shown[k: k + 4]],
                          [[f"![{label}](figures/{png})" for label, png in shown[k: k + 4]]])
    return ["## Samples", "",
            f"Seed {s}: the first 4 samples of every class, a column per class (0 to "
            f"{num_classes - 1}), every arm from the same noise; 16 px enlarged 4×, then (d)'s "
            f"32 px enlarged 2×.", ""] + rows


def header_section(r, groups, ran):
    """The title, the call, the hardware and time, the rule, the protocol, the instrument."""
    args = r.args
    jobs = [job for group in groups for job in group]
    core_s = sum(r.seconds.get(job.name, 0.0) for job in jobs)
    rows = [[arm, f"`{flags}`",
             f"{lengths(args, arm)[0]}" + (f" + {lengths(args, arm)[1]} fine-tuning"
                                           if finetune else ""),
             f"the {init}'s final checkpoint" if init else "scratch"]
            for arm, (flags, _, finetune, init, _) in ARMS.items()]
    extra = f", then `{shlex.join(args.train_flags)}`" if args.train_flags else ""
    shared, finetune = map(shlex.join, scaled_flags(args))
    shared_grid = shlex.join(scaled_flags(args, grid=True)[0])
    walls = ", ".join(f"{duration(wall)} for {n} jobs" for wall, n in r.calls)
    lines = ["# The CPU miniature: sample quality and cost, measured", "",
             f"Written by `{invocation(args)}`.", "",
             f"- Hardware: {hardware(args)}.",
             f"- Wall time: {duration(sum(wall for wall, _ in r.calls))} over the {len(r.calls)} "
             f"call(s) that ran jobs ({walls}); the jobs' own times add up to {duration(core_s)} "
             f"of one core. This call ran {ran} jobs and skipped {len(jobs) - ran} done earlier.",
             "", "## How a difference is read", "", RULE,
             "", "## Protocol", "",
             f"Data `{args.data}` at {IMAGE_SIZE} px, (d) at {GRID_IMAGE_SIZE} px; seeds "
             f"{', '.join(map(str, args.seeds))}; training lengths × {args.scale:g}. Every "
             f"training run of (a), (b), (c), (e): `{shared}` (SPRINT's fine-tune: `{finetune}`)"
             f"{extra}; of (d): `{shared_grid}`{extra}.", ""]
    lines += table(["arm", "flags", "steps", "starts from"], rows)
    return lines + [
        f"Every sample set: {args.samples} images with labels in the data's proportions "
        f"(`sample_like.py --labels-from`), `{SAMPLE} --steps {args.sampler_steps}`, CFG "
        f"{SCALE:g} unless it says otherwise; SPRINT's final checkpoint also at scales "
        f"{', '.join(f'{w:g}' for w in SCALES)}, with CFG and with PDG. (d)'s: `{GRID_SAMPLE} "
        f"--steps {GRID_SAMPLER_STEPS}`, CFG {GRID_SCALE:g}.", "",
        "## The instrument", "",
        "`quality.py`'s classifier (not the papers' FID, which is `fid.py`), one for each image "
        "size. Distance: the Fréchet distance of its penultimate features to those of the images "
        "it trained on (lower is better). Class accuracy: the share of samples it assigns to "
        "their intended class. Floor: the held-out real images; ceiling: as many uniform-noise "
        "images. Tables give every seed, then the mean and, in brackets, the spread (largest "
        "minus smallest).", ""] + table(
        ["classifier", "trained on", "epochs", "seconds (one thread)", "held-out accuracy",
         "floor: distance (images)", "ceiling: distance"],
        [[f"{size} px", info["data"], str(info["epochs"]), f"{info['train_seconds']:.0f}",
          f"**{info['held_out_accuracy']:.3f}**",
          f"{info['floor']['distance']:.3f} ({info['floor']['n']})",
          f"{info['ceiling']['distance']:.3f}"] for size, info in r.info.items()])


def commands_section(groups, seconds):
    """Every command of the protocol in the order the jobs start, after its job's name and time."""
    lines = ["## Commands", "", "Each line reruns one job alone, from the repository root; the "
             "runner ran exactly these.", "", "```bash"]
    for job in (job for group in groups for job in group):
        took = f": {seconds[job.name]:.0f} s" if job.name in seconds else ""
        lines += [f"# {job.name}{took}", job.command()]
    return lines + ["```"]


def write_report(args, groups, ran):
    """report.md and its figures, from the finished jobs' outputs -> its path."""
    figures = os.path.join(args.out, "figures")
    os.makedirs(figures, exist_ok=True)
    r = Results(args)
    lines = (header_section(r, groups, ran) + cost_section(r, figures)
             + finetune_section(r) + guidance_section(r, figures) + sparsedit_section(r, figures)
             + drop_section(r) + grids_section(r, figures) + commands_section(groups, r.seconds))
    path = os.path.join(args.out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


#################################################################################
#                                      CLI                                      #
#################################################################################

def hardware(args):
    """The machine, as the report names it."""
    model = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    return (f"{model}, {os.cpu_count()} cores; torch {torch.__version__}, Python "
            f"{sys.version.split()[0]}; {args.jobs} jobs side by side, 1 thread each "
            f"(OMP_NUM_THREADS=1)")


def duration(seconds):
    """Seconds as h min, min s, or s."""
    h = int(seconds // 3600)
    m = int(seconds % 3600 // 60)
    s = int(seconds % 60)
    return f"{h} h {m} min" if h else f"{m} min {s} s" if m else f"{seconds:.1f} s"


def invocation(args):
    """This call as one command line, every setting spelled out."""
    flags = ["--train-flags", shlex.join(args.train_flags)] if args.train_flags else []
    return shlex.join(["python", f"{HERE}/run.py", "--data", args.data, "--out", args.out,
                       "--seeds", *map(str, args.seeds), "--samples", str(args.samples),
                       "--scale", f"{args.scale:g}", "--sampler-steps", str(args.sampler_steps),
                       "--jobs", str(args.jobs), *flags])


def parse_args(argv=None):
    """The command line -> its flags (--train-flags split into a list)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--data", default=f"{HERE}/emoji_google_32.npz", help="real images: x, y "
                   "(default %(default)s)")
    p.add_argument("--out", default="results/miniature", help="where the jobs and report.md go "
                   "(default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="default 0 1")
    p.add_argument("--samples", type=int, default=SAMPLES,
                   help=f"images per sample set (default {SAMPLES})")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every training length: "
                   "the arms' steps, evaluation interval, warm-up and EMA horizon, the "
                   "classifier's epochs")
    p.add_argument("--sampler-steps", type=int, default=SAMPLER_STEPS,
                   help=f"Euler steps (default {SAMPLER_STEPS})")
    p.add_argument("--jobs", type=int, default=2, help="jobs side by side, one thread each")
    p.add_argument("--train-flags", type=shlex.split, default="", help="more train.py flags for "
                   "every arm, after the protocol's (so they win), e.g. \"--hidden-size 64 "
                   "--num-heads 2\"")
    return p.parse_args(argv)


def check_args(args):
    """Flags out of range, a missing --data, train flags train.py refuses, an --out made with
    other settings: a ValueError naming the flag, before anything runs. Then --out remembers
    the settings."""
    for name, least in (("samples", 2), ("sampler_steps", 1), ("jobs", 1)):
        if getattr(args, name) < least:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {getattr(args, name)}: must be at least {least}")
    if args.scale <= 0:
        raise ValueError(f"--scale {args.scale}: must be above 0")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ValueError(f"--seeds {' '.join(map(str, args.seeds))}: give distinct seeds >= 0")
    if not os.path.isfile(args.data):
        raise ValueError(f"--data {args.data}: no such file (run from the repository root, or "
                         f"give the path)")
    try:
        with open(os.devnull, "w") as null, redirect_stderr(null):     # argparse's usage text
            train.parse_args(train_argv(args, 0, "dit"))
    except SystemExit:
        raise ValueError(f"--train-flags {shlex.join(args.train_flags)}: train.py does not take "
                         f"these (python train.py --help lists its flags)") from None
    settings = {key: getattr(args, key) for key in SETTINGS}
    path = os.path.join(args.out, "protocol.json")
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        changed = [f"--{k.replace('_', '-')} {earlier.get(k)!r} there, {v!r} here"
                   for k, v in settings.items() if earlier.get(k) != v]
        if changed:
            raise ValueError(f"--out {args.out} holds a run with other settings "
                             f"({'; '.join(changed)}): give the same ones, or another --out")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)


def main(argv=None):
    """Run every job not done yet, then write the report -> its path."""
    args = parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        raise SystemExit(f"run.py: error: {e}")
    print(f"{invocation(args)}\n{hardware(args)}")
    start = time.perf_counter()
    groups = plan(args)
    ran = run_jobs(groups, args)
    if ran:                                        # the report states the wall time of every call
        with open(os.path.join(args.out, "jobs.jsonl"), "a") as f:
            record = {"call": invocation(args), "seconds": time.perf_counter() - start, "ran": ran}
            f.write(json.dumps(record) + "\n")
    path = write_report(args, groups, ran)
    print(f"wrote {path} ({duration(time.perf_counter() - start)})")
    return path


if __name__ == "__main__":
    main()
