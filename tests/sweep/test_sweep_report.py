"""The sweep report from fabricated run directories: statistics against the statistics module, kNN curves (a
resumed run's repeated rows counted once), collapsed/failed/missing runs, timing kept apart, figures written."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from directpred.sweep import load_sweep, write_reports
from directpred.sweep.report import collect

REPO = Path(__file__).resolve().parents[2]


def _run(
    out: Path,
    cell: str,
    seed: int,
    *,
    knn: float,
    lin: float,
    best: float,
    curve: list[tuple[int, float]],
    collapsed: bool,
    ips: float,
    dim_collapsed: bool | None = None,
    hardware: dict | None = None,
) -> None:
    d = out / "runs" / cell / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(
        json.dumps(
            {
                "knn_top1": knn,
                "linear_top1": lin,
                "linear_top1_best": best,
                "collapsed": collapsed,
                "epochs": 3,
                "steps": 30,
                "images_per_second": ips,
                "wall_seconds": ips / 10,
                # None: a run from before the dimensional-collapse warning, whose summary has no such key
                **({} if dim_collapsed is None else {"dim_collapsed": dim_collapsed}),
                **({} if hardware is None else {"hardware": hardware}),  # None: a run from before it was recorded
            }
        )
    )
    rows = [{"kind": "train", "step": 1, "loss": 1.0}] + [{"kind": "eval", "epoch": e, "knn_top1": v} for e, v in curve]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "ev')  # torn last line


def _sweep_file(
    tmp_path: Path, tiny_folder: Path, seeds: list[int], variants: dict | None = None, paper: dict | None = None
) -> Path:
    """A sweep file over ``seeds``: ``variants`` (default: one cell ``a``, DirectPred) and optional ``paper``."""
    spec = {
        "base": str(REPO / "configs" / "cpu" / "quickstart.yaml"),
        "set": {"data.path": str(tiny_folder)},
        "variants": variants or {"a": {"predictor.name": "directpred"}},
        "seeds": seeds,
        **({"paper": paper} if paper else {}),
    }
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return sweep_file


XEON = {"cpu": "Intel(R) Xeon(R) Processor", "cpu_capability": "AVX512", "amx": True, "cpus": 2, "threads": 1}
H200 = {**XEON, "threads": 8, "gpu": "NVIDIA H200"}


def test_report_statistics_and_layout(tmp_path, tiny_folder):
    variants = {"a": {"predictor.name": "directpred"}, "b": {"predictor.name": "linear"}}
    paper = {"note": "Table X", "values": {"a": "80.5 +- 1.25"}}
    sweep_file = _sweep_file(tmp_path, tiny_folder, [0, 1, 2], variants, paper)
    sweep = load_sweep(sweep_file)
    out = tmp_path / "out"
    knn, lin, best = [50.0, 60.5, 58.25], [40.0, 41.0, 45.5], [42.0, 44.0, 47.0]
    for seed in range(3):
        # seed 1 was resumed after epoch 2: its epoch-2 row appears twice, the later one counts
        curve = [(1, 30.0 + seed), (2, 40.0 + seed)] + ([(2, 41.0 + seed)] if seed == 1 else [])
        _run(
            out,
            "a",
            seed,
            knn=knn[seed],
            lin=lin[seed],
            best=best[seed],
            curve=curve,
            collapsed=seed == 2,
            ips=100.0 * (seed + 1),
            dim_collapsed=seed != 2,
            hardware=XEON if seed < 2 else H200,
        )
    _run(out, "b", 0, knn=20.0, lin=21.0, best=22.0, curve=[(1, 20.0)], collapsed=False, ips=50.0)
    (out / "runs" / "b" / "seed1" / "checkpoints").mkdir(parents=True)
    (out / "runs" / "b" / "seed1" / "checkpoints" / "last.pt").write_bytes(b"")
    (out / "runs" / "b" / "seed1" / "failed.json").write_text(json.dumps({"returncode": 1, "last_line": "boom"}))
    res = write_reports(sweep, out)

    a, b = res["cells"]
    for key, vals in (("knn_top1", knn), ("linear_top1", lin), ("linear_top1_best", best)):
        mean, std = statistics.mean(vals), statistics.stdev(vals)
        assert a[key] == {"mean": pytest.approx(mean), "std": pytest.approx(std), "n": 3}
    assert a["knn_curve"] == [[1, 31.0, 3], [2, round((40 + 42 + 42) / 3, 4), 3]]
    assert (a["collapsed"], a["failed"], a["missing"], a["paper"]) == (1, [], [], {"mean": 80.5, "std": 1.25})
    assert (a["dim_collapsed"], b["dim_collapsed"]) == (2, None)  # b's run predates the warning: not "0 seen"
    assert (b["n"], b["knn_top1"], b["failed"], b["missing"]) == (1, {"mean": 20.0, "std": None, "n": 1}, [1], [2])
    assert [r["status"] for r in res["runs"]] == ["done"] * 4 + ["failed", "missing"]
    assert res["timing"]["cells"]["a"]["images_per_second"] == {"mean": 200.0, "std": 100.0, "n": 3}
    assert "images_per_second" not in json.dumps(res["cells"])  # timing only under "timing"

    md = (out / "results.md").read_text()
    assert f"| `a` | 3 | {statistics.mean(knn):.2f} ± {statistics.stdev(knn):.2f} |" in md
    assert "| `b` | 1 | 20.00 | 21.00 | 22.00 | – | 0 | – | 1 |" in md
    assert "| 80.50 ± 1.25 | 1 | 2 | 0 |" in md  # a: paper, collapsed, dim. collapsed, failed
    assert "## Missing runs\n\n- `runs/b/seed2`\n" in md
    assert "## Failed runs\n\n- `runs/b/seed1`: boom (log: `runs/b/seed1/sweep.log`)" in md
    assert md.index("## Timing") > md.index("## Failed runs") and "| `a` | 200 ± 100 | 20.0 ± 10.0 |" in md
    assert md.endswith(  # each finished run's machine, counted, after the timing table
        "Hardware of the finished runs:\n\n"
        "- Intel(R) Xeon(R) Processor (AVX512, AMX), 1 of 2 CPU threads: 2 runs\n"
        "- NVIDIA H200, Intel(R) Xeon(R) Processor (AVX512, AMX): 1 run\n"
        "- not recorded (runs from before summary.json named the hardware): 1 run\n"
    )
    assert [r["hardware"] for r in res["timing"]["runs"]][2:] == [
        "NVIDIA H200, Intel(R) Xeon(R) Processor (AVX512, AMX)",
        None,
    ]
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [r["cell"] for r in rows] == ["a", "b"] and rows[0]["paper_mean"] == "80.5000"
    assert [(r["collapsed"], r["dim_collapsed"]) for r in rows] == [("1", "2"), ("0", "")]
    assert list(rows[0])[-4:] == [
        "images_per_second_mean",
        "images_per_second_std",
        "wall_seconds_mean",
        "wall_seconds_std",
    ]
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG" and (out / "knn_curves.png").read_bytes()[
        :4
    ] == b"\x89PNG"
    # rebuilding from the same directories gives the same files
    before = (md, (out / "results.json").read_text(), (out / "results.csv").read_text())
    write_reports(sweep, out)
    assert before == (
        (out / "results.md").read_text(),
        (out / "results.json").read_text(),
        (out / "results.csv").read_text(),
    )


def test_an_unreadable_summary_is_a_failed_run_naming_the_file(tmp_path, tiny_folder):
    """A summary.json that is no JSON object (edited by hand, a bad copy) counts as failed, with the fix, instead
    of stopping the report with a JSONDecodeError."""
    sweep_file = _sweep_file(tmp_path, tiny_folder, [0, 1])
    out = tmp_path / "out"
    for seed in (0, 1):
        _run(out, "a", seed, knn=50.0 + seed, lin=40.0, best=41.0, curve=[(1, 30.0)], collapsed=False, ips=1.0)
    bad = out / "runs" / "a" / "seed1" / "summary.json"
    bad.write_text('{"knn_top1": 5')
    with pytest.warns(UserWarning, match="summary.json: unreadable"):
        res = write_reports(load_sweep(sweep_file), out)
    assert [r["status"] for r in res["runs"]] == ["done", "failed"]
    assert res["runs"][1]["error"] == f"{bad} is unreadable; remove it and run the sweep again"
    assert (res["cells"][0]["n"], res["cells"][0]["knn_top1"]["mean"], res["cells"][0]["failed"]) == (1, 50.0, [1])


def test_sweep_without_matplotlib_lists_only_the_files_it_wrote(tmp_path, tiny_folder, monkeypatch, capsys):
    """`directpred sweep` over finished runs, matplotlib missing: the reports line names the tables only, and the
    figures' extra is named once."""
    import sys

    from directpred.cli import main
    from directpred.config import dump_config

    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "base": str(REPO / "configs" / "cpu" / "quickstart.yaml"),
                "set": {"data.path": str(tiny_folder)},
                "variants": {"a": {"predictor.name": "directpred"}},
                "seeds": [0],
            }
        )
    )
    sweep, out = load_sweep(sweep_file), tmp_path / "out"
    _run(out, "a", 0, knn=50.0, lin=40.0, best=41.0, curve=[(1, 30.0)], collapsed=False, ips=1.0)
    (out / sweep.runs()[0].rel_dir / "config.yaml").write_text(dump_config(sweep.config(sweep.runs()[0])))
    plotting = ("matplotlib.", "directpred.diagnostics.plots")
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith(plotting)]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["sweep", str(sweep_file), "--out", str(out), "--devices", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "0 to start" in captured.out  # the run was found done: nothing trained
    assert captured.out.splitlines()[-1] == f"reports: {out / 'results.md'}, results.csv, results.json"
    assert captured.err.count("pip install matplotlib (or, in a clone of directpred, pip install -e '.[plot]')") == 1
    assert not (out / "results.png").exists() and not (out / "knn_curves.png").exists()
    assert (out / "results.csv").is_file() and (out / "results.json").is_file()


def test_tables_round_once():
    """37.3450004 is 37.35: rounded to 4 decimals first (37.3450) it was printed 37.34."""
    from directpred.sweep.report import _pm, _stats

    assert _pm(_stats([37.3450004, 37.3450004])) == "37.35 ± 0.00"


def test_a_flag_count_needs_a_verdict_from_every_finished_seed():
    """A cell mixing runs from before the dimensional-collapse warning with newer ones shows "–", not a count that
    reads the old runs as "not flagged"."""
    from directpred.sweep.report import _flagged

    new, old = {"dim_collapsed": True, "collapsed": False}, {"collapsed": False}
    assert _flagged([new, {**new, "dim_collapsed": False}], "dim_collapsed") == 1
    assert _flagged([new, old], "dim_collapsed") is None and _flagged([new, old], "collapsed") == 0
    assert _flagged([], "collapsed") is None


def _strict(text: str) -> object:
    """Parse ``text`` as strict JSON: bare NaN/Infinity (Python's default output) raise."""

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_report_leaves_nonfinite_runs_out_of_the_means(tmp_path, tiny_folder):
    """A run whose features held NaN (its summary: null in strict JSON, or bare NaN from an older version) is listed,
    not averaged: one NaN would otherwise make the cell's mean NaN, and results.json would not be strict JSON."""
    sweep_file = _sweep_file(tmp_path, tiny_folder, [0, 1, 2])
    out = tmp_path / "out"
    _run(out, "a", 0, knn=50.0, lin=40.0, best=42.0, curve=[(1, 30.0)], collapsed=False, ips=10.0)
    # seed 1's first epoch was still finite: its curve is left out too, so that the curve's n is the means' n
    _run(
        out, "a", 1, knn=float("nan"), lin=float("nan"), best=float("nan"), curve=[(1, 90.0)], collapsed=True, ips=10.0
    )
    _run(out, "a", 2, knn=54.0, lin=44.0, best=46.0, curve=[(1, 32.0)], collapsed=False, ips=10.0)
    summary = out / "runs" / "a" / "seed2" / "summary.json"  # seed 2 as this version writes it: NaN as null
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "linear_top1": None}))
    res = write_reports(load_sweep(sweep_file), out)

    (a,) = res["cells"]
    assert (a["n"], a["nonfinite"]) == (3, [1])
    assert a["knn_top1"] == {"mean": 52.0, "std": pytest.approx(statistics.stdev([50.0, 54.0])), "n": 2}
    assert a["linear_top1"] == {"mean": 40.0, "std": None, "n": 1}  # seed 2's null is left out, not counted as 0
    assert a["knn_curve"] == [[1, 31.0, 2]]
    assert _strict((out / "results.json").read_text())["cells"][0]["nonfinite"] == [1]
    md = (out / "results.md").read_text()
    assert "`runs/a/seed1`: no accuracy; left out of the means and kNN curves" in md
    assert "seed0`: no accuracy" not in md and "seed2`: no accuracy" not in md
    (row,) = csv.DictReader(io.StringIO((out / "results.csv").read_text()))
    assert (row["n"], row["nonfinite"], row["knn_top1_mean"]) == ("3", "1", "52.0000")


