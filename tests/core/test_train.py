"""End-to-end training on tiny data: shipped configs run, resume equals an uninterrupted run, run outputs."""

from __future__ import annotations

import json
import os
import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import directpred
from directpred.cli import main
from directpred.cli.train import command_line
from directpred.config import load_config
from directpred.eval.protocol import evaluate
from directpred.train.logger import read_metrics
from directpred.train.loop import Trainer, TrainingError

REPO = Path(__file__).resolve().parents[2]
# configs/imagenet/ stream JPEGs at a set image size: they run two steps in tests/data/test_stream_train.py.
TRAINING_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not {"theory", "imagenet"} & set(p.parts))


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_config_runs_two_steps(path, tiny_overrides, tmp_path):
    cfg = load_config(path, tiny_overrides + ["train.max_steps=2"])
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["steps"] == 2
    correct = summary["knn_top1"] * 32 / 100  # a percentage of the 32 test images (measured: 22-75 % here)
    assert correct == pytest.approx(round(correct), abs=1e-9) and 1 <= round(correct) <= 32
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize(
    "predictor,schedules,how",
    [
        (
            "directpred",
            ["method.ema_schedule=cosine", "optim.schedule=warmup_cosine", "optim.warmup_epochs=0.5"],
            "stopped",
        ),
        ("linear", [], "extended"),
    ],
)
def test_resume_at_epoch_boundary_equals_uninterrupted(predictor, schedules, how, tiny_overrides, tmp_path):
    """A run stopped after epoch 1 (or extended from 1 to 3 epochs, with constant schedules) and resumed ends
    bit-identical to one that never stopped: weights, target, F^ and counters, optimiser and kNN figure."""
    freq = ["predictor.freq=2"] if predictor == "directpred" else []  # the linear predictor has no freq
    common = tiny_overrides + [f"predictor.name={predictor}", *freq] + schedules
    full = Trainer(load_config(None, common + ["train.epochs=3"]), tmp_path / "full").fit()
    if how == "stopped":
        Trainer(load_config(None, common + ["train.epochs=3", "train.max_steps=8"]), tmp_path / "part").fit()
        resume_args = ["--set", "train.max_steps=0"]
    else:
        Trainer(load_config(None, common + ["train.epochs=1"]), tmp_path / "part").fit()
        resume_args = ["--set", "train.epochs=3"]
    assert main(["train", "--resume", str(tmp_path / "part"), *resume_args]) == 0
    resumed = json.loads((tmp_path / "part" / "summary.json").read_text())
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert resumed["steps"] == full["steps"] == 24 and resumed["knn_top1"] == full["knn_top1"]


