"""Sweep files: strict validation (errors name the key or cell), cell names, --set round trip, run-directory states,
device slots. No training here (see test_sweep_run.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
import yaml

from directpred.cli import main
from directpred.config import ConfigError, dump_config, parse_override
from directpred.sweep import load_sweep, parse_devices, spec
from directpred.sweep.runner import plan_run
from directpred.sweep.spec import PaperValue, parse_paper_value, yaml_value

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "cpu" / "quickstart.yaml"


def write_sweep(tmp_path: Path, tiny_folder: Path, **entries) -> Path:
    data = {
        "base": str(QUICKSTART),
        "set": {"data.dataset": "folder", "data.path": str(tiny_folder)},
        "variants": {"dp": {"predictor.name": "directpred"}, "lin": {"predictor.name": "linear"}},
        "seeds": [0, 1],
    }
    data.update(entries)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_cells_runs_and_resolved_configs(tmp_path, tiny_folder):
    path = write_sweep(
        tmp_path,
        tiny_folder,
        variants={"dp": {"predictor": {"name": "directpred", "rho": 0.5}}},
        axes={"predictor.eps": [0, 0.1], "method.ema": [0.99]},
        seeds=[3],
    )
    sweep = load_sweep(path, ["train.epochs=7"])
    assert list(sweep.cells) == ["dp,eps=0,ema=0.99", "dp,eps=0.1,ema=0.99"]
    runs = sweep.runs()
    assert [(r.cell, r.seed, str(r.rel_dir)) for r in runs] == [
        ("dp,eps=0,ema=0.99", 3, "runs/dp,eps=0,ema=0.99/seed3"),
        ("dp,eps=0.1,ema=0.99", 3, "runs/dp,eps=0.1,ema=0.99/seed3"),
    ]
    cfg = sweep.config(runs[1])
    assert (cfg.predictor.rho, cfg.predictor.eps, cfg.method.ema, cfg.train.seed, cfg.train.epochs) == (
        0.5,
        0.1,
        0.99,
        3,
        7,
    )
    assert cfg.backbone.width == 16 and cfg.data.path == str(tiny_folder)  # from the base file / the sweep's set
    assert sweep.base == QUICKSTART.resolve()


def test_axis_names_use_full_keys_when_last_parts_clash(tmp_path, tiny_folder):
    path = write_sweep(
        tmp_path,
        tiny_folder,
        set={"data.dataset": "folder", "data.path": str(tiny_folder), "predictor.name": "mlp"},  # mlp: hidden_dim
        variants=None,
        axes={"projector.hidden_dim": [32], "predictor.hidden_dim": [16, 64]},
    )
    assert list(load_sweep(path).cells) == [
        "projector.hidden_dim=32,predictor.hidden_dim=16",
        "projector.hidden_dim=32,predictor.hidden_dim=64",
    ]


@pytest.mark.parametrize(
    "value", [0.3, 4e-4, 1e-05, 7, True, False, None, "linear", "true", "a b: c", "/x/y.tar.gz", [1, 2.5], "0.10", "~"]
)
def test_set_text_reads_back_as_the_same_value(value):
    key, back = parse_override(f"a.b={yaml_value(value)}")
    assert key == "a.b" and back == value and type(back) is type(value)


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"grid": {}}, "unknown sweep key 'grid'; allowed keys: base, set, axes, variants, seeds, paper"),
        (
            {"variants": {"dp": {"predictor.rhoo": 0.3}}},
            "cell 'dp' (seed 0): unknown config key 'predictor.rhoo'. Did you mean 'predictor.rho'?",
        ),
        ({"set": {"optim.lr": "fast"}}, "cell 'dp' (seed 0): optim.lr: 'fast' has the wrong type; expected float"),
        (
            {"variants": {"dp": {"predictor.rho": 1.5}}},
            "cell 'dp' (seed 0): predictor.rho=1.5 is not allowed: the moving-average rate must lie in [0, 1)",
        ),
        ({"seeds": [0, 0]}, "seeds=[0, 0]; expected a list of distinct integers >= 0"),
        ({"seeds": 3}, "seeds=3; expected a list of distinct integers >= 0"),
        ({"set": {"train": {"seed": 1}}}, "train.seed is set by the sweep's `seeds` list; remove it here"),
        ({"variants": None, "axes": None}, "give `variants` (named cells) and/or `axes`"),
        ({"axes": {"predictor.rho": 0.3}}, "axes.predictor.rho must be a non-empty list of values"),
        ({"base": "nope.yaml"}, "base config 'nope.yaml' does not exist"),
        ({"paper": {"values": {"dp": 1}}}, "paper.note is required"),
        ({"paper": {"note": "T6", "values": {"directpred": 77.86}}}, "paper.values names unknown cell 'directpred'"),
        ({"paper": {"note": "T6", "values": {"dp": "77.86 pm 0.1"}}}, "'77.86 pm 0.1' is not a paper value"),
        (  # a misspelt axis key also renames the cells: its own error, not paper.values', is the one shown
            {"variants": None, "axes": {"predictor.rhoo": [0.3]}, "paper": {"note": "T6", "values": {"rho=0.3": 1}}},
            "cell 'rhoo=0.3' (seed 0): unknown config key 'predictor.rhoo'. Did you mean 'predictor.rho'?",
        ),
        ({"paper": {"note": "T6", "table": 6}}, "unknown key 'paper.table'"),
        ({"variants": {"a/b": {}}}, "variant name 'a/b' may use only"),
        ({"variants": {"..": {}}}, "variant name '..' names a directory of its own"),  # runs/../seed0 before
        ({"variants": {".": {}}}, "variant name '.' names a directory of its own"),
    ],
)
def test_invalid_sweep_files_name_the_key(tmp_path, tiny_folder, entries, message):
    path = write_sweep(tmp_path, tiny_folder, **entries)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert message in str(info.value)


def test_a_key_given_twice_in_a_sweep_file_is_refused(tmp_path, tiny_folder):
    # PyYAML keeps the last of two entries without a word: the axis [0.1, 0.2] would vanish.
    path = tmp_path / "s.yaml"
    path.write_text(f"base: {QUICKSTART}\naxes:\n  predictor.rho: [0.1, 0.2]\n  predictor.rho: [0.5]\nseeds: [0]\n")
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert str(info.value) == f"{path} line 4: key 'predictor.rho' appears twice (first at line 3); keep one of them"
    path.write_text(f"base: {QUICKSTART}\nvariants:\n  a: {{predictor.rho: 0.1}}\n  a: {{predictor.rho: 0.2}}\n")
    with pytest.raises(ConfigError, match="line 4: key 'a' appears twice .*; merge the two blocks"):
        load_sweep(path)


def test_a_key_set_by_a_variant_and_an_axis_is_refused(tmp_path, tiny_folder):
    # The axis's --set came last: both cells ran rho=0.3, named a,rho=0.3 and b,rho=0.3, the variants' 0.5/0.9 lost.
    path = write_sweep(
        tmp_path,
        tiny_folder,
        variants={"a": {"predictor.rho": 0.5}, "b": {"predictor": {"rho": 0.9}}, "c": {"predictor.eps": 0.2}},
        axes={"predictor.rho": [0.3]},
    )
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert str(info.value) == (
        f"{path}: predictor.rho is set both by axes.predictor.rho and by variant(s) a, b, whose value the axis "
        "would override; set predictor.rho in one place: remove it from the variants or drop the axis"
    )


@pytest.mark.parametrize(
    "entries,pair",
    [
        ({"variants": None, "axes": {"predictor.rho": [0, 0.0]}}, "'rho=0' and 'rho=0.0'"),
        ({"variants": {"x": {}, "y": {"predictor.rho": 0.3}}}, "'x' and 'y'"),  # 0.3: the base config's value
        ({"variants": {"p": {}, "q": {}}, "axes": {"predictor.eps": [0.1, 0.2]}}, "'p,eps=0.1' and 'q,eps=0.1'"),
    ],
)
def test_two_cells_with_the_same_resolved_configuration_are_refused(tmp_path, tiny_folder, entries, pair):
    path = write_sweep(tmp_path, tiny_folder, **entries)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert str(info.value) == (
        f"{path}: cells {pair} resolve to the same configuration, so they would train the same runs twice; "
        "remove one or make their values differ"
    )


def test_cli_rejects_a_bad_sweep_before_any_run(tmp_path, tiny_folder, capsys):
    path = write_sweep(tmp_path, tiny_folder, variants={"ok": {}, "bad": {"train.batch_size": 1}})
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--devices", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cell 'bad' (seed 0): train.batch_size=1 is not allowed" in err
    assert not (tmp_path / "out").exists()  # validated before anything was created, let alone run
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--set", "train.seed=4"]) == 2
    assert "the sweep's `seeds` list sets the seed" in capsys.readouterr().err


def test_data_paths_in_a_sweep_file_are_relative_to_the_file(tmp_path, tiny_folder, monkeypatch, capsys):
    """`base` is relative to the sweep file, and so are data paths in `set`, variants and axes (as in a config file),
    so a sweep runs from any current directory; a command-line --set path stays relative to the current directory."""
    import os

    folder = tmp_path / "sweeps" / "cpu"
    folder.mkdir(parents=True)
    rel = os.path.relpath(tiny_folder, folder)
    path = write_sweep(
        folder,
        tiny_folder,
        set={"data": {"dataset": "folder", "path": rel}},
        variants={"dp": {}, "copy": {"data.local_copy": "cache"}},
        axes={"data.path": [rel]},
        seeds=[0],
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"data.path={tiny_folder}") == 4  # set + axis, in both cells' commands
    assert f"data.local_copy={folder / 'cache'}" in printed and rel not in printed
    sweep = load_sweep(path)
    assert [sweep.config(r).data.path for r in sweep.runs()] == [str(tiny_folder)] * 2
    assert sweep.config(sweep.runs()[1]).data.local_copy == str(folder / "cache")
    # the command line's own --set is the user's, relative to where they typed it
    (elsewhere / "data").symlink_to(tiny_folder)
    typed = load_sweep(path, ["data.path=data"])
    assert typed.config(typed.runs()[0]).data.path == str(elsewhere / "data")


def test_paper_values():
    assert parse_paper_value("77.86±0.16", "x") == PaperValue(77.86, 0.16)
    assert parse_paper_value("77.86 +- 0.16", "x") == PaperValue(77.86, 0.16)
    assert parse_paper_value(40, "x") == PaperValue(40.0, None)


def test_the_module_docstrings_example_sweep_file_loads(tmp_path):
    """The sweep file shown in :mod:`directpred.sweep.spec` is valid as written (its ``paper.values`` named no cell:
    a cell is named by its variant and its axis values together), with the cells the docstring lists."""
    text = spec.__doc__.split("A sweep file is YAML::\n\n", 1)[1].split("\n\n", 1)[0]
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the example's base, two folders up from the file
    path = tmp_path / "sweeps" / "paper" / "example.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(textwrap.dedent(text))
    sweep = load_sweep(path)
    assert list(sweep.cells) == ["ema,freq=1", "ema,freq=5", "no_ema,freq=1", "no_ema,freq=5"]
    assert sweep.paper == {"ema,freq=1": PaperValue(40.67, 0.5)}
    assert [r.seed for r in sweep.runs()].count(4) == 4
    cfg = sweep.config(sweep.runs()[-1])
    assert (cfg.predictor.name, cfg.predictor.rho, cfg.predictor.freq, cfg.train.epochs) == ("optimal", 0.0, 5, 100)


def test_run_directory_states(tmp_path, tiny_folder):
    sweep = load_sweep(write_sweep(tmp_path, tiny_folder))
    run = sweep.runs()[0]
    out = tmp_path / "out"
    run_dir = out / run.rel_dir
    assert plan_run(sweep, run, out).action == "new"  # nothing there
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(sweep.config(run)))
    assert plan_run(sweep, run, out).action == "new"  # killed before its first checkpoint
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    plan = plan_run(sweep, run, out)
    assert (plan.action, plan.sets) == ("resume", [])
    assert plan.command(sweep)[3:] == ["train", "--resume", str(run_dir)]
    (run_dir / "summary.json").write_text(json.dumps({"knn_top1": 50.0}))
    assert plan_run(sweep, run, out).action == "done"
    # a finished run asked to train longer is resumed with the new length; other resumable keys are passed along
    longer = load_sweep(sweep.path, ["train.epochs=3", "eval.knn_k=7"])
    plan = plan_run(longer, longer.runs()[0], out)
    assert (plan.action, plan.sets) == ("resume", ["train.epochs=3", "eval.knn_k=7"])
    # a finished run that recorded its length (1 epoch of 8 steps) decides by steps: fewer is refused (resuming
    # would evaluate the longer run as this cell), as many is done, more is resumed
    (run_dir / "summary.json").write_text(json.dumps({"knn_top1": 50.0, "steps": 8, "epochs": 1.0}))
    for sets, action in (
        (["train.max_steps=6"], None),
        (["train.max_steps=8"], "done"),
        (["train.epochs=2"], "resume"),
    ):
        other = load_sweep(sweep.path, sets)
        if action is None:
            with pytest.raises(ConfigError, match=r"trained 8 steps and this sweep asks for 6 \(train.max_steps=6\): "):
                plan_run(other, other.runs()[0], out)
        else:
            assert plan_run(other, other.runs()[0], out).action == action, sets
    # another evaluation protocol re-evaluates (a resume of a finished run with changes does); other resumable
    # settings leave the results as they are
    for sets, action in ((["eval.knn_k=7"], "resume"), (["train.log_every=5", "data.workers=1"], "done")):
        other = load_sweep(sweep.path, sets)
        plan = plan_run(other, other.runs()[0], out)
        assert (plan.action, plan.sets) == (action, sets if action == "resume" else []), sets
    changed = load_sweep(sweep.path, ["method.ema=0.99", "optim.lr=0.1"])
    with pytest.raises(
        ConfigError,
        match=r"was made with a different configuration \(method.ema: 0.996 in the run, "
        r"0.99 in the sweep; optim.lr: 0.03 in the run, 0.1 in the sweep\)",
    ):
        plan_run(changed, changed.runs()[0], out)


def test_gpu_indices_the_machine_lacks_are_refused_before_any_run(tmp_path, tiny_folder, monkeypatch, capsys):
    """--devices 0,1 on a machine without CUDA ran every run on the CPU (train.device=auto under an empty
    CUDA_VISIBLE_DEVICES), two at a time, without a word; --dry-run still plans for another machine."""
    import torch

    path, out = write_sweep(tmp_path, tiny_folder), tmp_path / "out"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sweep", str(path), "--out", str(out), "--devices", "0,1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "directpred: config error: --devices 0,1 but CUDA is not available here: no CUDA GPU is visible (driver, "
        "CUDA_VISIBLE_DEVICES); use --devices cpu or auto"
    )
    assert not out.exists()
    assert main(["sweep", str(path), "--out", str(out), "--devices", "0,1", "--dry-run"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    capsys.readouterr()
    assert main(["sweep", str(path), "--out", str(out), "--devices", "0,1,2,3", "--torchrun", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "directpred: config error: --devices 0,1,2,3 but this machine has 2 GPU(s) (0 to 1); use indices among "
        "them, or auto"
    )
    # Under a Slurm job's mask the physical ids are refused, saying what the indices count.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert main(["sweep", str(path), "--out", str(out), "--devices", "4,5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "directpred: config error: --devices 4,5 but this process sees 2 GPU(s) (CUDA_VISIBLE_DEVICES=4,5); "
        "--devices counts the GPUs this process sees (under CUDA_VISIBLE_DEVICES, its entries): use indices 0 to 1, "
        "or auto"
    )
    assert not out.exists()


def test_device_slots():
    assert parse_devices("cpu") == [None]
    assert parse_devices("cpu", jobs=3) == [None, None, None]
    assert parse_devices("0,1", jobs=2) == ["0", "0", "1", "1"]
    assert parse_devices("0,1,2,3", torchrun=2) == ["0,1", "2,3"]
    with pytest.raises(ConfigError, match="must be a multiple of the processes per run"):
        parse_devices("0,1,2", torchrun=2)
    with pytest.raises(ConfigError, match="give cpu, auto or distinct GPU indices"):
        parse_devices("gpu0")
    with pytest.raises(ConfigError, match="--jobs 0: must be >= 1"):
        parse_devices("cpu", jobs=0)


class _FinishedProcess:
    """A child that has already exited 0 (without a summary.json, so the sweep records it as failed)."""

    returncode = 0

    def poll(self) -> int:
        return 0


@pytest.mark.parametrize(
    "mask,devices,torchrun,expected",
    [
        (None, "0,1", 0, ["0", "1"]),  # no mask: the indices are the GPUs
        ("4,5,6,7", "0,1,2,3", 0, ["4", "5", "6", "7"]),  # a Slurm job given GPUs 4-7
        ("4,5,6,7", "auto", 0, ["4", "5", "6", "7"]),
        ("4,5,6,7", "1,3", 0, ["5", "7"]),
        ("GPU-aaaa, GPU-bbbb,MIG-cccc", "2,0", 0, ["MIG-cccc", "GPU-aaaa"]),  # UUIDs and MIG ids stay strings
        ("4,5,6,7", "0,1,2,3", 2, ["4,5", "6,7"]),  # torchrun: each run's group of GPUs
        ("4,5,6,7", "cpu", 0, ["", ""]),
    ],
    ids=["no-mask", "mask", "auto", "subset", "uuids", "torchrun", "cpu"],
)
def test_devices_count_the_visible_gpus_and_runs_get_the_parents_mask_entries(
    mask, devices, torchrun, expected, tmp_path, tiny_folder, monkeypatch
):
    """Each run's CUDA_VISIBLE_DEVICES replaced the parent's with the --devices index itself: under a mask of 4,5,6,7
    (a Slurm job), --devices 0,1,2,3 (and auto) ran on the physical GPUs 0-3, other jobs' GPUs."""
    import torch

    from directpred.sweep import runner

    if mask is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4 if mask is None else len(mask.split(",")))
    started: list[tuple[str, list[str]]] = []

    def popen(cmd, **kw):
        started.append((kw["env"]["CUDA_VISIBLE_DEVICES"], cmd))
        return _FinishedProcess()

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    sweep = load_sweep(write_sweep(tmp_path, tiny_folder, seeds=[0]))
    slots = parse_devices(devices, torchrun=torchrun)
    plans = [plan_run(sweep, run, tmp_path / "out") for run in sweep.runs()]
    runner.execute(sweep, plans, slots=slots, torchrun=torchrun, echo=open(os.devnull, "w"))
    assert sorted(env for env, _ in started) == sorted(expected[: len(plans)])
    assert all(("--nproc_per_node=2" in cmd) == (torchrun == 2) for _, cmd in started)


