"""`directpred sweep` end to end on a tiny network: 2 cells x 2 seeds (two at a time), a SIGKILL of the sweep in the
middle of a run and a rerun that finishes only what is missing (the report equals an uninterrupted sweep's),
`--report` on the partial sweep, and a failing run that is recorded without stopping the others."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from directpred.cli import main
from directpred.config import parse_override

REPO = Path(__file__).resolve().parents[2]
RUNS = [("directpred", 0), ("linear", 0), ("directpred", 1), ("linear", 1)]  # the order the sweep runs them in


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }


def _sweep_file(tmp_path: Path, overrides: list[str], variants: dict, seeds: list[int]) -> Path:
    common = dict(parse_override(t) for t in overrides)
    common.update({"train.epochs": 2, "eval.knn_every": 1, "eval.linear": True, "eval.linear_epochs": 3})
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(REPO / "configs" / "cpu" / "quickstart.yaml"),
                "set": common,
                "variants": variants,
                "seeds": seeds,
                "paper": {"note": "made-up numbers", "values": {"directpred": "77.86 +- 0.16"}},
            },
            sort_keys=False,
        )
    )
    return path


def _sweep(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "directpred", "sweep", *args, "--devices", "cpu"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def _accuracy_reports(out: Path) -> tuple[dict, str, list[list[str]]]:
    """results.json without its timing, results.md above its timing table, results.csv without timing columns."""
    res = json.loads((out / "results.json").read_text())
    del res["timing"]
    md = (out / "results.md").read_text().split("## Timing")[0]
    rows = list(csv.reader(io.StringIO((out / "results.csv").read_text())))
    keep = [i for i, name in enumerate(rows[0]) if not name.startswith(("images_per_second", "wall_seconds"))]
    return res, md, [[r[i] for i in keep] for r in rows]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and PR_SET_PDEATHSIG")
def test_kill_and_rerun_equals_uninterrupted(tmp_path, tiny_overrides):
    sweep = _sweep_file(
        tmp_path,
        tiny_overrides,
        {"directpred": {"predictor.name": "directpred"}, "linear": {"predictor.name": "linear"}},
        [0, 1],
    )
    ref = tmp_path / "ref"
    proc = _sweep(str(sweep), "--out", str(ref), "--jobs", "2")  # two at a time: the same results
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("start ") == 4 and proc.stdout.count("done  ") == 4

    # The same sweep, killed outright while a later run is between its first checkpoint and its summary.
    out = tmp_path / "out"
    victim = subprocess.Popen(
        [sys.executable, "-m", "directpred", "sweep", str(sweep), "--out", str(out), "--devices", "cpu"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_at, deadline = None, time.time() + 200
    while killed_at is None and victim.poll() is None and time.time() < deadline:
        for cell, seed in RUNS[1:]:
            d = out / "runs" / cell / f"seed{seed}"
            if (d / "checkpoints" / "last.pt").is_file() and not (d / "summary.json").is_file():
                children = _children(victim.pid)
                os.kill(victim.pid, signal.SIGKILL)
                killed_at = (cell, seed)
                break
        time.sleep(0.01)
    victim.wait()
    assert killed_at is not None, "the sweep ended before a run could be interrupted"
    for pid in children:  # the running `directpred train` died with the sweep (no leftover writer)
        for _ in range(500):
            if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"child {pid} outlived the killed sweep")
    k = RUNS.index(killed_at)
    done_before = {r: (out / "runs" / r[0] / f"seed{r[1]}" / "summary.json").stat().st_mtime_ns for r in RUNS[:k]}
    assert all((out / "runs" / c / f"seed{s}" / "summary.json").is_file() is False for c, s in RUNS[k:])

    # --report on the partial sweep: n per cell and the missing runs listed.
    assert main(["sweep", str(sweep), "--out", str(out), "--report"]) == 0
    res = json.loads((out / "results.json").read_text())
    status = {r: "done" if i < k else "incomplete" if i == k else "missing" for i, r in enumerate(RUNS)}
    assert {(r["cell"], r["seed"]): r["status"] for r in res["runs"]} == status
    assert [c["n"] for c in res["cells"]] == [
        sum(cell == name and st == "done" for (cell, _), st in status.items()) for name in ("directpred", "linear")
    ]
    md = (out / "results.md").read_text()
    expected = [
        f"- `runs/{c}/seed{s}`" + (" (checkpoint, not finished)" if status[c, s] == "incomplete" else "")
        for c, s in sorted(RUNS)
        if status[c, s] != "done"
    ]  # the report lists runs cell by cell
    assert md.split("## Missing runs\n\n")[1].split("\n\n")[0].splitlines() == expected
    assert f"{len(RUNS)} runs ({k} done, 0 failed, {4 - k} missing)" in md

    # The rerun: finished runs skipped (summaries untouched), the interrupted one resumed, the rest started.
    proc = _sweep(str(sweep), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r, mtime in done_before.items():
        assert (out / "runs" / r[0] / f"seed{r[1]}" / "summary.json").stat().st_mtime_ns == mtime
    assert f"{killed_at[0]} seed {killed_at[1]} (resume, cpu)" in proc.stdout
    assert proc.stdout.count("(new, cpu)") == 3 - k and proc.stdout.count("start ") == 4 - k
    command_lines = (out / "runs" / killed_at[0] / f"seed{killed_at[1]}" / "command.txt").read_text().splitlines()
    assert len(command_lines) == 2 and "--resume" in command_lines[1]
    assert _accuracy_reports(out) == _accuracy_reports(ref)
    res = json.loads((out / "results.json").read_text())
    assert all(c["knn_curve"] and [p[0] for p in c["knn_curve"]] == [1, 2] for c in res["cells"])
    assert res["cells"][0]["paper"] == {"mean": 77.86, "std": 0.16}
    assert (out / "results.png").stat().st_size > 0 and (out / "knn_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_others_run(tmp_path, tiny_overrides):
    # batch 256 > the 128 training images: the config validates, the run fails when it sees the data.
    sweep = _sweep_file(tmp_path, tiny_overrides, {"toobig": {"train.batch_size": 256}, "directpred": {}}, [0])
    out = tmp_path / "out"
    proc = _sweep(str(sweep), "--out", str(out))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/2] FAILED toobig seed 0" in proc.stdout and "[2/2] done   directpred seed 0" in proc.stdout
    failed = json.loads((out / "runs" / "toobig" / "seed0" / "failed.json").read_text())
    assert failed["returncode"] == 2 and "larger than the 128 training images" in failed["last_line"]
    assert "larger than the 128 training images" in (out / "runs" / "toobig" / "seed0" / "sweep.log").read_text()
    res = json.loads((out / "results.json").read_text())
    assert [(c["cell"], c["n"], c["failed"]) for c in res["cells"]] == [("toobig", 0, [0]), ("directpred", 1, [])]
    md = (out / "results.md").read_text()
    assert "## Failed runs\n\n- `runs/toobig/seed0`: directpred: config error: train.batch_size=256" in md


def test_finish_line_reads_strict_json_summaries(tmp_path):
    """The sweep's "done" line from a summary.json as this version writes it: null accuracies (non-finite
    features) are said to be nan, the linear probe's null (eval.linear=false) is left out, the flags are shown."""
    from directpred.sweep.runner import Plan, _finish_line

    def line(**summary: object) -> str:
        (tmp_path / "summary.json").write_text(json.dumps(summary))
        return _finish_line(Plan(run=None, run_dir=tmp_path, action="done"))  # type: ignore[arg-type]

    assert line(knn_top1=36.154, linear_top1=35.7, linear_top1_best=35.73, dim_collapsed=True) == (
        "kNN 36.15%, linear 35.70%, best 35.73% [dim. collapsed]"
    )
    assert line(knn_top1=40.0, linear_top1=None, linear_top1_best=None, collapsed=False) == "kNN 40.00%"
    assert line(knn_top1=None, linear_top1=None, linear_top1_best=None, collapsed=True) == (
        "kNN nan (non-finite features) [collapsed]"
    )


def test_a_failed_runs_reason_is_the_clis_error_not_torchruns_banner(tmp_path):
    """Under --torchrun a failed run's log ends with torchrun's summary of the failed ranks, framed by ==== lines:
    that banner was the reason shown for every failed run (FAILED line, failed.json, the report)."""
    from directpred.sweep.runner import _last_line

    log = tmp_path / "sweep.log"
    banner = ["=" * 60, "directpred FAILED", "-" * 60, "Failures:", "  <NO_OTHER_FAILURES>", "=" * 60]
    error = "directpred: config error: the checkpoint is at step 129, past train.epochs=10"
    log.write_text("\n".join(["step 1", error, "[rank1]: " + error, *banner]) + "\n")
    assert _last_line(log) == error
    # an earlier attempt's error far above a crash without one: the crash's last line
    log.write_text("\n".join([error, *(f"line {i}" for i in range(50)), "RuntimeError: boom"]) + "\n")
    assert _last_line(log) == "RuntimeError: boom"