def test_resume_that_max_steps_leaves_nothing_to_train_says_so(tiny_overrides, tmp_path):
    """More epochs on a run stopped by train.max_steps train nothing while max_steps stays: a warning says how to go
    on (the README's `--resume RUN --set train.epochs=2` on such a run otherwise silently re-evaluates it)."""
    Trainer(load_config(None, tiny_overrides + ["train.epochs=1", "train.max_steps=2"]), tmp_path / "r").fit()
    cfg = load_config(None, tiny_overrides + ["train.epochs=2", "train.max_steps=2"])
    with pytest.warns(RuntimeWarning, match=r"train.max_steps=2: the run is at step 2 already, so there is nothing "):
        summary = Trainer(cfg, tmp_path / "r", resume=True).fit()
    assert summary["steps"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # with max_steps cleared it trains on, without the warning
        summary = Trainer(load_config(None, tiny_overrides + ["train.epochs=2"]), tmp_path / "r", resume=True).fit()
    assert summary["steps"] == 2 * 8


def test_command_txt_records_a_command_that_can_be_typed_again():
    """`python -m directpred` puts the path of directpred/__main__.py in sys.argv[0]: command.txt says
    `python -m directpred` instead, and quotes what the shell would split."""
    argv = ["train", "c.yaml", "--set", "log.backends=[tensorboard, wandb]", "--out", "runs/a b"]
    line = command_line([str(Path(directpred.__file__).parent / "__main__.py"), *argv])
    assert line == "python -m directpred train c.yaml --set 'log.backends=[tensorboard, wandb]' --out 'runs/a b'"
    assert shlex.split(line)[3:] == argv
    assert command_line(["/usr/bin/directpred", *argv]).startswith("/usr/bin/directpred train c.yaml --set 'log.")


def test_resume_refuses_changed_config_and_accepts_force(tiny_overrides, tmp_path):
    Trainer(load_config(None, tiny_overrides + ["train.epochs=1"]), tmp_path / "r").fit()
    assert main(["train", "--resume", str(tmp_path / "r"), "--set", "predictor.rho=0.5"]) == 1
    assert (
        main(
            [
                "train",
                "--resume",
                str(tmp_path / "r"),
                "--set",
                "predictor.rho=0.5",
                "--set",
                "train.epochs=2",
                "--force",
            ]
        )
        == 0
    )


def test_forced_resume_uses_the_new_optimiser_settings_and_the_saved_momentum(tiny_overrides, tmp_path):
    """--force with other optim.* values: every param group takes the new configuration's settings (what the
    rewritten config.yaml claims), and only the per-parameter state (momentum buffers) comes from the checkpoint."""
    common = tiny_overrides + ["predictor.name=linear", "train.epochs=1"]
    Trainer(load_config(None, common + ["train.max_steps=2"]), tmp_path / "r").fit()
    saved = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)["optimizer"]
    changed = ["optim.alpha_p=10", "optim.weight_decay=0", "optim.momentum=0.5", "train.max_steps=3"]
    trainer = Trainer(load_config(None, common + changed), tmp_path / "r", resume=True).setup()
    settings = {g["name"]: (g["lr_scale"], g["weight_decay"], g["momentum"]) for g in trainer.optimizer.param_groups}
    assert settings == {"trunk": (1.0, 0.0, 0.5), "predictor": (10.0, 0.0, 0.5)}
    state = trainer.optimizer.state_dict()["state"]
    assert state.keys() == saved["state"].keys() and len(state) > 0
    for i in state:
        assert torch.equal(state[i]["momentum_buffer"], saved["state"][i]["momentum_buffer"]), i


@pytest.mark.parametrize(
    "change,shown,groups",
    [  # W_p becomes trainable between the eigh steps; LARS puts biases and BatchNorm parameters in their own group
        (
            "predictor.freq=2",
            "predictor.freq: 1 -> 2",
            r"trunk \((\d+)\), the configuration builds trunk \(\1\), predictor \(1\)",
        ),
        (
            "optim.name=lars",
            "optim.name: 'sgd' -> 'lars'",
            r"trunk \(\d+\), the configuration builds trunk \(\d+\), trunk_bias_bn \(\d+\)",
        ),
    ],
)
def test_forced_resume_that_changes_the_param_groups_says_why(change, shown, groups, tiny_overrides, tmp_path, capsys):
    """A forced change that regroups the optimiser's parameters is a one-line error naming the change, the groups and
    the settings that decide them, not torch's 'different number of parameter groups'; config.yaml is kept."""
    run = tmp_path / "r"
    Trainer(load_config(None, tiny_overrides + ["train.epochs=1", "train.max_steps=2"]), run).fit()
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--force", "--set", "train.max_steps=3", "--set", change]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"directpred: error: {re.escape(str(run / 'checkpoints' / 'last.pt'))} does not fit the configured optimiser "
        rf"\({re.escape(shown)}\): it holds the parameter groups \(tensors\) {groups}\. The optimiser's parameter "
        r"groups are decided by predictor\.name, predictor\.freq, predictor\.bias and optim\.name, which cannot change "
        r"on resume \(not even with --force\); start a new run with the new settings\n",
        err,
    ), err
    assert (run / "config.yaml").read_text() == before


def test_new_run_refuses_existing_run_dir(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["train.max_steps=1"])
    Trainer(cfg, tmp_path / "r").fit()
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(cfg, tmp_path / "r").setup()