def test_a_run_that_wrote_its_summary_then_exited_non_zero_is_done_everywhere(tmp_path, tiny_folder, monkeypatch):
    """The console said FAILED (and wrote failed.json) while the report and the next sweep counted the run done."""
    import io

    from directpred.sweep import runner

    class Exited3:
        returncode = 3

        def poll(self) -> int:
            return 3

    def popen(cmd, stdout, **kw):
        run_dir = Path(cmd[cmd.index("--out") + 1])
        (run_dir / "config.yaml").write_text(dump_config(sweep.config(sweep.runs()[0])))  # as the run writes them
        (run_dir / "summary.json").write_text(json.dumps({"knn_top1": 40.0, "steps": 8, "epochs": 1.0}))
        stdout.write("RuntimeError: the tracker could not close\n")
        stdout.flush()
        return Exited3()

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    sweep = load_sweep(write_sweep(tmp_path, tiny_folder, seeds=[0], variants={"dp": {}}))
    out = tmp_path / "out"
    plans = [plan_run(sweep, run, out) for run in sweep.runs()]
    echo = io.StringIO()
    assert runner.execute(sweep, plans, slots=parse_devices("cpu"), echo=echo) == []
    assert "done   dp seed 0" in echo.getvalue()
    assert "(its summary was written, then it exited with 3: RuntimeError: the tracker could not close)" in (
        echo.getvalue()
    )
    run_dir = out / sweep.runs()[0].rel_dir
    assert not (run_dir / "failed.json").exists()
    assert plan_run(sweep, sweep.runs()[0], out).action == "done"


