"""Bad input found by a second audit of the command line: each case once did damage, crashed with a traceback or
misled, and now ends in one line that names the problem and the fix, with nothing written lost."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_override_list, write_folder

from directpred.cli import main
from directpred.config import ConfigError, load_config, parse_override
from directpred.data.datasets import DataError, load_data
from directpred.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory) -> Path:
    """A finished two-step run of the tiny network (tests copy it before changing anything)."""
    base = tmp_path_factory.mktemp("cli_bad_input_more")
    over = tiny_override_list(tiny_folder, base / "cache") + ["train.max_steps=2", "log.backends=[]"]
    Trainer(load_config(None, over), base / "run").fit()
    return base / "run"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("target", ["checkpoints/last.pt", "config.yaml", "summary.json", "metrics.jsonl"])
def test_eval_json_is_refused_over_the_runs_own_files(run, target, capsys):
    """`eval --json RUN/checkpoints/last.pt` replaced the run's only checkpoint by a JSON record (it could never
    resume), and over config.yaml or summary.json broke or rewrote the run, all with exit code 0."""
    before = _digest(run)
    assert main(["eval", str(run), "--no-linear", "--json", str(run / target)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"directpred: error: --json {run / target} is ")
    assert "the record would" in err and "eval_copy.json" in err
    assert _digest(run) == before


def test_eval_json_may_name_the_runs_own_eval_record(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["eval", str(copy), "--no-linear", "--json", str(copy / "eval.json")]) == 0
    assert (copy / "eval.json").is_file()


def test_theory_simulate_refuses_a_training_runs_directory(run, tmp_path, capsys):
    """`theory simulate ... --out RUN` replaced the run's summary.json (its accuracies and verdicts)."""
    before = _digest(run)
    cfg = REPO / "configs" / "theory" / "linear.yaml"
    assert main(["theory", "simulate", str(cfg), "--out", str(run), "--set", "steps=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {run} is a training run's directory (it holds config.yaml and checkpoints)" in err
    assert f"--out {run / 'theory'}" in err
    assert _digest(run) == before


@pytest.mark.parametrize(
    "argv,option",
    [
        (["train", "configs/cpu/quickstart.yaml", "--resume", ""], "--resume"),  # trained a new run before
        (["train", "--resume", " "], "--resume"),
        (["eval", ""], "RUN_DIR"),  # evaluated the current directory
        (["theory", "simulate", "configs/theory/linear.yaml", "--out", ""], "--out"),  # wrote into the cwd
        (["shards", "x", "--out", ""], "--out"),
        (["export", "r", "--out", "b.pt", "--onnx", ""], "--onnx"),
    ],
)
def test_an_empty_path_is_refused_naming_the_option(argv, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"directpred: config error: {option} is empty (an unset shell variable?); give the path, or leave {option} out"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_test_subset_smaller_than_the_classes_is_refused(tiny_overrides):
    """A test_subset of 1 (tiny_folder: 4 classes) tested one class and printed a kNN top-1 of 100 %."""
    with pytest.raises(DataError, match=r"data.test_subset=3 is fewer images than the 4 classes of the test split"):
        load_data(load_config(None, tiny_overrides + ["data.test_subset=3"]).data)
    assert sorted(load_data(load_config(None, tiny_overrides + ["data.test_subset=4"]).data).test.labels.tolist()) == [
        0,
        1,
        2,
        3,
    ]


def test_file_and_class_names_that_are_not_utf8_are_read_and_sharded(tmp_path):
    """A Latin-1 file name (b'caf\\xe9.png') crashed the decoded cache's key with UnicodeEncodeError; a class folder
    so named crashed `directpred shards` writing classes.txt. Both now keep the name's bytes."""
    root = write_folder(tmp_path / "data", n_train=4, n_test=2, n_classes=2)
    first = sorted((root / "train" / "class0").iterdir())[0]
    os.rename(first, os.path.join(os.fsencode(first.parent), b"caf\xe9.png"))
    latin = os.fsdecode(os.path.join(os.fsencode(root / "train"), b"cl\xe4ss1"))
    os.rename(root / "train" / "class1", latin)
    os.rename(root / "test" / "class1", os.fsdecode(os.path.join(os.fsencode(root / "test"), b"cl\xe4ss1")))
    cfg = load_config(None, ["data.dataset=folder", f"data.path={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    data = load_data(cfg.data)
    assert len(data.pretrain) == 8 and sorted(set(data.pretrain.labels.tolist())) == [0, 1]
    from directpred.data.stream import ShardReader, write_shards

    write_shards(root, tmp_path / "shards", shard_size=3)
    assert ShardReader(tmp_path / "shards", "train").classes == ["class0", os.path.basename(latin)]


def test_shards_hint_is_a_command_that_trains_and_a_shard_folder_without_stream_says_so(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n_train=4, n_test=2, n_classes=2)
    out = tmp_path / "my shards"
    assert main(["shards", str(root), "--out", str(out)]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.endswith(
        "--set data.dataset=folder --set data.stream=true --set data.image_size=SIZE (e.g. 224) --set "
        f"data.path='{out}'"
    )
    cfg = load_config(None, ["data.dataset=folder", f"data.path={out}", f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(DataError, match=r"holds tar shards \(classes.txt, train-NNNNNN.tar\), which are read streamed"):
        load_data(cfg.data)


def test_a_new_run_refuses_a_folder_with_someone_elses_metrics_jsonl(tiny_overrides, tmp_path, capsys):
    """A metrics.jsonl without a command.txt beside it (no run wrote it) was truncated and appended to."""
    folder = tmp_path / "project"
    folder.mkdir()
    log = folder / "metrics.jsonl"
    log.write_text('{"step": 5, "mine": 1}\nhello world\n{"step": 0}\n')
    sets = [a for o in tiny_overrides + ["train.max_steps=1"] for a in ("--set", o)]
    assert main(["train", str(REPO / "configs" / "cpu" / "quickstart.yaml"), "--out", str(folder), *sets]) == 1
    assert "holds a metrics.jsonl that no run wrote (no command.txt beside it)" in capsys.readouterr().err
    assert log.read_text() == '{"step": 5, "mine": 1}\nhello world\n{"step": 0}\n'


def test_export_refuses_one_file_for_two_formats(run, tmp_path, capsys):
    """--out and --torchscript at one path: the TorchScript file replaced the state dict, both reported written."""
    out = tmp_path / "b.pt"
    assert main(["export", str(run), "--out", str(out), "--torchscript", str(out)]) == 1
    assert "--out and --torchscript name the same file" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("axes,variants", [({5: [1, 2]}, None), (None, {None: {"predictor.rho": 0.5}})])
def test_a_sweep_axis_or_variant_that_is_not_a_name_is_refused(axes, variants, tmp_path, capsys):
    spec = {"base": str(REPO / "configs" / "cpu" / "quickstart.yaml"), "seeds": [0]}
    spec |= {"axes": axes} if axes else {"variants": variants}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    kind = "axes" if axes else "variants"
    assert f"{kind} has the key {list(axes or variants)[0]!r}, which is not a name" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--tau", "1e200"], ["--eta", "1e308"], ["--alpha-p", "1e-320"]])
def test_theory_portrait_at_values_beyond_float64_is_one_line(flag, tmp_path, capsys):
    assert main(["theory", "portrait", "--out", str(tmp_path / "p.png"), *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "beyond what float64 can compute" in err[0] and "use values of ordinary size" in err[0]
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epochs=010", "a leading 0 makes YAML read 010 as an octal number (8); write 10"),
        ("train.seed=-05", "write -5"),
        ("train.epochs=1:30", "YAML reads 1:30 as a base-60 number (90)"),
        ("data.path=imgs #2", "' #' starts a YAML comment, so the value would be read as 'imgs'"),
    ],
)
def test_yaml_11_readings_a_command_line_does_not_mean_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_override(override)


def test_quoted_or_ordinary_values_are_taken_as_written():
    assert parse_override("data.path='imgs #2'") == ("data.path", "imgs #2")
    assert parse_override("data.path=a#b") == ("data.path", "a#b")
    assert parse_override("train.epochs=10") == ("train.epochs", 10)
    assert parse_override("train.epochs=0") == ("train.epochs", 0)
    assert parse_override("optim.lr=0.03") == ("optim.lr", 0.03)


@pytest.mark.parametrize(
    "override,message",
    [
        ("log.project=2024", "expected str: YAML read the value as an int; quote it for a string"),
        ("data.path=2024-01-01", "expected str or NoneType: YAML read the value as a date; quote it"),
        ("train.epochs=1e3", "expected int: write 1000"),
        ("train.epochs=2.0", "expected int: write 2"),
    ],
)
def test_a_value_of_the_wrong_type_says_how_to_write_what_was_meant(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_ema_settings_under_simsiam_draw_a_warning_as_unread_predictor_options_do():
    with pytest.warns(UserWarning) as caught:
        load_config(None, ["method.name=simsiam", "method.ema=0.99", "method.target_init=random"])
    assert [str(w.message) for w in caught] == [
        "method.ema=0.99, method.target_init=random have no effect: method.name=simsiam has no EMA target (its "
        "target is the online branch under a stop-gradient); config.yaml records them as given"
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["method.name=simsiam"])
        load_config(None, ["method.name=byol", "method.ema=0.99"])


def test_theory_simulate_given_a_training_config_says_what_it_is(capsys):
    """It said "data: {...} is not allowed; expected one of 'isotropic', ..." of the training config's data section."""
    cfg = REPO / "configs" / "cpu" / "quickstart.yaml"
    assert main(["theory", "simulate", str(cfg), "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"directpred theory simulate: error: {cfg} is a training config (it has method:, predictor:")
    assert f"train with it by `directpred train {cfg}`" in err
    assert not Path("unused").exists()


def test_a_mistake_in_a_sweeps_base_config_is_named_there(tmp_path, capsys):
    """A typo in the base config was reported as "sw.yaml: cell 'a' (seed 0): unknown config key 'train.epoch'",
    naming neither the file that holds it nor that every cell has it."""
    (tmp_path / "badbase.yaml").write_text("train:\n  epoch: 3\n")
    (tmp_path / "sw.yaml").write_text("base: badbase.yaml\nvariants:\n  a: {predictor.rho: 0.5}\nseeds: [0]\n")
    assert main(["sweep", str(tmp_path / "sw.yaml"), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"sw.yaml: its base config {tmp_path / 'badbase.yaml'}: unknown config key 'train.epoch'" in err
    (tmp_path / "sw.yaml").write_text("base: badbase.yaml\nvariants:\n  a: {predictor.rho: -1}\nseeds: [0]\n")
    (tmp_path / "badbase.yaml").write_text("train:\n  epochs: 3\n")
    assert main(["sweep", str(tmp_path / "sw.yaml"), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "sw.yaml: cell 'a' (seed 0): " in capsys.readouterr().err  # a cell's own mistake: the cell named


def test_options_that_contradict_or_go_unused_are_refused(run, tmp_path, capsys):
    """--no-linear won over --set eval.linear=true, and diagnose --no-data ignored --batches, both without a word."""
    assert main(["eval", str(run), "--no-linear", "--set", "eval.linear=true"]) == 2
    assert "--no-linear and --set eval.linear=true ask for opposite things" in capsys.readouterr().err
    assert main(["diagnose", str(run), "--no-data", "--batches", "3"]) == 2
    assert "--batches 3 runs training batches, which --no-data leaves out" in capsys.readouterr().err
    assert main(["diagnose", str(run), "--no-data"]) == 0  # each alone is fine


def test_a_checkpoint_option_naming_a_directory_says_so(run, capsys):
    assert main(["eval", str(run), "--no-linear", "--checkpoint", str(run)]) == 1
    assert f"{run} is a directory, not a checkpoint file; give a file such as {run / 'checkpoints' / 'last.pt'}" in (
        capsys.readouterr().err
    )


def test_a_portrait_into_an_existing_folder_goes_inside_it(tmp_path, capsys):
    folder = tmp_path / "figs"
    folder.mkdir()
    assert main(["theory", "portrait", "--out", str(folder)]) == 0
    assert (folder / "portrait.png").is_file() and not (tmp_path / "figs.png").exists()