def test_run_directory_contents_and_eval_reproduces(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    over = tiny_overrides + [
        "train.epochs=2",
        "eval.linear=true",
        "eval.linear_epochs=3",
        "eval.knn_every=1",
        "train.checkpoint_every=1",
    ]
    args = ["train", str(REPO / "configs" / "cpu" / "quickstart.yaml"), "--out", str(run)]
    for o in over:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "(cosine, k=10, T=0.1)" in out and "linear probe top-1" in out
    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "knn_top1",
        "linear_top1",
        "linear_top1_best",
        "epochs",
        "steps",
        "images_per_second",
        "wall_seconds",
        "git_commit",
    ):
        assert summary[key] is not None, key
    assert summary["epochs"] == 2 and summary["linear_top1_best"] >= summary["linear_top1"]
    hw = summary["hardware"]  # the machine that produced the figures
    assert hw["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and hw["cpus"] == os.cpu_count()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, summary["steps"] + 1))
    assert all(r["loss"] > 0 for r in train_rows)
    assert any(r["kind"] == "eval" and "knn_top1" in r for r in rows)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.pt").is_file()
    # `directpred eval` reproduces the run's figures from its checkpoint.
    assert main(["eval", str(run)]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["knn_top1"] == pytest.approx(summary["knn_top1"], abs=1e-6)
    assert ev["linear_top1"] == pytest.approx(summary["linear_top1"], abs=1e-6)
    # --checkpoint: the epoch-1 checkpoint reproduces the kNN measured during training after epoch 1.
    capsys.readouterr()
    epoch1 = run / "checkpoints" / "epoch_0001.pt"
    assert main(["eval", str(run), "--checkpoint", str(epoch1), "--no-linear"]) == 0
    ev1 = json.loads((run / "eval.json").read_text())
    assert ev1["checkpoint"] == str(epoch1) and ev1["step"] == summary["knn_history"][0]["step"] == 8
    assert ev1["knn_top1"] == pytest.approx(summary["knn_history"][0]["knn_top1"], abs=1e-6)
    assert "linear_top1" not in ev1 and "training run reported" not in capsys.readouterr().out


def test_eval_records_overrides_and_command_and_compares_top5(tiny_overrides, tmp_path, monkeypatch, capsys):
    """eval.json keeps the --set overrides and the command line; the comparison with the training run includes
    linear top-5 where the run has it (BYOL's protocol). The probe is replaced by fixed figures: only the
    bookkeeping is under test here (the figures' reproduction is the test above)."""
    import sys

    import directpred.eval.protocol as protocol

    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides + ["train.max_steps=1"]), run).fit()
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(
        json.dumps({**summary, "knn_top1": 50.0, "linear_top1": 40.0, "linear_top1_best": 41.0, "linear_top5": 75.0})
    )
    seen = {}

    def fixed(method, data, cfg, device, **kw):
        seen["knn_k"] = cfg.eval.knn_k
        return {"knn_top1": 52.0, "linear_top1": 39.5, "linear_top1_best": 41.0, "linear_top5": 80.0}

    monkeypatch.setattr(protocol, "evaluate", fixed)
    argv = ["eval", str(run), "--set", "eval.knn_k=5"]
    monkeypatch.setattr(sys, "argv", ["directpred", *argv])
    assert main(argv) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert seen["knn_k"] == 5
    assert ev["overrides"] == ["eval.knn_k=5"] and ev["command"] == f"directpred eval {run} --set eval.knn_k=5"
    assert ev["linear_top5"] == 80.0 and ev["step"] == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4:] == [
        "  knn_top1: training run reported 50.00 %, now 52.00 % (difference +2.00)",
        "  linear_top1: training run reported 40.00 %, now 39.50 % (difference -0.50)",
        "  linear_top1_best: training run reported 41.00 %, now 41.00 % (difference +0.00)",
        "  linear_top5: training run reported 75.00 %, now 80.00 % (difference +5.00)",
    ]


