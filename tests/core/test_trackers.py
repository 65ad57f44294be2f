"""Experiment trackers (log.backends): W&B and MLflow adapters tested with fake modules that record their calls;
what they receive equals what metrics.jsonl holds; a missing package is a clear error before any work."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from directpred.cli import main
from directpred.config import ConfigError, flatten, load_config
from directpred.train.logger import read_metrics
from directpred.train.loop import Trainer

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "cpu" / "quickstart.yaml"


class _Histogram:
    def __init__(self, values) -> None:
        self.values = list(values)


class _WandbRun:
    def __init__(self, calls: list, kwargs: dict) -> None:
        self.calls, self.kwargs = calls, kwargs

    def log(self, data: dict, step: int) -> None:
        self.calls.append(("log", step, dict(data)))

    def finish(self) -> None:
        self.calls.append(("finish",))


def fake_wandb(calls: list) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _WandbRun(calls, kwargs)

    mod.init, mod.Histogram = init, _Histogram
    return mod


def fake_mlflow(calls: list, history: dict | None = None, fail: dict | None = None) -> types.ModuleType:
    """A stand-in for mlflow that records its calls, and keeps every value sent in ``history`` (metric -> list of
    (step, value)) as MLflow's store does, duplicates included; ``MlflowClient`` reads it back. Sending a step
    ``fail["step"]`` raises (the process dies there)."""
    mod = types.ModuleType("mlflow")
    mod.set_experiment = lambda name: calls.append(("set_experiment", name))
    history = history if history is not None else {}

    def start_run(run_id=None, run_name=None):
        calls.append(("start_run", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "run-abc"))

    def log_metrics(metrics, step):
        if fail and step == fail.get("step"):
            raise RuntimeError(f"killed at step {step}")
        calls.append(("log_metrics", step, dict(metrics)))
        for k, v in metrics.items():
            history.setdefault(k, []).append((step, v))

    class MlflowClient:
        def get_run(self, run_id):
            latest = {k: v[-1][1] for k, v in history.items()}
            return types.SimpleNamespace(data=types.SimpleNamespace(metrics=latest))

        def get_metric_history(self, run_id, key):
            return [types.SimpleNamespace(step=s, value=v) for s, v in history.get(key, [])]

    mod.start_run, mod.log_metrics, mod.MlflowClient = start_run, log_metrics, MlflowClient
    mod.log_params = lambda params: calls.append(("log_params", dict(params)))
    mod.end_run = lambda: calls.append(("end_run",))
    return mod


def _expected(run) -> tuple[dict, dict]:
    """(step, kind/key) -> value of metrics.jsonl's finite numbers, and of its lists (spectra); the epoch is a
    series of the train rows only (the probe's train and test rows of an epoch end share a step, not an epoch)."""
    scalars, lists = {}, {}
    for row in read_metrics(run):
        for k, v in row.items():
            if k in ("kind", "step") or isinstance(v, bool) or v is None or (k == "epoch" and row["kind"] != "train"):
                continue
            if isinstance(v, (int, float)):
                scalars[(row["step"], f"{row['kind']}/{k}")] = v
            elif isinstance(v, list) and v:
                lists[(row["step"], f"{row['kind']}/{k}")] = v
    return scalars, lists


@pytest.fixture
def trackers(monkeypatch):
    wandb_calls: list = []
    mlflow_calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(wandb_calls))
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow(mlflow_calls))
    return wandb_calls, mlflow_calls


def test_wandb_and_mlflow_receive_what_metrics_jsonl_holds(trackers, tiny_overrides, tmp_path):
    wandb_calls, mlflow_calls = trackers
    cfg = load_config(
        None,
        tiny_overrides
        + ["train.epochs=2", "eval.knn_every=1", "diag.every=3", "log.backends=[wandb, mlflow]", "log.project=proj"],
    )
    Trainer(cfg, tmp_path / "run").fit()
    run = tmp_path / "run"
    scalars, lists = _expected(run)
    assert any(k[1].startswith("diag/") for k in lists) and any(k[1] == "eval/knn_top1" for k in scalars)

    init = wandb_calls[0]
    assert init[0] == "init" and init[1]["project"] == "proj" and init[1]["name"] == "run"
    assert init[1]["resume"] == "allow" and init[1]["id"] == (run / "wandb_id").read_text().strip()
    assert init[1]["config"] == cfg.to_dict()
    got_scalars, got_lists = {}, {}
    for call in wandb_calls[1:-1]:
        assert call[0] == "log"
        for k, v in call[2].items():
            if isinstance(v, _Histogram):
                got_lists[(call[1], k)] = v.values
            else:
                got_scalars[(call[1], k)] = v
    assert got_scalars == scalars and got_lists == lists
    assert wandb_calls[-1] == ("finish",)

    assert mlflow_calls[:2] == [("set_experiment", "proj"), ("start_run", None, "run")]
    assert mlflow_calls[2] == ("log_params", {k: str(v) for k, v in flatten(cfg.to_dict()).items()})
    got = {(c[1], k): v for c in mlflow_calls[3:-1] for k, v in c[2].items()}
    assert got == scalars  # MLflow has no histograms
    assert mlflow_calls[-1] == ("end_run",)
    assert (run / "mlflow_run_id").read_text().strip() == "run-abc"
    assert not (run / "tensorboard").exists()  # not asked for


