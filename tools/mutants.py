"""
A mutation check of the test suite: break one line of the method at a time (a formula, a schedule,
a sampler, an evaluator) in a copy of the repository, run the suite, and report which breaks it
kills. A survivor is a behaviour nothing tests.

    python tools/mutants.py                   # every mutant, about 25 min on 2 cores
    python tools/mutants.py --only ema path   # those whose name contains one of these words
    python tools/mutants.py --list            # the mutants, without running anything

Each mutant is (name, file, the exact text it breaks, what it becomes); the text must occur once in
today's file, so a mutant that no longer applies is reported as stale rather than counted. The
suite runs as README.md gives it (python -m pytest -q), stopping at its first failure.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file, original text, mutated text)
MUTANTS = [
    # --- flow matching: the objective and its draws (train.py) ---
    ("flow target x - eps", "train.py", "(eps - x)).pow(2)", "(x - eps)).pow(2)"),
    ("flow path swapped", "train.py", "(1 - tt) * x + tt * eps", "tt * x + (1 - tt) * eps"),
    ("t uniform", "train.py", "torch.sigmoid(torch.randn(G, device=device))",
     "torch.rand(G, device=device)"),
    ("t logit-normal std 2", "train.py", "torch.sigmoid(torch.randn(G, device=device))",
     "torch.sigmoid(2 * torch.randn(G, device=device))"),
    ("ddpm t skips 999", "train.py", "torch.randint(DDPM_STEPS, (G,)",
     "torch.randint(DDPM_STEPS - 1, (G,)"),
    ("label drop 0", "train.py", "LABEL_DROP = 0.1 ", "LABEL_DROP = 0.0 "),
    ("label drop to the last class", "train.py", "torch.where(null[rows], cfg.num_classes, y)",
     "torch.where(null[rows], cfg.num_classes - 1, y)"),
    ("path drop > instead of <", "train.py", "(torch.rand(G, device=device) < stage.path_drop)",
     "(torch.rand(G, device=device) > stage.path_drop)"),
    ("flip vertical", "train.py", "x.flip(3 if x.dtype == torch.uint8 else 1)",
     "x.flip(2 if x.dtype == torch.uint8 else 1)"),
    ("flip step never flips", "train.py", 'if flip == "step":', 'if flip == "never":'),
    ("pixels to [0, 1]", "train.py", "return x.float() / 127.5 - 1", "return x.float() / 255"),
    ("posterior mean only", "train.py", "(x[:, 0, 0].float() + x[:, 0, 1].float() * noise)",
     "(x[:, 0, 0].float())"),
    ("posterior noise fixed", "train.py", "noise = torch.randn(G, *x.shape[-3:], device=x.device)",
     "noise = torch.ones(G, *x.shape[-3:], device=x.device)"),
    ("latents unscaled", "train.py", "x[:, 0, 1].float() * noise) * latent_scale",
     "x[:, 0, 1].float() * noise)"),
    ("vb's mean not frozen", "sparsedit.py", "torch.cat([eps_pred.detach(), v], 1)",
     "torch.cat([eps_pred, v], 1)"),
    ("vb in nats", "sparsedit.py", "kl.mean((1, 2, 3))) / math.log(2.0)", "kl.mean((1, 2, 3)))"),
    # --- EMA, optimiser, stages (train.py) ---
    ("ema weight decay", "train.py", "get_ema_multi_avg_fn(ema_decay)",
     "get_ema_multi_avg_fn(1 - ema_decay)"),
    ("ema update removed", "train.py",
     "    ema_update(list(ema.parameters()), list(raw.parameters()), None)\n", ""),
    ("stage 2 not from the ema", "train.py", "raw.load_state_dict(ema.state_dict())", "pass"),
    ("stage 2 keeps the drop", "train.py", "return Stage(0.0, args.mask_type, path_drop",
     "return Stage(args.drop, args.mask_type, path_drop"),
    ("stage 2 without path drop", "train.py", "return Stage(0.0, args.mask_type, path_drop",
     "return Stage(0.0, args.mask_type, 0.0"),
    ("warm-up from 10%", "train.py", "lr * (0.01 + 0.99 * progress)",
     "lr * (0.1 + 0.9 * progress)"),
    ("warm-up ema 0.99", "train.py", "min(args.ft_ema_decay, 0.999)",
     "min(args.ft_ema_decay, 0.99)"),
    ("clip at 10", "train.py", "model.parameters(), grad_clip or math.inf)",
     "model.parameters(), 10 * grad_clip or math.inf)"),
    ("clip always", "train.py", "model.parameters(), grad_clip or math.inf)",
     "model.parameters(), grad_clip or 1.0)"),
    ("sparsedit in bf16", "sprint.py", 'Recipe("fp16", 0.0, "none")', 'Recipe("bf16", 0.0, "none")'),
    ("dit clips", "sprint.py", 'Recipe("fp32", 0.0, "step")', 'Recipe("fp32", 1.0, "step")'),
    ("sprint flips", "sprint.py", 'Recipe("bf16", 1.0, "none")', 'Recipe("bf16", 1.0, "step")'),
    ("no loss scaling", "train.py", 'enabled=precision == "fp16")', "enabled=False)"),
    ("held-out columns on other noise", "train.py",
     "    torch.manual_seed(0)                      #",
     "    torch.manual_seed(int(100 * stage.drop))  #"),
    ("adamw weight decay", "train.py", "lr=lr, weight_decay=0,", "lr=lr, weight_decay=0.01,"),
    # --- a real run: micro-batches, checkpointing, the EMA's evaluation and samples, retention ---
    ("micro-batches summed", "train.py", "ddpm).mean() / accum", "ddpm).mean()"),
    ("micro-batches one draw", "train.py", "zip(*(f.chunk(accum) for f in fields))",
     "zip(*(f.chunk(accum)[:1] * accum for f in fields))"),
    ("micro-batches each synchronised", "train.py", "else model.no_sync():",
     "else contextlib.nullcontext():"),
    ("checkpointing off", "sprint.py",
     "block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)", "pass"),
    ("ema eval on the raw weights", "train.py", '"eval_loss_ema": (ema, 0.0)',
     '"eval_loss_ema": (raw, 0.0)'),
    ("fid on the raw weights", "train.py", "value = ema_fid(ema,", "value = ema_fid(raw,"),
    ("fid shards overlap", "train.py", "for k in range(rank, math.ceil(N / B), world))",
     "for k in range(0, math.ceil(N / B)))"),
    ("retention drops stage ends", "train.py",
     "if not (at in (args.steps, args.steps + args.finetune_steps) or",
     "if not (at in () or"),
    ("retention keeps all", "train.py", '"*.pt")))[:-args.keep_last]', '"*.pt")))[:0]'),
    ("resume refuses nothing", "train.py", "    if given - RESUMABLE:", "    if False:"),
    ("scratch ddpm is flow", "train.py", 'paper = DIT_PAPER if args.diffusion == "ddpm" else {}',
     "paper = {}"),
    ("scratch ddpm keeps rope", "train.py", 'paper = DIT_PAPER if args.diffusion == "ddpm" else {}',
     'paper = {"diffusion": "ddpm"} if args.diffusion == "ddpm" else {}'),
    # --- SPRINT (sprint.py) ---
    ("groups by column", "sprint.py", "row = (group // g) * n + pick // n",
     "row = (group % g) * n + pick // n"),
    ("mask token zero", "sprint.py", "nn.init.normal_(self.mask_token, std=0.02)", "pass"),
    ("fusion order", "sprint.py", "torch.cat([h_g, h], dim=-1)", "torch.cat([h, h_g], dim=-1)"),
    ("path drop keeps g", "sprint.py", "torch.where(path_drop[:, None, None], mask, h_g)",
     "torch.where(path_drop[:, None, None], h_g, h_g)"),
    # --- SparseDiT (sparsedit.py) ---
    ("density flat until 0.70", "sparsedit.py", "SPARSEST_FROM = 0.75", "SPARSEST_FROM = 0.70"),
    ("density floors", "sparsedit.py", "torch.round(max_side - (max_side - min_side) * frac)",
     "torch.floor(max_side - (max_side - min_side) * frac)"),
    ("context not modulated", "sparsedit.py",
     "ctx = modulate(self.norm1(ctx), shift_msa, scale_msa)", "ctx = self.norm1(ctx)"),
    ("recovery W1 and W2 swapped", "sparsedit.py", "xm = self.W1(up) + self.W2(x)",
     "xm = self.W1(x) + self.W2(up)"),
    ("recovery without biases", "sparsedit.py", "self.W1 = nn.Linear(dim, dim)",
     "self.W1 = nn.Linear(dim, dim, bias=False)"),
    ("poolingformer max", "sparsedit.py", "self.v(x.mean(dim=1, keepdim=True))",
     "self.v(x.amax(dim=1, keepdim=True))"),
    # --- sampling (sample.py) ---
    ("cfg around the conditional", "sample.py", "out = v_uncond + cfg_scale * (v_cond - v_uncond)",
     "out = v_cond + cfg_scale * (v_cond - v_uncond)"),
    ("pdg runs the middle", "sample.py", "v_uncond = model(x, tt, null, skip_middle=True, **kw)",
     "v_uncond = model(x, tt, null, **kw)"),
    ("sde drift w/4", "sample.py", "x = x + (v - t * score) * dt",
     "x = x + (v - 0.5 * t * score) * dt"),
    ("sde stops at 0.05", "sample.py", "torch.linspace(1.0, 0.04, steps",
     "torch.linspace(1.0, 0.05, steps"),
    ("heun is euler", "sample.py", "x = x + 0.5 * (v + velocity(x + v * dt, t_next)) * dt",
     "x = x + v * dt"),
    ("ddpm guides every channel", "sample.py",
     "out = torch.cat([out[:, :3], v_cond[:, 3:]], dim=1)", "pass"),
    ("ddpm noise at the last step", "sample.py",
     "noise_like(x, generators) if i else mean", "noise_like(x, generators)"),
    ("pixels rounded", "sample.py", ".clamp(0, 255).byte()", ".clamp(0, 255).round().byte()"),
    ("sprint pixels as dit's", "sample.py", '"flow": ("bf16", lambda x: 255 * ((x + 1) / 2))',
     '"flow": ("bf16", lambda x: 127.5 * x + 128)'),
    ("pixels in float32", "sample.py", "SAMPLING[diffusion][1](x).clamp",
     "SAMPLING[diffusion][1](x.float()).clamp"),
    ("grid without pdg", "sample.py", '{"cfg_scale": 4.0, "pdg": True}] * model.has_sparse_path',
     '{"cfg_scale": 4.0}] * model.has_sparse_path'),
    # --- the evaluators (fid.py) ---
    ("frechet without the mean term", "fid.py", "float(diff @ diff + np.trace(sigma1)",
     "float(np.trace(sigma1)"),
    ("fid of one rank", "fid.py", "pool3 = sum(shares, [])", "pool3 = shares[0]"),
    ("frechet retry offset", "fid.py", "linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))",
     "linalg.sqrtm(sigma1 @ sigma2 + offset)"),
    ("frechet trace once", "fid.py", "- 2 * np.trace(covmean)", "- np.trace(covmean)"),
    ("inception score kl reversed", "fid.py", "(log_p.exp() * (log_p - log_py))",
     "(log_p.exp() * (log_py - log_p))"),
    ("precision strict ball", "fid.py", "(d <= ref_radii[i:i + block, None])",
     "(d < ref_radii[i:i + block, None])"),
    ("radii k-th not k+1-th", "fid.py", ".kthvalue(k + 1, dim=1)", ".kthvalue(k, dim=1)"),
    ("inception input / 127.5", "fid.py", "x = (x - 128) / 128", "x = x / 127.5 - 1"),
    ("fdd std swapped", "fid.py", "[[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]",
     "[[0.485, 0.456, 0.406], [0.225, 0.224, 0.229]]"),
]


def copy_tree(dst):
    """The working tree without git, virtual environments and caches."""
    ignore = shutil.ignore_patterns(".git", ".venv*", "venv", "__pycache__", ".pytest_cache",
                                    "results", "samples")
    shutil.copytree(ROOT, dst, ignore=ignore)


def run_suite(tree, timeout):
    """(killed, seconds, the first failing test) of the suite in `tree`."""
    begin = time.perf_counter()
    try:
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        proc = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, time.perf_counter() - begin, "(timed out)"
    failed = next((line.split(" ")[1] for line in proc.stdout.splitlines()
                   if line.startswith("FAILED ") or line.startswith("ERROR ")), "")
    return proc.returncode != 0, time.perf_counter() - begin, failed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--only", nargs="+", help="mutants whose name contains one of these words")
    p.add_argument("--list", action="store_true", help="list the mutants and stop")
    p.add_argument("--timeout", type=int, default=600, help="seconds per suite run")
    args = p.parse_args()
    mutants = [m for m in MUTANTS if not args.only or any(w in m[0] for w in args.only)]
    if args.list:
        for name, file, _, _ in mutants:
            print(f"{file:13s} {name}")
        return
    print("| mutant | file | result | seconds | first failing test |")
    print("|---|---|---|---|---|")
    killed = stale = 0
    for name, file, old, new in mutants:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "repo"
            copy_tree(tree)
            source = (tree / file).read_text()
            if source.count(old) != 1:
                stale += 1
                print(f"| {name} | {file} | stale ({source.count(old)} matches) | | |", flush=True)
                continue
            (tree / file).write_text(source.replace(old, new))
            dead, seconds, failed = run_suite(tree, args.timeout)
        killed += dead
        print(f"| {name} | {file} | {'killed' if dead else '**survived**'} | {seconds:.0f} | "
              f"{failed} |", flush=True)
    print(f"\n{killed} of {len(mutants) - stale} mutants killed"
          + (f"; {stale} stale (their text is no longer in the file)" if stale else ""))


if __name__ == "__main__":
    main()