@pytest.mark.parametrize(
    "flags,linear",
    [
        ([], True),
        (["--no-linear"], False),
        (["--set", "eval.linear=false"], False),
        (["--set", "eval.linear=true"], True),
    ],
)
def test_eval_runs_the_probe_unless_asked_not_to(flags, linear, tiny_overrides, tmp_path, monkeypatch):
    """`directpred eval` runs the linear probe (also for a run trained with eval.linear=false, as tiny_overrides
    are) unless --no-linear or --set eval.linear=false; the override was ignored before."""
    import directpred.eval.protocol as protocol

    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides + ["train.max_steps=1"]), run).fit()
    seen = {}

    def fixed(method, data, cfg, device, **kw):
        seen["linear"] = kw["linear"]
        return {"knn_top1": 52.0}

    monkeypatch.setattr(protocol, "evaluate", fixed)
    assert main(["eval", str(run), *flags]) == 0
    assert seen["linear"] is linear


def test_eval_refuses_a_checkpoint_of_another_configuration(tiny_overrides, tmp_path, monkeypatch, capsys):
    """`eval RUN --checkpoint OTHER/...` evaluated another run's checkpoint of the same shape with RUN's recipe and
    wrote it into RUN/eval.json; now another configuration is refused, naming the keys. A checkpoint of RUN that
    differs only in what a resume may change (train.max_steps here) is evaluated."""
    import directpred.eval.protocol as protocol

    monkeypatch.setattr(protocol, "evaluate", lambda *a, **kw: {"knn_top1": 52.0})
    run, other = tmp_path / "run", tmp_path / "other"
    Trainer(load_config(None, tiny_overrides + ["train.max_steps=1"]), run).fit()
    Trainer(load_config(None, tiny_overrides + ["train.max_steps=1", "predictor.rho=0.5"]), other).fit()
    assert main(["eval", str(run), "--no-linear", "--checkpoint", str(other / "checkpoints" / "last.pt")]) == 2
    assert "predictor.rho: 0.3 in the run, 0.5 in the checkpoint" in capsys.readouterr().err
    assert not (run / "eval.json").exists()
    longer = tmp_path / "longer"
    Trainer(load_config(None, tiny_overrides + ["train.max_steps=2"]), longer).fit()
    assert main(["eval", str(run), "--no-linear", "--checkpoint", str(longer / "checkpoints" / "last.pt")]) == 0
    assert json.loads((run / "eval.json").read_text())["step"] == 2


def _evaluated_states(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Replace the protocol's evaluate by one that records the state of the method it is given."""
    import directpred.eval.protocol as protocol

    states: list[dict[str, torch.Tensor]] = []

    def record(method, data, cfg, device, **kw):
        states.append({k: v.detach().clone() for k, v in method.state_dict().items()})
        return {"knn_top1": 30.0 + len(states), "linear_top1": 40.0, "linear_top1_best": 41.0}

    monkeypatch.setattr(protocol, "evaluate", record)
    return states


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_untrained_evaluates_the_network_training_starts_from(tiny_overrides, tmp_path, monkeypatch, capsys):
    """`directpred eval RUN --untrained` (and `eval CONFIG --untrained`) evaluate the very network `directpred train`
    starts from, parameters and BatchNorm buffers, for the run's seed or another one given with --set train.seed;
    the run's eval_untrained.json records it, and the trained run's gain over it is printed."""
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["train.max_steps=2"])
    start = {k: v.detach().clone() for k, v in Trainer(cfg, tmp_path / "start").setup().method.state_dict().items()}
    Trainer(cfg, run).fit()
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "knn_top1": 50.0, "linear_top1": 45.0}))
    states = _evaluated_states(monkeypatch)
    capsys.readouterr()

    assert main(["eval", str(run), "--untrained"]) == 0
    assert _same_state(states[0], start)
    trained = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not _same_state(states[0], {k: v for k, v in trained.items() if k in start})  # training moved it
    record = json.loads((run / "eval_untrained.json").read_text())
    assert record["untrained"] is True and record["step"] == 0 and record["checkpoint"] is None
    assert record["seed"] == cfg.train.seed and record["knn_top1"] == 31.0
    assert not (run / "eval.json").exists()  # the trained network's record is another file
    out = capsys.readouterr().out
    assert "at its initialisation (train.seed=0), untrained:" in out
    assert "knn_top1: the trained run reported 50.00 %, +19.00 over its untrained network (31.00 %)" in out
    assert "linear_top1: the trained run reported 45.00 %, +5.00 over its untrained network (40.00 %)" in out

    # Another seed: that seed's initialisation (as training with it starts), and no gain read against this run.
    assert main(["eval", str(run), "--untrained", "--set", "train.seed=1", "--no-linear"]) == 0
    seed1 = load_config(None, tiny_overrides + ["train.max_steps=2", "train.seed=1"])
    assert _same_state(states[1], Trainer(seed1, tmp_path / "seed1").setup().method.state_dict())
    assert not _same_state(states[1], start)
    assert "over its untrained network" not in capsys.readouterr().out

    # A config file, before any run: the same network as the run's, written only where --json says.
    config = tmp_path / "recipe.yaml"
    config.write_text((run / "config.yaml").read_text())
    out_json = tmp_path / "baseline.json"
    assert main(["eval", str(config), "--untrained", "--no-linear", "--json", str(out_json)]) == 0
    assert _same_state(states[2], start)
    assert json.loads(out_json.read_text())["knn_top1"] == 33.0