class _RunningProcess:
    """A child that keeps running (the sweep is stopped by the test before any finishes)."""

    returncode = None

    def poll(self) -> None:
        return None

    def send_signal(self, signum: int) -> None:
        self.returncode = -signum

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


def test_concurrent_runs_spread_over_the_gpus_before_sharing_one(tmp_path, tiny_folder, monkeypatch):
    """--devices 0,1 --jobs 2 (slots 0, 0, 1, 1): the second run goes to GPU 1, not beside the first on GPU 0."""
    import torch

    from directpred.sweep import runner

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    started: list[str] = []

    def popen(cmd, **kw):
        started.append(kw["env"]["CUDA_VISIBLE_DEVICES"])
        if len(started) == 3:  # all three have started: stop the sweep as Ctrl-C would
            raise runner.SweepInterrupted(signal.SIGINT)
        return _RunningProcess()

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    sweep = load_sweep(write_sweep(tmp_path, tiny_folder, seeds=[0, 1]))  # 4 runs
    plans = [plan_run(sweep, run, tmp_path / "out") for run in sweep.runs()]
    with pytest.raises(runner.SweepInterrupted):
        runner.execute(sweep, plans, slots=parse_devices("0,1", jobs=2), echo=open(os.devnull, "w"))
    assert started == ["0", "1", "0"]