def test_resumed_run_continues_the_same_tracker_runs(trackers, tiny_overrides, tmp_path):
    wandb_calls, mlflow_calls = trackers
    common = tiny_overrides + ["train.epochs=2", "log.backends=[wandb, mlflow]"]
    Trainer(load_config(None, common + ["train.max_steps=5"]), tmp_path / "run").fit()
    first_id = wandb_calls[0][1]["id"]
    wandb_calls.clear()
    mlflow_calls.clear()
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.max_steps=0"]) == 0
    assert wandb_calls[0][1]["id"] == first_id and wandb_calls[0][1]["resume"] == "allow"
    assert mlflow_calls[1] == ("start_run", "run-abc", None)
    assert not any(c[0] == "log_params" for c in mlflow_calls)  # MLflow's parameters are immutable
    steps = sorted({c[1] for c in wandb_calls if c[0] == "log"})
    assert steps[0] == 6 and steps[-1] == 16  # the resumed run sends the steps after its checkpoint


def test_mlflow_holds_each_step_once_after_a_kill_and_resume(monkeypatch, tiny_overrides, tmp_path):
    """A process killed after its checkpoint had sent later steps to MLflow, which keeps every value sent: the
    resumed run sends only the steps after the last one MLflow holds, so each (metric, step) is there once, with
    the values metrics.jsonl holds (those of the redone steps, as resume is exact)."""
    from directpred.train.checkpoint import load_checkpoint

    history: dict = {}
    fail: dict = {}
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow([], history, fail))
    common = tiny_overrides + ["train.epochs=2", "log.backends=[mlflow]", "train.log_every=1", "diag.every=3"]
    run = tmp_path / "run"
    Trainer(load_config(None, common + ["train.max_steps=5"]), run).fit()
    fail["step"] = 7
    with pytest.raises(RuntimeError, match="killed at step 7"):
        Trainer(load_config(None, common), run, resume=True).fit()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 5
    assert {s for s, _ in history["train/loss"]} == {1, 2, 3, 4, 5, 6}  # 6 sent after the checkpoint
    del fail["step"]
    Trainer(load_config(None, common), run, resume=True).fit()

    sent = [(k, s) for k, v in history.items() for s, _ in v]
    assert len(sent) == len(set(sent)), "a step sent twice"
    scalars, _ = _expected(run)
    timing = ("images_per_second", "seconds")  # wall-clock fields: the killed process's stay
    got = {(s, k): v for k, values in history.items() for s, v in values}
    assert got.keys() == scalars.keys()
    assert {k: v for k, v in got.items() if not k[1].endswith(timing)} == pytest.approx(
        {k: v for k, v in scalars.items() if not k[1].endswith(timing)}, rel=1e-5
    )
    assert {s for s, _ in history["train/loss"]} == set(range(1, 17))


@pytest.mark.parametrize("backend,extra", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_tracker_package_is_a_clear_error_before_any_work(
    backend, extra, tiny_overrides, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, backend, None)  # `import wandb` raises ImportError
    cfg = load_config(None, tiny_overrides + [f"log.backends=[tensorboard, {backend}]"])
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, tmp_path / "run").fit()
    assert f"pip install {backend} (or, in a clone of directpred, pip install -e '.[{extra}]')" in str(info.value)
    assert "log.backends" in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing was done
    sets = [a for o in tiny_overrides + [f"log.backends=[{backend}]"] for a in ("--set", o)]
    code = main(["train", str(QUICKSTART), "--out", str(tmp_path / "run2"), *sets])
    assert code == 2 and f"pip install -e '.[{extra}]'" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_log_backends_config_is_strict():
    with pytest.raises(ConfigError, match=r"log.backends\[0\]: 'neptune' is not allowed"):
        load_config(None, ["log.backends=[neptune]"])
    with pytest.raises(ConfigError, match="log.backends=.*name each tracker once"):
        load_config(None, ["log.backends=[wandb, wandb]"])


def test_tensorboard_holds_each_series_once_per_step_with_the_online_probe(tiny_overrides, tmp_path):
    """The online probe's train and test rows of an epoch end share a step: both wrote ``probe/epoch`` there, with
    the epoch trained and the epoch ended (0 and 1 at the first epoch's end). The epoch is a series of the train
    rows only now, and no (tag, step) is written twice."""
    from collections import Counter

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = tiny_overrides + ["train.epochs=2", "eval.knn_every=1", "eval.online_probe=true", "diag.every=3"]
    Trainer(load_config(None, over), tmp_path / "run").fit()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/epoch", "probe/probe_test_top1", "probe/probe_train_top1"} <= set(tags)
    assert not [t for t in tags if t.endswith("/epoch") and t != "train/epoch"]
    twice = {t: n for t in tags for (s, n) in Counter(e.step for e in acc.Scalars(t)).items() if n > 1}
    assert not twice, f"written twice at one step: {twice}"
