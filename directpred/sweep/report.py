"""The sweep's tables and figures, rebuilt from what the run directories hold (also for a partial sweep).

``results.json`` keeps accuracies (``cells``, ``runs``) apart from wall-clock figures and provenance (``timing``: each
run's hardware and commit); ``results.md`` puts its timing table last, under ``## Timing``, with the hardware and
code of the runs; ``results.csv`` has its timing columns last. Two sweeps whose runs give
equal results therefore write equal reports once the timing parts are cut off. Ordering follows the sweep file.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from directpred.config import install_hint, read_json_object, strict_json
from directpred.sweep.spec import Run, Sweep

METRICS = (("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1"), ("linear_top1_best", "linear best"))
TIMING = (("images_per_second", "images/s"), ("wall_seconds", "wall s"))
# eval.untrained's columns of results.csv (empty for runs without it)
GAIN_KEYS = [f"{kind}_{k}" for kind in ("untrained", "gain") for k, _ in METRICS]
METRIC_NOTE = (
    "Accuracies in % on the test split, mean ± std over seeds (sample std, n-1), n = finished seeds. "
    "kNN: weighted kNN on the frozen backbone at the end of training. linear top-1: the linear probe's "
    "final epoch. linear best: the best test accuracy over the probe's epochs, which is what the "
    "authors' code reports and what the paper's tables give, so the paper column sits beside it. "
    "collapsed: seeds whose run the collapse detector flagged. dim. collapsed: seeds whose run the "
    "dimensional-collapse warning flagged. Both show – unless every finished seed recorded a verdict (runs from "
    "before a detector existed have none)."
)


GAIN_NOTE = (
    "untrained: the same seed's network at its initialisation (eval.untrained), by the same protocol. gain: trained "
    "minus untrained, paired by seed, mean ± std of the differences. Both over the seeds with the trained and the "
    "untrained figure; (n = k) where that is fewer than the cell's n."
)
GAIN_COLUMNS = ("untrained_knn_top1", "untrained_linear_top1_best", "gain_knn_top1", "gain_linear_top1_best")


def _n_unless(stat: dict[str, Any] | None, n: int) -> str:
    """`` (n = k)`` after a paired figure over fewer seeds than the cell's finished ones."""
    k = (stat or {}).get("n") or 0
    return f" (n = {k})" if 0 < k < n else ""