def test_atomic_write_json_is_strict(tmp_path):
    """summary.json and the other JSON files a run writes hold null where Python would write bare NaN/Infinity."""
    from directpred.train.checkpoint import atomic_write_json

    obj = {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": {"d": (2, float("nan"))}, "e": "NaN"}
    atomic_write_json(tmp_path / "x.json", obj)
    assert _strict((tmp_path / "x.json").read_text()) == {
        "a": None,
        "b": [1.5, None, None],
        "c": {"d": [2, None]},
        "e": "NaN",
    }


def test_report_names_files_relative_to_the_working_directory(tmp_path, tiny_folder, monkeypatch):
    """A committed report names ``configs/cpu/quickstart.yaml``, not the absolute path of the clone it ran in; a file
    outside the working directory keeps its path."""
    sweep_file = _sweep_file(tmp_path, tiny_folder, [0])
    monkeypatch.chdir(REPO)
    res = collect(load_sweep(sweep_file), tmp_path / "out")
    assert res["base"] == "configs/cpu/quickstart.yaml"
    assert res["file"] == str(sweep_file)  # tmp_path lies outside the repository
    monkeypatch.chdir(tmp_path)
    assert collect(load_sweep(Path("s.yaml")), tmp_path / "out")["file"] == "s.yaml"
    assert collect(load_sweep(sweep_file), tmp_path / "out")["file"] == "s.yaml"


def test_a_finished_run_that_no_longer_matches_the_sweep_is_out_of_date_not_averaged(tmp_path, tiny_folder):
    """The report counted every run with a summary.json: runs of 1 epoch were averaged as a cell the sweep file
    asks 2 epochs of (with the paper's figure beside them), and a sweep interrupted while lengthening its runs
    averaged short and long runs in one cell. Now such a run is out of date: listed with the reason, left out of
    the means (as the sweep itself would resume it). The --set overrides and the runs' commits are stated."""
    from directpred.config import dump_config

    sweep_file = _sweep_file(tmp_path, tiny_folder, [0, 1])
    out = tmp_path / "out"
    one_epoch = load_sweep(sweep_file)
    for seed, knn in ((0, 50.0), (1, 60.0)):
        _run(out, "a", seed, knn=knn, lin=40.0, best=41.0, curve=[(1, knn)], collapsed=False, ips=100.0)
        run_dir = out / "runs" / "a" / f"seed{seed}"
        (run_dir / "config.yaml").write_text(dump_config(one_epoch.config(one_epoch.runs()[seed])))
        summary = json.loads((run_dir / "summary.json").read_text())
        summary |= {"epochs": 1, "steps": 8, "git_commit": f"{seed}abcdef0123456789"}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    res = write_reports(one_epoch, out)
    assert [r["status"] for r in res["runs"]] == ["done", "done"] and res["cells"][0]["n"] == 2
    assert res["overrides"] == [] and "--set" not in (out / "results.md").read_text().split("\n\n")[1]
    assert (
        (out / "results.md")
        .read_text()
        .endswith("Code of the finished runs (`git_commit`):\n\n- `0abcdef`: 1 run\n- `1abcdef`: 1 run\n")
    )

    # Seed 1 lengthened to 2 epochs: the sweep asking 2 epochs reports it alone.
    two = load_sweep(sweep_file, ["train.epochs=2"])
    seed1 = out / "runs" / "a" / "seed1"
    (seed1 / "config.yaml").write_text(dump_config(two.config(two.runs()[1])))
    summary = json.loads((seed1 / "summary.json").read_text())
    (seed1 / "summary.json").write_text(json.dumps(summary | {"epochs": 2, "steps": 16}))
    res = write_reports(two, out)
    assert [r["status"] for r in res["runs"]] == ["stale", "done"]
    assert res["runs"][0]["reason"] == "it trained 8 steps and the sweep asks for 16"
    (cell,) = res["cells"]
    assert (cell["n"], cell["knn_top1"]["mean"], cell["stale"], cell["missing"]) == (1, 60.0, [0], [])
    md = (out / "results.md").read_text()
    assert "2 runs (1 done, 0 failed, 0 missing, 1 out of date). Every cell with `--set` `train.epochs=2`." in md
    assert "## Runs out of date\n\n" in md and "- `runs/a/seed0`: it trained 8 steps and the sweep asks for 16" in md
    (row,) = csv.DictReader(io.StringIO((out / "results.csv").read_text()))
    assert (row["n"], row["stale"]) == ("1", "1")
    # A run made with another configuration (another learning rate) is out of date too, with the reason.
    other = load_sweep(sweep_file, ["train.epochs=2", "optim.lr=0.1"])
    res = write_reports(other, out)
    assert [r["status"] for r in res["runs"]] == ["stale", "stale"] and res["cells"][0]["n"] == 0
    assert "optim.lr: 0.03 in the run, 0.1 in the sweep" in res["runs"][1]["reason"]


def test_the_gain_over_the_untrained_network_is_paired_by_seed(tmp_path, tiny_folder):
    """Runs with eval.untrained: the report gives each cell's untrained linear best and the gains, as the mean and
    std of the per-seed differences (not the difference of the means' stds); runs without it leave the columns out."""
    sweep = load_sweep(_sweep_file(tmp_path, tiny_folder, [0, 1, 2]))
    out = tmp_path / "out"
    knn, best = [36.0, 35.0, 38.0], [37.0, 36.5, 39.0]
    u_knn, u_best = [31.0, 29.5, 33.5], [33.0, 32.5, 36.0]
    for seed in range(3):
        _run(out, "a", seed, knn=knn[seed], lin=best[seed], best=best[seed], curve=[], collapsed=False, ips=1.0)
        d = out / "runs" / "a" / f"seed{seed}" / "summary.json"
        extra = {"untrained_knn_top1": u_knn[seed], "untrained_linear_top1_best": u_best[seed]}
        d.write_text(json.dumps(json.loads(d.read_text()) | extra))
    (cell,) = write_reports(sweep, out)["cells"]
    gains = [b - u for b, u in zip(best, u_best)]
    assert cell["gain_linear_top1_best"] == {
        "mean": pytest.approx(statistics.mean(gains)),
        "std": pytest.approx(statistics.stdev(gains)),
        "n": 3,
    }
    assert cell["gain_knn_top1"]["mean"] == pytest.approx(statistics.mean(k - u for k, u in zip(knn, u_knn)))
    assert cell["gain_knn_top1"]["std"] == pytest.approx(statistics.stdev(k - u for k, u in zip(knn, u_knn)))
    md = (out / "results.md").read_text()
    assert "| untrained kNN | untrained linear best | gain kNN | gain linear best |" in md
    row = f"| {statistics.mean(u_best):.2f} ± {statistics.stdev(u_best):.2f} | "
    assert row + f"{statistics.mean(k - u for k, u in zip(knn, u_knn)):.2f} ± " in md
    (csv_row,) = csv.DictReader(io.StringIO((out / "results.csv").read_text()))
    assert float(csv_row["gain_linear_top1_best_mean"]) == pytest.approx(statistics.mean(gains), abs=1e-4)
    assert csv_row["gain_linear_top1_mean"] == ""  # no untrained linear top-1 recorded
    assert [r["untrained_linear_top1_best"] for r in write_reports(sweep, out)["runs"]] == u_best

    # A seed without the untrained figure (run without eval.untrained): the untrained column and the gains are over
    # the same two seeds, and say so.
    d = out / "runs" / "a" / "seed2" / "summary.json"
    d.write_text(json.dumps({k: v for k, v in json.loads(d.read_text()).items() if not k.startswith("untrained")}))
    (cell,) = write_reports(sweep, out)["cells"]
    assert cell["n"] == 3 and cell["untrained_linear_top1_best"]["mean"] == pytest.approx(statistics.mean(u_best[:2]))
    assert cell["gain_linear_top1_best"]["mean"] == pytest.approx(statistics.mean(gains[:2]))
    assert (
        f"{statistics.mean(u_best[:2]):.2f} ± {statistics.stdev(u_best[:2]):.2f} (n = 2) |"
        in (out / "results.md").read_text()
    )


def test_an_extended_runs_earlier_final_row_is_not_a_point_of_the_knn_curve(tmp_path, tiny_folder):
    """A finished run extended (1 epoch, then 3) keeps its first final evaluation's row (step 10, epoch 1) in
    metrics.jsonl: it was read as an epoch-1 point, which the same run made in one go has not (whose epoch-1 kNN is
    not evaluated: a periodic kNN every 2 epochs here), so two sweeps of equal runs gave different curves."""
    out = tmp_path / "out"
    for seed in (0, 1):
        _run(out, "a", seed, knn=50.0, lin=40.0, best=41.0, curve=[(2, 45.0)], collapsed=False, ips=1.0)
        rows = [{"kind": "final", "step": 30, "epoch": 3, "knn_top1": 50.0}]
        if seed == 1:  # the extended one
            rows.insert(0, {"kind": "final", "step": 10, "epoch": 1, "knn_top1": 33.0})
        metrics = out / "runs" / "a" / f"seed{seed}" / "metrics.jsonl"
        kept = metrics.read_text().splitlines()[:-1]  # without _run's torn last line
        metrics.write_text("".join(line + "\n" for line in kept) + "".join(json.dumps(r) + "\n" for r in rows))
    res = write_reports(load_sweep(_sweep_file(tmp_path, tiny_folder, [0, 1])), out)
    assert res["cells"][0]["knn_curve"] == [[2, 45.0, 2], [3, 50.0, 2]]


def test_the_report_shows_the_processes_of_runs_made_under_torchrun(tmp_path, tiny_folder):
    out = tmp_path / "out"
    for seed in (0, 1):
        _run(out, "a", seed, knn=50.0, lin=40.0, best=41.0, curve=[(3, 50.0)], collapsed=False, ips=1.0)
    summary = out / "runs" / "a" / "seed1" / "summary.json"
    summary.write_text(json.dumps(json.loads(summary.read_text()) | {"world_size": 2}))
    write_reports(load_sweep(_sweep_file(tmp_path, tiny_folder, [0, 1])), out)
    md = (out / "results.md").read_text()
    assert "Processes per run (the global batch is `train.batch_size` times these):\n\n- 1: 1 run\n- 2: 1 run\n" in md