def test_eval_untrained_reads_no_gain_it_cannot_read(tiny_overrides, tmp_path, monkeypatch, capsys):
    """A run trained without the probe has null linear figures ("not run"): no "nan %" comparison is printed for
    them; and an untrained network evaluated with other eval settings than the run's gets no gain line."""
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides + ["train.max_steps=1"]), run).fit()  # eval.linear=false
    _evaluated_states(monkeypatch)
    capsys.readouterr()
    assert main(["eval", str(run), "--untrained"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "knn_top1: the trained run reported" in out and "linear_top1:" not in out
    assert main(["eval", str(run), "--untrained", "--set", "eval.knn_k=5"]) == 0
    out = capsys.readouterr().out
    assert "(no gain over the trained run: evaluated with other eval.knn_k than it was)" in out
    assert "over its untrained network" not in out
    # nor one on other test images (a gain of 8 images against the run's 128 was printed); a moved copy is fine
    assert main(["eval", str(run), "--untrained", "--set", "data.test_subset=8"]) == 0
    out = capsys.readouterr().out
    assert "(no gain over the trained run: evaluated with other data.test_subset than it was)" in out
    assert main(["eval", str(run), "--untrained", "--set", "data.cache_dir=" + str(tmp_path / "c2")]) == 0
    assert "knn_top1: the trained run reported" in capsys.readouterr().out


def test_eval_untrained_figures_are_those_of_the_initial_network(tiny_overrides, tmp_path):
    """Unmocked: the kNN and probe figures `eval --untrained` writes are the protocol's figures for the network
    Trainer.setup builds (computed here independently of the CLI)."""
    cfg = load_config(None, tiny_overrides + ["train.max_steps=1", "eval.linear_epochs=2"])
    trainer = Trainer(cfg, tmp_path / "r").setup()
    expected = evaluate(trainer.method, trainer.data, cfg, trainer.device, linear=True)
    trainer.logger.close()
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["eval", str(config), "--untrained", "--json", str(tmp_path / "u.json")]) == 0
    got = json.loads((tmp_path / "u.json").read_text())
    for key in ("knn_top1", "linear_top1", "linear_top1_best"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key


def test_eval_untrained_refuses_a_checkpoint_and_a_config_without_it(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides + ["train.max_steps=1"]), run).fit()
    ckpt = run / "checkpoints" / "last.pt"
    assert main(["eval", str(run), "--untrained", "--checkpoint", str(ckpt)]) == 2
    assert "give one of --untrained and --checkpoint" in capsys.readouterr().err
    assert main(["eval", str(run / "config.yaml")]) == 2
    assert "add --untrained" in capsys.readouterr().err
    assert not (run / "eval.json").exists() and not (run / "eval_untrained.json").exists()


def test_eval_untrained_in_training_changes_nothing_of_the_run_and_matches_eval_untrained(
    tiny_overrides, tmp_path, capsys
):
    """eval.untrained: the run's summary gains the untrained network's figures (those `directpred eval RUN
    --untrained` computes on its own, from the seed), while the run itself, its checkpoint and its figures, is bit
    for bit the run without it (the extra evaluation's random draws are kept apart)."""
    over = tiny_overrides + ["train.max_steps=3", "eval.linear=true", "eval.linear_epochs=2"]
    plain = Trainer(load_config(None, over), tmp_path / "plain").fit()
    args = ["train", str(REPO / "configs" / "cpu" / "quickstart.yaml"), "--out", str(tmp_path / "u")]
    for o in over + ["eval.untrained=true"]:
        args += ["--set", o]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "u" / "summary.json").read_text())
    for key in ("knn_top1", "linear_top1", "linear_top1_best"):
        assert summary[key] == plain[key], key
    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "u" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert _same_state(a, b)
    assert main(["eval", str(tmp_path / "u"), "--untrained"]) == 0
    alone = json.loads((tmp_path / "u" / "eval_untrained.json").read_text())
    for key in ("knn_top1", "linear_top1", "linear_top1_best"):
        assert summary[f"untrained_{key}"] == pytest.approx(alone[key], abs=1e-6), key
    gain = summary["linear_top1_best"] - summary["untrained_linear_top1_best"]
    assert f"linear best {summary['untrained_linear_top1_best']:.2f} % ({gain:+.2f})" in printed
    final = [r for r in read_metrics(tmp_path / "u") if r.get("kind") == "final"]
    assert len(final) == 1 and final[0]["untrained_knn_top1"] == summary["untrained_knn_top1"]
    assert "untrained_knn_top1" not in plain