def _finite(v: Any) -> bool:
    """A number to average: not None (a non-finite value in a strict-JSON summary) nor NaN/inf (older summaries)."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    # Unrounded: the tables round once, when they format (rounded here to 4 decimals first, 37.3450 printed 37.34
    # where the runs' mean, 37.3450004, is 37.35).
    return {"mean": mean, "std": std, "n": n}


def _knn_curve(run_dir: Path, steps: Any = None) -> dict[int, float]:
    """kNN top-1 by epoch from ``metrics.jsonl`` (``eval`` rows, and the ``final`` row at the run's last step,
    ``steps``: a run extended after it finished keeps its earlier final evaluation's row, which an uninterrupted run
    has not); rows repeated by a resume count once (the last one)."""
    from directpred.train.logger import read_metrics

    curve = {}
    for row in read_metrics(run_dir):
        final_here = row.get("kind") == "final" and (steps is None or row.get("step") == steps)
        if (row.get("kind") == "eval" or final_here) and row.get("knn_top1") is not None:
            curve[int(row["epoch"])] = float(row["knn_top1"])
    return curve


def _run_status(run_dir: Path) -> str:
    if (run_dir / "summary.json").is_file():
        return "done"
    if (run_dir / "failed.json").is_file():
        return "failed"
    return "incomplete" if (run_dir / "checkpoints" / "last.pt").is_file() else "missing"


def _flagged(done: list[dict[str, Any]], key: str) -> int | None:
    """How many finished runs a detector flagged; None unless every finished run recorded that detector's verdict
    (a run from before the detector existed, or with it off, is not "not flagged")."""
    return sum(bool(s[key]) for s in done) if done and all(key in s for s in done) else None


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory where it lies under it (``configs/cpu/quickstart.yaml``, the
    same on every clone), else as given: a report names files the way its reader can find them."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _machine(summary: dict[str, Any]) -> str | None:
    """One line for the hardware a run recorded (``summary.json``'s ``hardware``; None for runs from before it)."""
    from directpred.runtime import hardware_text  # here: runtime imports torch, which a sweep's start avoids

    hw = summary.get("hardware")
    return hardware_text(hw) if isinstance(hw, dict) else None


def _out_of_date(sweep: Sweep, run: Run, run_dir: Path) -> str | None:
    """Why the finished run in ``run_dir`` does not stand for ``run`` as the sweep file and ``--set`` now describe
    it (the sweep would resume it, or refuses it), or None. A run directory without a ``config.yaml`` (fabricated,
    or from before runs recorded one) is not judged."""
    from directpred.config import ConfigError, read_run_config
    from directpred.sweep.runner import finished_run_todo

    if not (run_dir / "config.yaml").is_file():
        return None
    try:
        return finished_run_todo(run_dir, read_run_config(run_dir), sweep.config(run))
    except ConfigError as exc:
        return str(exc)


def _short_commit(commit: Any) -> str | None:
    """``git_commit`` of a summary as the report shows it: 7 hex digits, ``+dirty`` kept (None: not recorded)."""
    if not isinstance(commit, str) or not commit:
        return None
    sha, dirty, _ = commit.partition("+dirty")
    return sha[:7] + ("+dirty" if dirty else "")


def collect(sweep: Sweep, out: Path) -> dict[str, Any]:
    """Everything the reports show, as a JSON-ready dict (accuracies under ``cells``/``runs``, times under
    ``timing``). A finished run that no longer matches the sweep (another length, evaluation, precision or
    configuration than the sweep file and ``--set`` give its cell) is ``stale``: listed with the reason, left out of
    the means."""
    runs, cells, timing_cells, timing_runs = [], [], {}, []
    run_of = {(r.cell, r.seed): r for r in sweep.runs()}
    for cell in sweep.cells:
        done: list[dict[str, Any]] = []
        curves, status_of, nonfinite = [], {}, []
        for seed in sweep.seeds:
            run_dir = out / "runs" / cell / f"seed{seed}"
            status = status_of[seed] = _run_status(run_dir)
            row: dict[str, Any] = {"cell": cell, "seed": seed, "status": status}
            s = read_json_object(run_dir / "summary.json", "that run counts as failed") if status == "done" else None
            stale = _out_of_date(sweep, run_of[cell, seed], run_dir) if s is not None else None
            if status == "done" and s is None:
                status = status_of[seed] = row["status"] = "failed"
                row["error"] = f"{run_dir / 'summary.json'} is unreadable; remove it and run the sweep again"
            elif stale is not None:
                status = status_of[seed] = row["status"] = "stale"
                row["reason"] = stale
            elif s is not None:  # done, readable, and the cell's run
                row.update({k: s.get(k) for k, _ in METRICS})
                row.update({f"untrained_{k}": s[f"untrained_{k}"] for k, _ in METRICS if f"untrained_{k}" in s})
                row.update(collapsed=s.get("collapsed"), dim_collapsed=s.get("dim_collapsed"))
                row.update(epochs=s.get("epochs"), steps=s.get("steps"))
                done.append(s)
                if "knn_top1" in s and not _finite(s["knn_top1"]):  # always evaluated: null/NaN = non-finite
                    nonfinite.append(seed)
                else:  # a diverged run's earlier, finite epochs are left out of the curve too
                    curves.append(_knn_curve(run_dir, s.get("steps")))
                timing_runs.append(
                    {
                        "cell": cell,
                        "seed": seed,
                        **{k: s.get(k) for k, _ in TIMING},
                        "hardware": _machine(s),
                        "commit": _short_commit(s.get("git_commit")),
                        "processes": s.get("world_size", 1),
                    }
                )
            elif status == "failed":
                row["error"] = (read_json_object(run_dir / "failed.json", "its error is not shown") or {}).get(
                    "last_line", ""
                )
            runs.append(row)
        epochs = sorted({e for c in curves for e in c})
        entry: dict[str, Any] = {
            "cell": cell,
            "n": len(done),
            **{k: _stats([s[k] for s in done if _finite(s.get(k))]) for k, _ in METRICS},
            # eval.untrained: each seed's untrained network, and the gain over it, both over the seeds that have the
            # trained and the untrained figure (paired: the columns then describe the same runs)
            **{
                f"{kind}_{k}": _stats(
                    [
                        s[f"untrained_{k}"] if kind == "untrained" else s[k] - s[f"untrained_{k}"]
                        for s in done
                        if _finite(s.get(k)) and _finite(s.get(f"untrained_{k}"))
                    ]
                )
                for kind in ("untrained", "gain")
                for k, _ in METRICS
            },
            "nonfinite": nonfinite,  # seeds whose features held NaN or inf
            # None where no run had the collapse detector on (diag.every=0): "no collapse seen" would mislead
            "collapsed": _flagged(done, "collapsed"),
            "dim_collapsed": _flagged(done, "dim_collapsed"),  # None too for runs before the warning existed
            "failed": [s for s, st in status_of.items() if st == "failed"],
            "missing": [s for s, st in status_of.items() if st in ("missing", "incomplete")],
            "stale": [s for s, st in status_of.items() if st == "stale"],  # finished, but not as the sweep asks
            "paper": None,
            "knn_curve": [],
        }
        if cell in sweep.paper:
            entry["paper"] = {"mean": sweep.paper[cell].mean, "std": sweep.paper[cell].std}
        for e in epochs:
            vals = [c[e] for c in curves if e in c]
            entry["knn_curve"].append([e, round(sum(vals) / len(vals), 4), len(vals)])
        cells.append(entry)
        timing_cells[cell] = {k: _stats([s[k] for s in done if s.get(k) is not None]) for k, _ in TIMING}
    return {
        "sweep": sweep.name,
        "file": shown_path(sweep.path),
        "base": shown_path(sweep.base),
        "seeds": sweep.seeds,
        "overrides": list(sweep.overrides),  # the command line's --set, applied to every cell
        "metric_note": METRIC_NOTE,
        "paper_note": sweep.paper_note,
        "cells": cells,
        "runs": runs,
        "timing": {"cells": timing_cells, "runs": timing_runs},
    }


def _pm(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{digits}f}" + ("" if stat.get("std") is None else f" ± {stat['std']:.{digits}f}")


def markdown(res: dict[str, Any]) -> str:
    """``results.md``: accuracy table, missing and failed runs, then (last) the timing table."""
    runs = res["runs"]
    count = {s: sum(r["status"] == s for r in runs) for s in ("done", "failed", "incomplete", "missing", "stale")}
    overrides = res.get("overrides") or []
    lines = [
        f"# Sweep `{res['sweep']}`",
        "",
        f"Sweep file `{res['file']}`, base config `{res['base']}`, seeds {res['seeds']}: {len(res['cells'])} "
        f"cells, {len(runs)} runs ({count['done']} done, {count['failed']} failed, "
        f"{count['incomplete'] + count['missing']} missing"
        + (f", {count['stale']} out of date" if count["stale"] else "")
        + ")."
        + (" Every cell with `--set` " + ", ".join(f"`{o}`" for o in overrides) + "." if overrides else ""),
        "",
        res["metric_note"],
    ]
    has_paper = any(c["paper"] for c in res["cells"])
    if has_paper:
        lines += ["", f"Paper: {res['paper_note']}"]
    has_gain = any(
        c.get("gain_linear_top1_best", {}).get("n") or c.get("gain_knn_top1", {}).get("n") for c in res["cells"]
    )
    if has_gain:
        lines += ["", GAIN_NOTE]
    head = (
        ["cell", "n"]
        + [label for _, label in METRICS]
        + (["paper"] if has_paper else [])
        + (["untrained kNN", "untrained linear best", "gain kNN", "gain linear best"] if has_gain else [])
        + ["collapsed", "dim. collapsed", "failed"]
    )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in res["cells"]:
        paper = [_pm(c["paper"])] if has_paper else []
        gains = [_pm(c.get(k)) + _n_unless(c.get(k), c["n"]) for k in GAIN_COLUMNS] if has_gain else []
        row = (
            [f"`{c['cell']}`", str(c["n"])]
            + [_pm(c[k]) for k, _ in METRICS]
            + paper
            + gains
            + ["–" if c[k] is None else str(c[k]) for k in ("collapsed", "dim_collapsed")]
            + [str(len(c["failed"]))]
        )
        lines.append("| " + " | ".join(row) + " |")
    missing = [r for r in runs if r["status"] in ("missing", "incomplete")]
    if missing:
        lines += ["", "## Missing runs", ""] + [
            f"- `runs/{r['cell']}/seed{r['seed']}`"
            + (" (checkpoint, not finished)" if r["status"] == "incomplete" else "")
            for r in missing
        ]
    stale = [r for r in runs if r["status"] == "stale"]
    if stale:
        lines += ["", "## Runs out of date", ""]
        lines += ["Finished, but not as the sweep file and `--set` now ask; left out of the means.", ""]
        lines += [f"- `runs/{r['cell']}/seed{r['seed']}`: {r['reason']}" for r in stale]
    nonfinite = [(c["cell"], seed) for c in res["cells"] for seed in c["nonfinite"]]
    if nonfinite:
        lines += ["", "## Runs whose features held NaN or inf", ""]
        lines += [
            f"- `runs/{cell}/seed{s}`: no accuracy; left out of the means and kNN curves" for cell, s in nonfinite
        ]
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""] + [
            f"- `runs/{r['cell']}/seed{r['seed']}`: {r.get('error') or 'see its sweep.log'} "
            f"(log: `runs/{r['cell']}/seed{r['seed']}/sweep.log`)"
            for r in failed
        ]
    lines += [
        "",
        "## Timing",
        "",
        "Mean ± std over finished seeds; images/s of the training steps; wall s: `summary.json`'s `wall_seconds`, "
        "from the first step to the end of the evaluation, over all of a run's resumes (start-up not counted: "
        "imports, data decoding, building the model).",
        "",
        "| cell | " + " | ".join(t for _, t in TIMING) + " |",
        "|---|" + "---|" * len(TIMING),
    ]
    for c in res["cells"]:
        t = res["timing"]["cells"][c["cell"]]
        lines.append(
            f"| `{c['cell']}` | "
            + " | ".join(_pm(t[k], 0 if k == "images_per_second" else 1) for k, _ in TIMING)
            + " |"
        )
    machines: dict[str, int] = {}
    for r in res["timing"]["runs"]:
        name = r.get("hardware") or "not recorded (runs from before summary.json named the hardware)"
        machines[name] = machines.get(name, 0) + 1
    if machines:
        lines += ["", "Hardware of the finished runs:", ""]
        lines += [f"- {name}: {n} run{'s' * (n != 1)}" for name, n in machines.items()]
    processes = Counter(r.get("processes") or 1 for r in res["timing"]["runs"])
    if set(processes) - {1}:  # under --torchrun; mixed counts mean mixed global batches in one mean
        lines += ["", "Processes per run (the global batch is `train.batch_size` times these):", ""]
        lines += [f"- {w}: {n} run{'s' * (n != 1)}" for w, n in sorted(processes.items())]
    commits: dict[str, int] = {}
    for r in res["timing"]["runs"]:
        name = f"`{r['commit']}`" if r.get("commit") else "not recorded"
        commits[name] = commits.get(name, 0) + 1
    if len(commits) > 1 or any(c != "not recorded" for c in commits):
        lines += ["", "Code of the finished runs (`git_commit`):", ""]
        lines += [f"- {name}: {n} run{'s' * (n != 1)}" for name, n in commits.items()]
    return "\n".join(lines) + "\n"


