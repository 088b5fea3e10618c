"""miniature.py, the one command that reruns the CPU miniature, end to end on a tiny budget: the
report has every table and figure, the commands it prints are the lines its workers ran, a printed
line run again makes the same output, and a second call skips what is done, reruns what is not."""
import io
import json
import re
import shutil
from contextlib import redirect_stdout

import numpy as np
import pytest
from PIL import Image

import data
import miniature

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py

# one seed, a few steps of a model 16 wide, 12 samples of one Euler step each
TINY = ["--seeds", "0", "--samples", "12", "--scale", "0.005", "--sampler-steps", "1",
        "--train-flags", "--hidden-size 16 --num-heads 1 --depths 1 2 1 --global-batch-size 16 "
        "--eval-every 100"]


def call(*argv):
    """miniature.main(argv) -> what it printed."""
    printed = io.StringIO()
    with redirect_stdout(printed):
        miniature.main([str(a) for a in argv])
    return printed.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The whole runner once, on 200 images of the embedded shapes -> (data, --out, its output)."""
    tmp = tmp_path_factory.mktemp("miniature")
    x, y = data.embedded_dataset(16, 200)
    np.savez(tmp / "shapes.npz", x=x, y=y)
    printed = call("--data", tmp / "shapes.npz", "--out", tmp / "out", *TINY)
    return str(tmp / "shapes.npz"), tmp / "out", printed


def records(out):
    """The jobs in jobs.jsonl: what the workers ran, in the order they finished."""
    lines = (out / "jobs.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "job" in record]


def printed_commands(report):
    """The command lines of the report's bash block."""
    block = report.split("```bash\n")[1].split("```")[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


#################################################################################
#                      One command, every table and figure                      #
#################################################################################

def test_the_report_has_every_table_figure_and_the_hardware(run):
    _, out, printed = run
    report = (out / "report.md").read_text()
    for heading in ["## (a) DiT vs SPRINT at equal training seconds",
                    "## (b) SPRINT at the end of stage 1 vs after the fine-tune",
                    "## (c) CFG vs PDG on the same checkpoint and noise",
                    "## (d) SparseDiT vs the DiT it came from vs that DiT given the same extra "
                    "steps",
                    "## (e) Structured vs random drop", "## Samples", "## Commands"]:
        assert heading in report
    assert re.search(r"Hardware: .+, \d+ cores; torch .+; 2 jobs side by side, 1 thread each",
                     report)
    assert re.search(r"Wall time: .+ over the 1 call\(s\) that ran jobs \(.+ for 32 jobs\)", report)
    assert "This call ran 32 jobs and skipped 0 done earlier." in report
    for row in ["| CFG 1.5 | 0 |", "| PDG 4 | 0 |", "| end of stage 1 | 0 |", "| random | 0 |",
                "| DiT + 1 steps (control) | 0 |", "| SparseDiT from it, + 1 steps | 0 |"]:
        assert row in report
    assert report.count("| real held-out images (floor) | – |") == 5      # every quality table
    assert report.count("| uniform noise (ceiling) | – |") == 5
    figures = re.findall(r"!\[[^]]*\]\((figures/[^)]+\.png)\)", report)
    assert {"figures/loss_vs_seconds.png", "figures/guidance.png", "figures/grid-real.png",
            "figures/grid-seed0-sprint-pdg2.png"} <= set(figures) and len(figures) == 10
    for figure in figures:
        with Image.open(out / figure) as img:
            assert img.format == "PNG" and min(img.size) > 60
    assert f"wrote {out / 'report.md'}" in printed


def test_the_training_runs_of_a_comparison_start_together(run):
    starts = re.findall(r"start (\S+):", run[2])
    for a, b in [("seed0/train/dit", "seed0/train/sprint"),
                 ("seed0/train/sparsedit", "seed0/train/dit-control")]:
        assert starts.index(b) == starts.index(a) + 1
    lines = run[2].splitlines()
    first = next(k for k, line in enumerate(lines) if "start seed0/train/dit:" in line)
    assert "start seed0/train/sprint:" in lines[first + 1]                 # nothing ended between


#################################################################################
#                  The printed commands are the ones that ran                   #
#################################################################################

def test_the_report_prints_exactly_the_lines_the_workers_ran(run):
    _, out, printed = run
    commands = printed_commands((out / "report.md").read_text())
    ran = records(out)
    assert sorted(commands) == sorted(r["command"] for r in ran) and len(set(commands)) == 32
    for r in ran:
        assert f"start {r['job']}: {r['command']}" in printed
        log = out / "logs" / (r["job"].replace("/", "-") + ".log")
        assert log.read_text().startswith(f"$ {r['command']}\n")
        assert re.match(r"OMP_NUM_THREADS=1 python (train|sample|quality)\.py ", r["command"])


def test_a_printed_line_run_again_makes_the_same_samples(run, tmp_path):
    _, out, _ = run
    report = (out / "report.md").read_text()
    line = next(c for c in printed_commands(report) if "dit-cfg2.npz" in c)
    made = out / "seed0" / "samples" / "dit-cfg2.npz"
    shutil.move(made, tmp_path / "first.npz")
    ok, _, message = miniature.execute(line, str(tmp_path / "again.log"))   # as a worker does
    assert ok, message
    with np.load(made) as again, np.load(tmp_path / "first.npz") as first:
        assert np.array_equal(again["arr_0"], first["arr_0"])
        assert np.array_equal(again["arr_1"], first["arr_1"])


#################################################################################
#                 Resuming: what is done is skipped, the rest runs              #
#################################################################################

def test_a_second_call_skips_what_is_done_and_reruns_only_what_is_missing(run, tmp_path):
    shapes, out, _ = run
    samples = out / "seed0" / "samples"
    shutil.copy(samples / "sprint-random-cfg2.npz", tmp_path / "before.npz")
    (samples / "sprint-random-cfg2.npz").unlink()                        # as if killed there
    (samples / "sprint-random-cfg2.json").unlink()
    before = len(records(out))
    printed = call("--data", shapes, "--out", out, *TINY)
    assert "30 of 32 jobs done earlier (their outputs exist): skipped; 2 to run" in printed
    assert [r["job"] for r in records(out)[before:]] == ["seed0/sample/sprint-random-cfg2",
                                                         "seed0/score/sprint-random-cfg2"]
    with np.load(samples / "sprint-random-cfg2.npz") as again, np.load(tmp_path / "before.npz") \
            as first:
        assert np.array_equal(again["arr_0"], first["arr_0"])
    report = (out / "report.md").read_text()
    assert "This call ran 2 jobs and skipped 30 done earlier." in report
    assert re.search(r"over the 2 call\(s\) that ran jobs \(.+ for 32 jobs, .+ for 2 jobs\)",
                     report)


#################################################################################
#                        Bad flags: one line, early                             #
#################################################################################

def test_bad_flags_and_other_settings_for_an_out_are_refused_before_anything_runs(run):
    shapes, out, _ = run
    cases = [(["--scale", "0"], r"--scale 0\.0: must be above 0"),
             (["--samples", "1"], r"--samples 1: must be at least 2"),
             (["--seeds", "0", "0"], r"--seeds 0 0: give distinct seeds"),
             (["--data", out / "none.npz"], r"--data .*none\.npz: no such file"),
             (["--train-flags", "--no-such-flag 1"],
              r"--train-flags --no-such-flag 1: train\.py does not take these"),
             ([*TINY, "--samples", "13"],
              r"--out .* holds a run with other settings \(--samples 12 there, 13 here\)")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=r"^miniature\.py: error: " + message) as e:
            call("--data", shapes, "--out", out, *argv)
        assert "\n" not in str(e.value)
    assert json.loads((out / "protocol.json").read_text())["samples"] == 12


def test_ticks_are_round_and_span_the_values():
    assert miniature.ticks(0.27, 0.41) == [0.25, 0.3, 0.35, 0.4, 0.45]
    assert miniature.ticks(1.5, 4) == [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    assert miniature.ticks(0, 1100) == [0, 250, 500, 750, 1000, 1250]
    assert miniature.ticks(5, 5)[0] <= 5 <= miniature.ticks(5, 5)[-1]
