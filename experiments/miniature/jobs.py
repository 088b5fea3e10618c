"""
The miniature's jobs, and how run.py runs them. A job is one command line of train.py,
sample_like.py or quality.py, exactly as a user types it from the repository root to rerun it alone.
Persistent workers, one thread each (what the line's OMP_NUM_THREADS=1 does), split that very line
and call its script's entry point, which is what running it does, without the ~3 s a new process
spends importing torch.
"""
import glob
import json
import multiprocessing
import os
import shlex
import sys
import time
import traceback
import zipfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import torch

# the repository root, two folders up, for train.py: the runner runs from any folder
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import quality
import sample_like
import train

# the scripts as the printed command lines name them, from the repository root
HERE = "experiments/miniature"
SAMPLE_LIKE = f"{HERE}/sample_like.py"
QUALITY = f"{HERE}/quality.py"
# a printed line's script -> what running it calls (train.cli: bad input is one line, as there)
ENTRY_POINTS = {"train.py": train.cli, SAMPLE_LIKE: sample_like.main, QUALITY: quality.main}


@dataclass
class Job:
    """One command of the protocol: its name, script and arguments (built when it starts, once its
    inputs exist and a checkpoint's path is known), what it writes, and the jobs it reads."""
    name: str
    script: str
    argv: object                          # () -> [str]
    output: str                           # a path, or a glob: train.py numbers its run folders
    inputs: list = field(default_factory=list)

    def done(self):
        """Whether its output exists, whole (an .npz cut short is no zip: its index comes last)."""
        return any(not p.endswith(".npz") or zipfile.is_zipfile(p) for p in glob.glob(self.output))

    def command(self):
        """The line a user types to run it alone; the workers run this very line."""
        return f"OMP_NUM_THREADS=1 python {self.script} {shlex.join(self.argv())}"

    def log_path(self, out):
        """Where its console output goes."""
        return os.path.join(out, "logs", self.name.replace("/", "-") + ".log")


def one_thread():
    """A worker's set-up: what OMP_NUM_THREADS=1 does for a new process (torch is imported)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def execute(line, log_path):
    """In a worker: run a printed command line through its script's entry point, its output to
    log_path -> (succeeded, seconds, the error's last line)."""
    _, _, script, *argv = shlex.split(line)               # OMP_NUM_THREADS=1 python SCRIPT ARGS
    start = time.perf_counter()
    with open(log_path, "w") as log, redirect_stdout(log), redirect_stderr(log):
        print(f"$ {line}", flush=True)
        try:
            ENTRY_POINTS[script](argv)
            return True, time.perf_counter() - start, ""
        except SystemExit as e:                           # the scripts' one-line errors
            message = e.code if isinstance(e.code, str) else f"exit status {e.code}"
        except Exception as e:                            # a bug
            traceback.print_exc()
            message = f"{type(e).__name__}: {e}"
        print(message, flush=True)
        return False, time.perf_counter() - start, message.strip().splitlines()[-1]


def clock():
    """The time of day, for the console."""
    return time.strftime("%H:%M:%S")


def run_jobs(groups, args):
    """Run every job not done yet. A group starts once its inputs exist and it has a core per job
    (with fewer --jobs, they queue), never before an earlier group that only waits for cores;
    jobs.jsonl records every finished job. -> the number of jobs run."""
    todo = [group for group in ([job for job in g if not job.done()] for g in groups) if group]
    total = sum(map(len, groups))
    left = sum(map(len, todo))
    print(f"{total - left} of {total} jobs done earlier (their outputs exist): skipped; "
          f"{left} to run")
    if not todo:
        return 0
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    running = {}
    failed = None
    spawn = multiprocessing.get_context("spawn")           # fresh interpreters: no forked threads
    pool = ProcessPoolExecutor(min(args.jobs, left), mp_context=spawn, initializer=one_thread)
    try:
        while (todo and not failed) or running:
            for group in [] if failed else list(todo):
                if not all(inp.done() for job in group for inp in job.inputs):
                    continue                               # later groups may start meanwhile
                if args.jobs - len(running) < min(len(group), args.jobs):
                    break                                  # none overtakes it: pairs stay pairs
                for job in group:
                    line = job.command()
                    print(f"[{clock()}] start {job.name}: {line}", flush=True)
                    running[pool.submit(execute, line, job.log_path(args.out))] = (job, line)
                todo.remove(group)
            if not running:            # cannot happen in the protocol: every input is a job's
                raise SystemExit(f"run.py: error: {todo[0][0].name} waits for an input that no "
                                 f"job makes")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job, line = running.pop(future)
                ok, seconds, message = future.result()
                if ok and not job.done():
                    ok = False
                    message = f"it ended without writing {job.output}"
                if not ok:
                    print(f"[{clock()}] failed {job.name}: {message}", flush=True)
                    failed = failed or (job, message)
                    continue
                print(f"[{clock()}] done {job.name} in {seconds:.0f} s", flush=True)
                record = {"job": job.name, "command": line, "seconds": seconds}
                with open(os.path.join(args.out, "jobs.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
    finally:
        pool.shutdown(cancel_futures=True)
    if failed:
        job, message = failed
        raise SystemExit(f"run.py: error: {job.name} failed: {message} (log: "
                         f"{job.log_path(args.out)}); fix it and rerun: finished jobs are skipped")
    return left