def test_tiny_run_learns_beyond_its_random_initialisation(tiny_overrides, tmp_path):
    """Random features already separate the coloured blobs (69-81 % kNN measured over seeds); four epochs of BYOL +
    DirectPred must do better than the same network at its initialisation (100 % measured)."""
    cfg = load_config(None, tiny_overrides + ["train.epochs=4", "backbone.width=8"])
    trainer = Trainer(cfg, tmp_path / "r").setup()
    at_init = evaluate(trainer.method, trainer.data, cfg, trainer.device, linear=False)["knn_top1"]
    summary = trainer.fit()
    assert summary["knn_top1"] > at_init and summary["knn_top1"] >= 90.0, (at_init, summary["knn_top1"])


def test_compiled_encoder_trains_and_checkpoints_like_eager(tiny_overrides, tmp_path):
    """``train.compile`` compiles the encoder in place: same checkpoint keys, the same losses as eager."""
    eager = Trainer(load_config(None, tiny_overrides + ["train.max_steps=2"]), tmp_path / "eager").fit()
    compiled = Trainer(
        load_config(None, tiny_overrides + ["train.max_steps=2", "train.compile=true"]), tmp_path / "compiled"
    ).fit()
    a, b = _final_state(tmp_path / "eager"), _final_state(tmp_path / "compiled")
    assert a.keys() == b.keys()
    assert all(torch.isfinite(v).all() for v in b.values() if v.is_floating_point())
    assert compiled["steps"] == eager["steps"] == 2
    losses = [[r["loss"] for r in read_metrics(tmp_path / n) if r["kind"] == "train"] for n in ("eager", "compiled")]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_the_knn_line_and_summary_give_the_k_that_voted(tiny_overrides, tmp_path, capsys):
    """k larger than the labelled training set: every image votes (with a warning), and the result line said the k
    asked for, a protocol that was not run."""
    run = tmp_path / "run"
    args = ["train", str(REPO / "configs" / "cpu" / "quickstart.yaml"), "--out", str(run)]
    for o in tiny_overrides + ["train.max_steps=1", "eval.knn_k=500"]:
        args += ["--set", o]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "k=500 is more than the 128 labelled training images; k=128 is used" in captured.err
    assert "(cosine, k=128, T=0.1)" in captured.out
    assert json.loads((run / "summary.json").read_text())["knn_k_used"] == 128