def test_a_devices_index_beyond_the_parents_mask_is_refused_naming_it(tmp_path, tiny_folder, monkeypatch):
    from directpred.sweep import runner

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setattr(runner.subprocess, "Popen", lambda cmd, **kw: pytest.fail("no run may start"))
    sweep = load_sweep(write_sweep(tmp_path, tiny_folder, seeds=[0]))
    plans = [plan_run(sweep, run, tmp_path / "out") for run in sweep.runs()]
    with pytest.raises(ConfigError) as err:
        runner.execute(sweep, plans, slots=["0", "2"], echo=open(os.devnull, "w"))
    assert str(err.value) == (
        "--devices 2: this process sees 2 GPU(s) (CUDA_VISIBLE_DEVICES=4,5); --devices counts the GPUs this process "
        "sees (under CUDA_VISIBLE_DEVICES, its entries): use indices 0 to 1"
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_sweep_exits_as_directpred_train_does(signum, tmp_path, tiny_folder, monkeypatch, capsys):
    """128 + the signal (130 for Ctrl-C, 143 for SIGTERM from Slurm or kill), not 130 for both: a job script can tell
    them apart as it does for `directpred train`; the report is written and the message says how to go on."""
    from directpred.cli import sweep as sweep_cli

    def interrupted(*args, **kwargs):
        raise sweep_cli.SweepInterrupted(signum)

    monkeypatch.setattr(sweep_cli, "execute", interrupted)
    out = tmp_path / "out"
    sweep_file = write_sweep(tmp_path, tiny_folder, seeds=[0])
    assert main(["sweep", str(sweep_file), "--out", str(out), "--devices", "cpu"]) == 128 + signum
    err = capsys.readouterr().err
    assert "sweep interrupted; run the same command again" in err
    assert (out / "results.md").is_file()
    assert "No artists with labels" not in err  # no run finished: no empty legend (matplotlib warned)


def test_a_run_directory_another_process_writes_is_not_cleared_by_the_sweep(tmp_path, tiny_folder, monkeypatch):
    """The sweep cleared a run directory for its child (all files of a new plan) before the child met the run's
    lock: a `directpred train` of that directory running beside the sweep lost its files. Now the sweep asks first
    and leaves such a run alone, reported as failed; the other runs start."""
    import fcntl

    from directpred.sweep import runner

    started: list[str] = []

    def popen(cmd, **kw):
        started.append(cmd[cmd.index("--out") + 1])
        return _FinishedProcess()

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    sweep = load_sweep(write_sweep(tmp_path, tiny_folder, seeds=[0]))
    out = tmp_path / "out"
    plans = [plan_run(sweep, run, out) for run in sweep.runs()]
    held = plans[0].run_dir
    held.mkdir(parents=True)
    (held / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lines = io.StringIO()
        failed = runner.execute(sweep, plans, slots=parse_devices("cpu"), echo=lines)
    finally:
        os.close(fd)
    assert failed[0] == plans[0] and started == [str(p.run_dir) for p in plans[1:]]  # (the fakes write no summary)
    assert f"not started: {held} is being written by another directpred process" in lines.getvalue()
    assert (held / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1}\n'


def test_set_may_not_override_what_a_cell_sets(tmp_path, tiny_folder):
    """--set of a key an axis or a variant sets gave every cell that one value while the cells kept their names
    (cells named `*_4ep` trained 2 epochs under --set train.epochs=2); now refused, naming the key. Where the data
    lies stays the command line's to say; the overrides are recorded for the report."""
    variants = {"dp": {"predictor.name": "directpred"}, "dc": {"predictor.name": "directcopy"}}
    path = write_sweep(tmp_path, tiny_folder, variants=variants, axes={"predictor.rho": [0.3, 0.5]})
    for key in ("predictor.name=linear", "predictor.rho=0.1"):
        with pytest.raises(ConfigError, match=rf"--set {key.split('=')[0]}: .* sets {key.split('=')[0]} per cell"):
            load_sweep(path, [key])
    with pytest.raises(ConfigError, match=r"--set predictor: .* sets predictor.rho per cell"):
        load_sweep(path, ["predictor={rho: 0.7}"])  # a whole section sets the keys under it
    sweep = load_sweep(path, ["train.epochs=2", f"data.path={tiny_folder}"])
    assert sweep.overrides == ["train.epochs=2", f"data.path={tiny_folder}"]
    assert {sweep.config(r).train.epochs for r in sweep.runs()} == {2}


def test_a_key_given_dotted_and_nested_is_refused(tmp_path, tiny_folder):
    """`{predictor.rho: 0.3, predictor: {rho: 0.5}}` silently trained rho = 0.5 (the last one written)."""
    path = write_sweep(tmp_path, tiny_folder, variants={"dp": {"predictor.rho": 0.3, "predictor": {"rho": 0.5}}})
    with pytest.raises(ConfigError, match=r"variants.dp: predictor.rho given twice .*keep one of them"):
        load_sweep(path)


def test_a_malformed_paper_value_names_the_cell():
    with pytest.raises(ConfigError, match=r"paper.values.a: '77.86.1' is not a paper value"):
        parse_paper_value("77.86.1", "s.yaml: paper.values.a")


def _finished(run_dir: Path, cfg, **summary) -> None:
    """A finished run of ``cfg`` in ``run_dir`` (its config, a checkpoint file and a summary; nothing trained)."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    (run_dir / "summary.json").write_text(json.dumps({"knn_top1": 50.0, "steps": 8, "epochs": 1.0, **summary}))


def test_a_finished_run_in_another_precision_is_refused_not_reported_as_the_cell(tmp_path, tiny_folder):
    """A run trained in bf16 was "done" for a sweep asking for fp32 (train.precision may change on resume, but a
    finished run trains no step more); `auto` accepts what the machine chose."""
    sweep = load_sweep(write_sweep(tmp_path, tiny_folder), ["train.precision=fp32"])
    run, out = sweep.runs()[0], tmp_path / "out"
    _finished(out / run.rel_dir, sweep.config(run), precision="bfloat16")
    with pytest.raises(ConfigError, match=r"trained in bfloat16 and this sweep asks for train.precision=fp32"):
        plan_run(sweep, run, out)
    auto = load_sweep(sweep.path, ["train.precision=auto"])
    assert plan_run(auto, auto.runs()[0], out).action == "done"
    bf16 = load_sweep(sweep.path, ["train.precision=bf16"])
    assert plan_run(bf16, bf16.runs()[0], out).action == "done"


def test_a_run_stopped_on_collapse_is_trained_on_when_the_sweep_no_longer_stops(tmp_path, tiny_folder):
    stop = load_sweep(write_sweep(tmp_path, tiny_folder), ["diag.stop_on_collapse=true"])
    run, out = stop.runs()[0], tmp_path / "out"
    _finished(out / run.rel_dir, stop.config(run), stopped_early=True, steps=3)
    assert plan_run(stop, run, out).action == "done"
    go_on = load_sweep(stop.path, ["diag.stop_on_collapse=false"])
    plan = plan_run(go_on, go_on.runs()[0], out)
    assert (plan.action, plan.sets) == ("resume", ["diag.stop_on_collapse=false"])


def test_a_finished_run_without_its_checkpoint_is_never_cleared(tmp_path, tiny_folder, capsys):
    """A finished run whose last.pt is gone was planned "new" when the sweep asked more of it, and its directory,
    summary and logs included, was deleted before a run from scratch; now refused, naming the directory."""
    sweep = load_sweep(write_sweep(tmp_path, tiny_folder))
    run, out = sweep.runs()[0], tmp_path / "out"
    run_dir = out / run.rel_dir
    _finished(run_dir, sweep.config(run))
    (run_dir / "checkpoints" / "last.pt").unlink()
    assert plan_run(sweep, run, out).action == "done"  # nothing asked of it: its results stand
    for sets in (["eval.knn_k=7"], ["train.epochs=2"]):
        other = load_sweep(sweep.path, sets)
        with pytest.raises(ConfigError, match=rf"{run_dir} has finished, but .* its checkpoint .* is gone"):
            plan_run(other, other.runs()[0], out)
    assert main(["sweep", str(sweep.path), "--out", str(out), "--set", "eval.knn_k=7", "--devices", "cpu"]) == 2
    assert "has finished, but it was evaluated with other eval.knn_k" in capsys.readouterr().err
    assert json.loads((run_dir / "summary.json").read_text())["knn_top1"] == 50.0


def test_dry_run_says_when_a_new_run_clears_its_directory(tmp_path, tiny_folder, capsys):
    sweep = load_sweep(write_sweep(tmp_path, tiny_folder))
    run, out = sweep.runs()[0], tmp_path / "out"
    (out / run.rel_dir).mkdir(parents=True)
    (out / run.rel_dir / "metrics.jsonl").write_text("")  # a start killed before its first checkpoint
    assert main(["sweep", str(sweep.path), "--out", str(out), "--dry-run", "--devices", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(str(out / run.rel_dir) in ln and "is cleared" in ln for ln in lines)
    assert sum("is cleared" in ln for ln in lines) == 1


def test_eval_changes_that_give_no_new_figure_leave_a_finished_run_done(tmp_path, tiny_folder):
    """eval.untrained true -> false only leaves figures unread, and eval.knn_every cannot remake a finished run's
    curve: neither re-evaluates it (nor makes the report call it out of date); false -> true computes the untrained
    figures."""
    with_untrained = load_sweep(write_sweep(tmp_path, tiny_folder), ["eval.untrained=true"])
    run, out = with_untrained.runs()[0], tmp_path / "out"
    _finished(out / run.rel_dir, with_untrained.config(run))
    for sets in (["eval.untrained=false"], ["eval.untrained=true", "eval.knn_every=2"]):
        other = load_sweep(with_untrained.path, sets)
        assert plan_run(other, other.runs()[0], out).action == "done", sets
    plain = load_sweep(with_untrained.path)  # eval.untrained=false
    _finished(out / run.rel_dir, plain.config(plain.runs()[0]))
    plan = plan_run(with_untrained, run, out)
    assert (plan.action, plan.sets) == ("resume", ["eval.untrained=true"])


def test_a_finished_run_with_another_process_count_is_refused_not_reported_as_the_cell(tmp_path, tiny_folder):
    """train.batch_size is per process, so --torchrun 2 doubles the global batch: a run made under --torchrun 2 was
    "done" for the same sweep without it (and the other way round), and averaged with the others."""
    sweep = load_sweep(write_sweep(tmp_path, tiny_folder))
    run, out = sweep.runs()[0], tmp_path / "out"
    _finished(out / run.rel_dir, sweep.config(run), world_size=2)
    with pytest.raises(ConfigError, match=r"trained with 2 processes and this sweep runs 1: .*run the sweep with "):
        plan_run(sweep, run, out, world=1)
    assert plan_run(sweep, run, out, world=2).action == "done"
    _finished(out / run.rel_dir, sweep.config(run))  # a summary from before world_size was recorded: 1 process
    with pytest.raises(ConfigError, match=r"trained with 1 process and this sweep runs 2: .*without --torchrun"):
        plan_run(sweep, run, out, world=2)


def test_a_capped_run_of_another_cosine_schedule_length_is_refused(tmp_path, tiny_folder):
    """train.epochs 2 -> 3 with train.max_steps capping both at the same steps: "done", though a cosine schedule
    (learning rate, EMA) follows the epochs and so differs at every step. A constant schedule is the same run."""
    for schedule, refused in (("warmup_cosine", True), ("constant", False)):
        over = ["train.max_steps=8", f"optim.schedule={schedule}"]
        two = load_sweep(write_sweep(tmp_path, tiny_folder), [*over, "train.epochs=2"])
        run, out = two.runs()[0], tmp_path / f"out_{schedule}"
        _finished(out / run.rel_dir, two.config(run), steps=8, epochs=0.5)
        three = load_sweep(two.path, [*over, "train.epochs=3"])
        if refused:
            with pytest.raises(ConfigError, match=r"8 steps of a 2-epoch schedule .*\(optim.schedule=warmup_cosine"):
                plan_run(three, three.runs()[0], out)
        else:
            assert plan_run(three, three.runs()[0], out).action == "done"