def csv_text(res: dict[str, Any]) -> str:
    """``results.csv``: one row per cell; the timing columns come last."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    stat_cols = [f"{k}_{s}" for k, _ in METRICS for s in ("mean", "std")]
    time_cols = [f"{k}_{s}" for k, _ in TIMING for s in ("mean", "std")]
    w.writerow(
        [
            "cell",
            "n",
            *stat_cols,
            "paper_mean",
            "paper_std",
            "collapsed",
            "dim_collapsed",
            "failed",
            "missing",
            "nonfinite",
            "stale",
            *[f"{k}_{s}" for k in GAIN_KEYS for s in ("mean", "std")],
            *time_cols,
        ]
    )

    def f(v: Any) -> str:
        return "" if v is None else f"{v:.4f}"

    for c in res["cells"]:
        t = res["timing"]["cells"][c["cell"]]
        paper = c["paper"] or {}
        w.writerow(
            [
                c["cell"],
                c["n"],
                *[f(c[k][s]) for k, _ in METRICS for s in ("mean", "std")],
                f(paper.get("mean")),
                f(paper.get("std")),
                c["collapsed"],
                c["dim_collapsed"],
                len(c["failed"]),
                len(c["missing"]),
                len(c["nonfinite"]),
                len(c["stale"]),
                *[f(c[k][s]) for k in GAIN_KEYS for s in ("mean", "std")],
                *[f(t[k][s]) for k, _ in TIMING for s in ("mean", "std")],
            ]
        )
    return buf.getvalue()


def write_reports(sweep: Sweep, out: Path) -> dict[str, Any]:
    """Write ``results.{json,md,csv}`` into ``out``, and the figures ``results.png`` and ``knn_curves.png`` when
    matplotlib is installed (else a warning says so); returns the results dict."""
    from directpred.train.checkpoint import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    res = collect(sweep, out)
    atomic_write_text(out / "results.json", strict_json(res, indent=1) + "\n", retry="run the command again")
    atomic_write_text(out / "results.md", markdown(res), retry="run the command again")
    atomic_write_text(out / "results.csv", csv_text(res), retry="run the command again")
    if figures_available():
        from directpred.diagnostics.plots import sweep_figures

        sweep_figures(res, out)
    else:  # matplotlib is the `plot` extra: the tables do not need it
        warnings.warn(f"sweep figures skipped: they need matplotlib ({install_hint('plot')})", stacklevel=2)
    return res


def figures_available() -> bool:
    """Whether :func:`write_reports` draws ``results.png`` and ``knn_curves.png`` (matplotlib, the ``plot`` extra,
    is installed)."""
    try:
        import directpred.diagnostics.plots  # noqa: F401
    except ImportError:
        return False
    return True


def report_names(out: Path) -> list[str]:
    """The files :func:`write_reports` writes into ``out``, as ``directpred sweep`` lists them (the first with its
    folder): the tables, and the figures only when :func:`figures_available`."""
    figures = ["results.png", "knn_curves.png"] if figures_available() else []
    return [str(out / "results.md"), "results.csv", "results.json", *figures]
