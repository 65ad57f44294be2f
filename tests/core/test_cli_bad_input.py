"""Misuse of every subcommand (a missing or damaged run directory, checkpoint, config or metrics file, a malformed
``--set``) ends in one ``directpred...: error`` line that names the problem and the fix, never in a traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from directpred.cli import main
from directpred.config import load_config
from directpred.export import export_backbone
from directpred.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
CKPT = Path("checkpoints") / "last.pt"
BROKEN_YAML = "train: {epochs: 1\n  x: ["  # PyYAML's message for it spans eight lines
RANDOM = "binary data that is neither a zip archive (torch.save's format) nor a pickle"
YAML_PROBLEM = "not valid YAML (line 2, column 4: expected ',' or '}', but got ':')"


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory) -> Path:
    """A finished two-step run of the tiny network; each test damages its own copy."""
    base = tmp_path_factory.mktemp("cli_bad_input")
    cfg = load_config(
        None,
        [
            "data.dataset=folder",
            f"data.path={tiny_folder}",
            f"data.cache_dir={base / 'cache'}",
            "backbone.width=4",
            "projector.hidden_dim=32",
            "projector.out_dim=16",
            "train.batch_size=16",
            "train.max_steps=2",
            "train.progress=false",
            "train.device=cpu",
            "train.precision=fp32",
            "eval.knn_every=0",
            "eval.linear=false",
            "eval.knn_k=10",
            "diag.every=0",
            "log.backends=[]",
        ],
    )
    Trainer(cfg, base / "run").fit()
    return base / "run"


def _set_config(run: Path, text: str) -> None:
    (run / "config.yaml").write_text(text)


def _old_key(run: Path) -> None:
    """A config.yaml with a key this version does not know (a run written by another version)."""
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["predictor"]["old_knob"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(data))


def _exported_as_checkpoint(run: Path) -> None:
    """last.pt replaced by the run's exported backbone (a file `directpred export` wrote)."""
    export_backbone(run, run / "backbone.pt")
    shutil.move(run / "backbone.pt", run / CKPT)


def _corrupt_image_folder(run: Path) -> None:
    """An ImageFolder beside the run ({tmp}/images) whose one image does not decode."""
    (run.parent / "images" / "a").mkdir(parents=True)
    (run.parent / "images" / "a" / "0.png").write_bytes(b"not an image")


DAMAGE = {
    "none": lambda run: None,
    "missing": lambda run: shutil.rmtree(run),
    "no_config": lambda run: (run / "config.yaml").unlink(),
    "no_checkpoint": lambda run: shutil.rmtree(run / "checkpoints"),
    # killed before its first checkpoint: no summary.json either
    "not_started": lambda run: (shutil.rmtree(run / "checkpoints"), (run / "summary.json").unlink()),
    "empty_checkpoint": lambda run: (run / CKPT).write_bytes(b""),
    "random_checkpoint": lambda run: (run / CKPT).write_bytes(np.random.default_rng(0).bytes(4096)),
    # bytes that start like torch.save's legacy pickle format and then go wrong
    "pickle_checkpoint": lambda run: (run / CKPT).write_bytes(b"\x80\x02" + np.random.default_rng(0).bytes(4096)),
    "truncated_checkpoint": lambda run: (run / CKPT).write_bytes((run / CKPT).read_bytes()[:20_000]),
    "list_config": lambda run: _set_config(run, "- 1\n- 2\n"),
    "broken_config": lambda run: _set_config(run, BROKEN_YAML),
    "empty_config": lambda run: _set_config(run, ""),
    "old_key_config": _old_key,
    "exported_checkpoint": _exported_as_checkpoint,
    "corrupt_image": _corrupt_image_folder,
}

# (damage to the run directory, the command ({run}: the run, {tmp}: a scratch folder with broken.yaml and list.yaml,
# {data}: an ImageFolder), exit code, a fragment of the one error line)
CASES = [
    # a run directory's config.yaml that is missing, not YAML, not a mapping, or from another version
    ("missing", "train --resume {run}", 2, "no such directory; give a run directory made by `directpred train`"),
    ("no_config", "train --resume {run}", 2, "no config.yaml there; give a run directory made by `directpred train`"),
    ("list_config", "train --resume {run}", 2, "config.yaml: it holds a list, not the run's config"),
    ("broken_config", "train --resume {run}", 2, f"config.yaml: {YAML_PROBLEM}; restore it"),
    ("empty_config", "train --resume {run}", 2, "config.yaml: it is empty, not the run's config"),
    ("old_key_config", "train --resume {run}", 2, "unknown config key 'predictor.old_knob'"),
    ("missing", "eval {run} --no-linear", 2, "no such directory"),
    ("no_config", "eval {run} --no-linear", 2, "no config.yaml there"),
    ("list_config", "eval {run} --no-linear", 2, "config.yaml: it holds a list"),
    ("broken_config", "eval {run} --no-linear", 2, YAML_PROBLEM),
    ("empty_config", "eval {run} --no-linear", 2, "config.yaml: it is empty"),
    ("old_key_config", "eval {run} --no-linear", 2, "perhaps written by another version of directpred: edit the file"),
    ("broken_config", "export {run} --out {tmp}/b.pt", 2, YAML_PROBLEM),
    ("empty_config", "export {run} --out {tmp}/b.pt", 2, "config.yaml: it is empty"),  # was a wrong export
    ("list_config", "embed {run} --data {data} --out {tmp}/f.npy", 2, "config.yaml: it holds a list"),
    ("empty_config", "embed {run} --data {data} --out {tmp}/f.npy", 2, "config.yaml: it is empty"),
    # YAML files and --set values that do not parse
    ("none", "train {tmp}/broken.yaml", 2, f"broken.yaml: {YAML_PROBLEM}"),
    ("none", "train {tmp}/list.yaml", 2, "list.yaml: the top level must be a mapping of sections"),
    ("none", "sweep {tmp}/broken.yaml --out {tmp}/sweep --dry-run", 2, f"broken.yaml: {YAML_PROBLEM}"),
    ("none", "theory simulate {tmp}/broken.yaml --out {tmp}/sim", 2, f"broken.yaml: {YAML_PROBLEM}"),
    ("none", "theory simulate {tmp}/no.yaml --out {tmp}/sim", 2, "config file '{tmp}/no.yaml' does not exist"),
    ("none", "train {quickstart} --set train.epochs=[1", 2, "cannot parse the value (line 1, column 3:"),
    ("none", "train {quickstart} --set train.epochs", 2, "override 'train.epochs' must look like key=value"),
    ("none", "train {quickstart} --set train.epoch=3", 2, "Did you mean 'train.epochs'?"),
    ("none", "eval {run} --no-linear --set eval.knn_kk=3", 2, "Did you mean 'eval.knn_k'?"),
    ("none", "sweep {tmp}/list.yaml --out {tmp}/sweep", 2, "the top level must be a mapping with keys base, set"),
    # damaged checkpoints: corrupt, not "crafted to run code" (random bytes were called that before); a file that no
    # torch.save wrote (not a zip, not a pickle) is "not a checkpoint file", not a damaged checkpoint
    ("empty_checkpoint", "train --resume {run}", 1, "last.pt is empty (0 bytes), not a checkpoint; the run keeps"),
    ("empty_checkpoint", "export {run} --out {tmp}/b.pt", 1, "last.pt is empty (0 bytes)"),
    ("random_checkpoint", "eval {run} --no-linear", 1, f"last.pt is not a checkpoint file ({RANDOM}); expected a .pt"),
    ("random_checkpoint", "diagnose {run} --no-data", 1, f"last.pt is not a checkpoint file ({RANDOM})"),
    ("random_checkpoint", "embed {run} --data {data} --out {tmp}/f.npy", 1, "last.pt is not a checkpoint file"),
    ("random_checkpoint", "train --resume {run}", 1, "overwrote a run's checkpoint, the run keeps"),
    ("pickle_checkpoint", "eval {run} --no-linear", 1, "last.pt is a damaged checkpoint, cut short or with changed "),
    ("truncated_checkpoint", "train --resume {run}", 1, "last.pt is a damaged checkpoint, cut short or with changed "),
    (
        "none",
        "export {tmp}/list.yaml --out {tmp}/b.pt",
        1,
        'list.yaml is not a checkpoint file (a text file beginning "- 1"); expected a .pt written by `directpred',
    ),
    (
        "corrupt_image",
        "embed {run} --data {tmp}/images --out {tmp}/f.npy",
        1,
        "Remove or replace them, or pass --skip-c",
    ),
    ("none", "diagnose {run} --batches -1", 2, "--batches -1: must be >= 0 (training batches to run; 0 or"),
    ("none", "sweep {tmp}/sweep.yaml --out {tmp}/typo --report", 2, "--report: no runs under {tmp}/typo/runs; give"),
    ("none", "train {tmp}/sweep.yaml --out {tmp}/x", 2, "sweep.yaml is a sweep file (base, variants/axes, seeds), n"),
    ("none", "sweep {quickstart} --out {tmp}/x", 2, "quickstart.yaml is a training config, not a sweep file; train"),
    # a checkpoint that does not fit the configured model (a traceback of load_state_dict before)
    ("none", "eval {run} --no-linear --set backbone.width=8", 2, "--set backbone.width: these describe how the run"),
    ("none", "train --resume {run} --force --set predictor.name=linear", 1, "does not fit the configured model (Missi"),
    # embed's own flags (a traceback of range() or torch.device before)
    ("none", "embed {run} --data {data} --out {tmp}/f.npy --batch-size 0", 2, "--batch-size 0: must be >= 1"),
    ("none", "embed {run} --data {data} --out {tmp}/f.npy --device cudafoo", 2, "--device 'cudafoo': use auto, cpu"),
    # --data naming a file that is no archive (tarfile's four-line complaint before)
    (
        "none",
        "embed {run} --data {data}/test/class0/0000.png --out {tmp}/f.npy",
        1,
        "0000.png is a file, not a folder or .tar/.tar.gz archive; give the folder that holds the images",
    ),
    ("none", "embed {run} --data {quickstart} --out {tmp}/f.npy", 1, "quickstart.yaml is a file, not a folder or"),
    # resume: nothing to resume, or a change that cannot be resumed (the difference in the same line)
    ("not_started", "train --resume {run}", 1, "first checkpoint); start it again with `directpred train"),
    ("no_checkpoint", "train --resume {run}", 1, "a finished run ({tmp}/run/summary.json) whose checkpoints"),
    ("no_checkpoint", "train {run}/config.yaml --out {run}", 1, "holds a finished run ({tmp}/run/summary.json;"),
    ("none", "train --resume {run} --set backbone.width=8", 1, "configuration (backbone.width: 4 -> 8). Only these"),
    # flags that a new run or a resume would silently ignore
    ("none", "train --resume {run} --out {tmp}/other", 2, "with --resume: a resumed run continues in its own"),
    ("none", "train {quickstart} --out {tmp}/new --force", 2, "--force applies only with --resume RUN_DIR"),
    # a run directory or a checkpoint given where a YAML file is expected
    ("none", "train {run}", 2, "is a directory, not a YAML file; to continue the run in it: directpred train --resume"),
    ("none", "train {run}/checkpoints/last.pt", 2, "last.pt: not a YAML text file ('utf-8' codec can't decode"),
    ("none", "sweep {run}/checkpoints/last.pt --out {tmp}/sweep", 2, "last.pt: not a YAML text file"),
    ("none", "theory simulate {run}/checkpoints/last.pt --out {tmp}/sim", 2, "last.pt: not a YAML text file"),
    # an exported backbone where a training checkpoint is needed (a KeyError before)
    ("exported_checkpoint", "train --resume {run}", 1, "last.pt is an exported backbone (`directpred export`); give"),
    ("exported_checkpoint", "eval {run} --no-linear", 1, "last.pt is an exported backbone"),
    ("exported_checkpoint", "diagnose {run} --no-data", 1, "last.pt is an exported backbone"),
    ("exported_checkpoint", "export {run} --out {tmp}/b.pt", 1, "last.pt is an exported backbone"),
    # what was already refused in one line
    ("missing", "plot {run}", 2, "not a directory; give run directories made by `directpred train`"),
    ("missing", "diagnose {run} --no-data", 2, "no such run directory or checkpoint file"),
    ("no_checkpoint", "diagnose {run} --no-data", 2, "no checkpoints/last.pt; give a run directory or a checkpoint"),
    ("no_checkpoint", "eval {run} --no-linear", 1, "no checkpoint at "),
    ("no_checkpoint", "export {run} --out {tmp}/b.pt", 1, "no checkpoint at "),
    ("truncated_checkpoint", "eval {run} --no-linear", 1, "last.pt is a damaged checkpoint"),
    # a directory where a file goes, a file where a directory goes: "Is a directory; ... then resume" (export), "File
    # exists (afile)" (plot, theory), "no such directory" (a checkpoint given to eval or resume) before
    (
        "none",
        "export {run} --out {tmp}",
        1,
        "error: cannot write {tmp}: it is a directory, not a file; give the path of a file to write (or remove the "
        "directory), then run the command again",
    ),
    (
        "none",
        "export {run} --out {tmp}/list.yaml/b.pt",
        1,
        "cannot write {tmp}/list.yaml/b.pt: {tmp}/list.yaml is a file, not a directory; give another path (or move",
    ),
    (
        "none",
        "plot {run} --out {tmp}/list.yaml",
        1,
        "directpred plot: error: {tmp}/list.yaml is a file, not a directory: give another path (a directory, or one "
        "to create), or move the file away, and run the command again",
    ),
    (
        "none",
        "theory simulate {theory} --out {tmp}/list.yaml/sim --set steps=10",
        1,
        "directpred theory: error: {tmp}/list.yaml is a file, not a directory ({tmp}/list.yaml/sim would be inside "
        "it): give another path",
    ),
    (
        "none",
        "eval {run}/checkpoints/last.pt --no-linear",
        2,
        "{run}/checkpoints/last.pt is a file, not a run directory; give the run directory made by `directpred "
        "train`, and the checkpoint with --checkpoint: `directpred eval {run} --checkpoint {run}/checkpoints/last.pt`",
    ),
    (
        "none",
        "train --resume {run}/checkpoints/last.pt",
        2,
        "{run}/checkpoints/last.pt is a file, not a run directory; give the run directory made by `directpred train` "
        "that holds it ({run})",
    ),
    ("none", "train --resume {tmp}/list.yaml", 2, "list.yaml is a file, not a run directory; give the run directo"),
    (  # it suggested `directpred eval RUN_DIR --checkpoint quickstart.yaml`, a YAML file as the checkpoint
        "none",
        "eval {quickstart}",
        2,
        "{quickstart} is a config file: a config has no trained network to evaluate; give the run directory "
        "`directpred train {quickstart} --out RUN` made, or add --untrained to evaluate the network training starts "
        "from",
    ),
]


def _argv(command: str, run: Path, tmp: Path, data: Path) -> list[str]:
    quickstart = REPO / "configs" / "cpu" / "quickstart.yaml"
    theory = REPO / "configs" / "theory" / "linear.yaml"
    return command.format(run=run, tmp=tmp, data=data, quickstart=quickstart, theory=theory).split()


@pytest.mark.parametrize(
    "damage,command,code,message", CASES, ids=[f"{c[1].split()[0]}-{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_misuse_ends_in_one_error_line(damage, command, code, message, trained, tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    DAMAGE[damage](run)
    (tmp_path / "broken.yaml").write_text(BROKEN_YAML)
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "sweep.yaml").write_text(
        f"base: {REPO / 'configs' / 'cpu' / 'quickstart.yaml'}\naxes: {{eval.knn_k: [5]}}\nseeds: [0]\n"
    )
    assert main(["-q", *_argv(command, run, tmp_path, tiny_folder)]) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("directpred")]
    assert len(errors) == 1 and errors[0] == err[-1], err  # the error is one line, the last
    quickstart = str(REPO / "configs" / "cpu" / "quickstart.yaml")
    expected = message.replace("{tmp}", str(tmp_path)).replace("{run}", str(run)).replace("{quickstart}", quickstart)
    assert expected in errors[0], errors[0]
    assert "Traceback" not in "\n".join(err)


def test_a_failed_resume_leaves_the_run_config_as_it_was(trained, tmp_path, capsys):
    """config.yaml takes a resume's --set changes only once the checkpoint has loaded into the model they describe:
    before, a refused --force resume left a config.yaml that no longer fitted the checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "config.yaml").read_text()
    assert main(["-q", "train", "--resume", str(run), "--force", "--set", "predictor.name=linear"]) == 1
    assert (run / "config.yaml").read_text() == before
    (run / CKPT).write_bytes(b"")
    assert main(["-q", "train", "--resume", str(run), "--set", "train.max_steps=5"]) == 1
    assert (run / "config.yaml").read_text() == before
    assert "last.pt is empty (0 bytes)" in capsys.readouterr().err


def test_a_hand_edited_run_config_is_refused_on_resume_as_its_set_would_be(trained, tmp_path, capsys):
    """config.yaml was compared only with itself plus --set: an edit of it (method.ema 0.996 -> 0.5) passed, and the
    run continued with settings its earlier steps never had while config.yaml claimed them throughout."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    edited = (run / "config.yaml").read_text().replace("  ema: 0.996\n", "  ema: 0.5\n", 1)
    assert edited != (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(edited)
    assert main(["-q", "train", "--resume", str(run), "--set", "train.max_steps=3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"directpred: error: {run / 'config.yaml'} differs from the configuration its checkpoint was trained with "
        "(method.ema: 0.996 -> 0.5); config.yaml records what the run trained with: undo the edit and change "
        "allowed settings with --set, start a new run with the new settings, or pass --force to resume anyway (as "
        "needed again after a --force resume that stopped before its first checkpoint)"
    )
    from directpred.train.checkpoint import load_checkpoint

    assert load_checkpoint(run / CKPT)["step"] == 2  # nothing trained
    assert main(["-q", "train", "--resume", str(run), "--force", "--set", "train.max_steps=3"]) == 0
    assert load_checkpoint(run / CKPT)["step"] == 3


def test_the_hint_for_a_run_without_checkpoint_works(trained, tmp_path, capsys):
    """`nothing to resume` suggests starting the run again from its own config.yaml, into the same directory."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoints")
    (run / "summary.json").unlink()  # killed before its first checkpoint: no summary either
    assert main(["-q", "train", "--resume", str(run)]) == 1
    hint = capsys.readouterr().err.strip().splitlines()[-1].split("start it again with `")[1].rstrip("`")
    assert hint == f"directpred train {run / 'config.yaml'} --out {run}"
    assert main(["-q", *hint.split()[1:]]) == 0
    assert (run / CKPT).is_file()


def test_a_new_run_over_a_finished_run_or_a_foreign_config_is_refused(trained, tmp_path, capsys):
    """A finished run whose checkpoints/ was removed, and a directory holding someone's config.yaml: a new run into
    either overwrote config.yaml (and metrics.jsonl, summary.json) without a word. Both are refused before any file
    changes, naming what is there and the ways on; --resume of the finished run says it cannot be resumed, and its
    hint (another directory) works."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoints")

    def files(d: Path) -> dict[str, bytes]:
        return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}

    before = files(run)
    config = run / "config.yaml"
    assert main(["-q", "train", str(config), "--out", str(run), "--set", "train.max_steps=1"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"directpred: error: {run} already holds a finished run ({run / 'summary.json'}; its checkpoints/last.pt is "
        f"gone) that a new run would overwrite; choose another --out, or remove {run} to start over there"
    )
    assert main(["-q", "train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"directpred: error: nothing to resume in {run}: it holds a finished run ({run / 'summary.json'}) whose "
        f"checkpoints/last.pt is gone; to train it again, start a new run with `directpred train {config} --out "
        "OTHER_DIR` (or remove the directory first)"
    )
    assert files(run) == before  # command.txt included: refused before it is written
    hint = err.split("start a new run with `")[1].split("`")[0].replace("OTHER_DIR", str(tmp_path / "again"))
    assert main(["-q", *hint.split()[1:], "--set", "train.max_steps=1"]) == 0
    assert (tmp_path / "again" / CKPT).is_file() and files(run) == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("# my settings\n")
    assert main(["-q", "train", str(config), "--out", str(foreign)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"directpred: error: {foreign} holds a config.yaml that no run wrote (no command.txt beside it) and a new "
        "run would overwrite it; choose another --out (an empty or new directory)"
    )
    assert files(foreign) == {"config.yaml": b"# my settings\n"}


def _damage_metrics(run: Path) -> list[str]:
    """Lines 2-4 of metrics.jsonl replaced by a torn row, a JSON list and a row whose step is a string."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1:1] = ['{"kind": "train", "st', "[1, 2]", '{"kind": "train", "step": "x", "loss": 1.0}']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return lines


def test_damaged_metrics_lines_are_skipped_with_a_warning_naming_them(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _damage_metrics(run)
    assert main(["-q", "plot", str(run), "--out", str(tmp_path / "plots")]) == 0  # an AttributeError before
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"WARNING: UserWarning: {run / 'metrics.jsonl'}: skipped 3 unreadable line(s) (line 2, 3, 4); "
        "the other rows are used"
    ]
    assert (tmp_path / "plots" / "overview.png").is_file()


def test_resume_drops_damaged_metrics_lines(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    lines = _damage_metrics(run)
    assert main(["-q", "train", "--resume", str(run), "--set", "train.max_steps=3"]) == 0  # an AttributeError before
    kept = (run / "metrics.jsonl").read_text().splitlines()
    assert kept[: len(lines) - 3] == [line for i, line in enumerate(lines) if i not in (1, 2, 3)]
    steps = [json.loads(line)["step"] for line in kept if '"kind": "train"' in line]
    assert steps == [2, 3]  # the fixture's last step (log_every=20 logs only it) and the resumed one, each once


def test_an_unreadable_summary_is_warned_about_and_left_out(trained, tmp_path, capsys):
    """eval compares with the training run's summary.json and plot shows its final values: an unreadable one is a
    warning naming it (a JSONDecodeError traceback before), the command still does its work."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "summary.json").write_text('{"knn_top1": 5')
    assert main(["-q", "eval", str(run), "--no-linear"]) == 0
    assert (run / "eval.json").is_file()
    assert main(["-q", "plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" (")[0] for line in err if "channels_last" not in line] == [
        f"WARNING: UserWarning: {run / 'summary.json'}: unreadable"
    ] * 2


def test_a_run_that_lost_last_pt_but_kept_epoch_checkpoints_is_not_started_over(trained, tmp_path, capsys):
    """A run directory with epoch_XXXX.pt but no last.pt lost its last.pt (it is written first): --resume says how
    to continue from the latest kept checkpoint (and following it works), and a new run into it is refused instead
    of overwriting the run's metrics.jsonl and summary.json, as the `nothing to resume` hint did before."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = run / CKPT
    kept = ckpt.with_name("epoch_0001.pt")
    ckpt.rename(kept)
    summary = (run / "summary.json").read_text()
    expected = (
        f"directpred: error: {run} holds a run's kept checkpoints (the latest: {kept}) but no checkpoints/last.pt; "
        f"to continue from the latest, copy it to {ckpt} and run `directpred train --resume {run}`"
    )
    assert main(["-q", "train", "--resume", str(run)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected
    config = str(run / "config.yaml")
    assert main(["-q", "train", config, "--out", str(run), "--set", "train.max_steps=1"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected + ", or choose another --out"
    assert (run / "summary.json").read_text() == summary and not ckpt.exists()
    shutil.copy(kept, ckpt)
    assert main(["-q", "train", "--resume", str(run)]) == 0


@pytest.mark.parametrize(
    "command,message",
    [
        (
            "train {quickstart} --out {tmp}/new --set train.device=cuda",
            "train.device='cuda' but CUDA is not available here: no CUDA GPU is visible (driver, "
            "CUDA_VISIBLE_DEVICES); use --set train.device=cpu or auto",
        ),
        (
            "eval {run} --no-linear --set train.device=cuda",
            "train.device='cuda' but CUDA is not available here: no CUDA GPU is visible (driver, "
            "CUDA_VISIBLE_DEVICES); use --set train.device=cpu or auto",
        ),
        (
            "embed {run} --data {tmp}/none --out {tmp}/f.npy --device cuda",
            "--device 'cuda' but CUDA is not available here: no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES); "
            "use --device cpu or auto",
        ),
        (
            "eval {run} --no-linear --set train.device=cuda:1",
            "train.device='cuda:1' but CUDA is not available here: no CUDA GPU is visible",
        ),
    ],
    ids=["train", "eval", "embed", "eval-index"],
)
def test_a_cuda_device_without_cuda_is_named_as_the_user_wrote_it(
    command, message, trained, tmp_path, capsys, monkeypatch
):
    """`cuda` was reported as `train.device='cuda:0'` (what it resolves to), embed's --device as train.device; the
    error names the option and value the user gave and the fix, before any work (no run directory, no data read:
    embed's --data does not exist)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["-q", *_argv(command, run, tmp_path, tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"directpred: config error: {message}"), err
    assert not (tmp_path / "new").exists()


def test_a_cpu_only_torch_build_is_named_as_the_reason(monkeypatch):
    import torch

    from directpred.config import ConfigError
    from directpred.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError) as info:
        resolve_device("cuda")
    assert str(info.value) == (
        f"train.device='cuda' but CUDA is not available here: this PyTorch build ({torch.__version__}) has no CUDA "
        "support; use --set train.device=cpu or auto"
    )


def test_a_bare_cuda_beyond_the_machine_under_torchrun_names_the_rank_s_gpu(monkeypatch):
    import torch

    from directpred.config import ConfigError
    from directpred.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    for given in ("cuda", "auto"):
        with pytest.raises(ConfigError) as info:
            resolve_device(given)
        assert str(info.value) == (
            f"train.device={given!r} (cuda:3, this process's LOCAL_RANK) but this machine has 2 GPU(s) (cuda:0 to "
            "cuda:1); use one of them, or auto"
        )


def _foreign_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files a user might point a checkpoint option at by mistake, and how the error describes each."""
    from PIL import Image

    Image.new("RGB", (4, 4)).save(folder / "img.png")
    Image.new("RGB", (4, 4)).save(folder / "img.jpg")
    np.save(folder / "feats.npy", np.zeros(3))
    np.savez(folder / "feats.npz", features=np.zeros(3))
    (folder / "run.yaml").write_text("# my run\n\ntrain: {epochs: 1}\n")
    (folder / "long.txt").write_text("x" * 61 + "\u00e9" * 300)  # the 512 bytes cut a two-byte character in two
    return {
        "png": (folder / "img.png", "a PNG image"),
        "jpeg": (folder / "img.jpg", "a JPEG image"),
        "npy": (folder / "feats.npy", "a NumPy .npy array"),
        "npz": (folder / "feats.npz", "a zip archive without the data.pkl of torch.save, a NumPy .npz"),
        "yaml": (folder / "run.yaml", 'a text file beginning "# my run"'),
        "text": (folder / "long.txt", f'a text file beginning "{"x" * 40}..."'),
    }


@pytest.mark.parametrize("command", ["eval {run} --no-linear --checkpoint {file}", "export {file} --out {tmp}/b.pt"])
def test_a_file_no_torch_save_wrote_is_not_called_a_damaged_checkpoint(command, trained, tmp_path, capsys):
    """A YAML file, an image or a NumPy file given as a checkpoint was reported as `corrupt or not a checkpoint` with
    the hint to use an earlier checkpoint (as for a damaged one): now it is named as what it is."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for file, kind in _foreign_files(tmp_path).values():
        argv = command.format(run=run, file=file, tmp=tmp_path).split()
        assert main(["-q", *argv]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"directpred: error: {file} is not a checkpoint file ({kind}); expected a .pt written by `directpred "
            "train` (a run's checkpoints/last.pt or epoch_XXXX.pt) or `directpred export`"
        )


def test_a_cut_short_checkpoint_of_either_torch_format_is_still_a_damaged_checkpoint(tmp_path):
    """The zip format (a torn write lacks the central directory, so the zip cannot be listed) and the legacy pickle."""
    import torch

    from directpred.train.checkpoint import CheckpointError, foreign_file_kind, load_checkpoint

    for name, zip_format in (("new.pt", True), ("legacy.pt", False)):
        whole = tmp_path / name
        torch.save({"model": {"w": torch.arange(4000.0)}}, whole, _use_new_zipfile_serialization=zip_format)
        torn = tmp_path / f"torn_{name}"
        torn.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        assert foreign_file_kind(whole) is None and foreign_file_kind(torn) is None
        with pytest.raises(CheckpointError, match=r"is a damaged checkpoint, cut short or with changed bytes \("):
            load_checkpoint(torn)
        assert torch.equal(load_checkpoint(whole)["model"]["w"], torch.arange(4000.0))


def test_a_torchscript_module_is_named_not_called_a_damaged_checkpoint(tmp_path):
    """`directpred export --torchscript`'s file given to embed, diagnose or eval --checkpoint was "a damaged
    checkpoint, cut short or with changed bytes": it holds a data.pkl, as torch.save's files do."""
    import torch

    from directpred.train.checkpoint import CheckpointError, load_checkpoint

    ts = tmp_path / "backbone.ts"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(3, 2), torch.zeros(1, 3)), ts)
    with pytest.raises(CheckpointError, match=r"is not a checkpoint file \(a TorchScript module, as `directpred exp"):
        load_checkpoint(ts)


def test_an_output_path_error_outside_training_names_the_path_not_checkpoints(trained, tiny_folder, tmp_path, capsys):
    """The OSError line told every command to resume a training run from its checkpoint."""
    (tmp_path / "afile.txt").write_text("x")
    (tmp_path / "adir.npy").mkdir()
    theory = ["theory", "simulate", str(REPO / "configs/theory/linear.yaml"), "--out", str(tmp_path / "afile.txt")]
    embed = ["embed", str(trained), "--data", str(tiny_folder), "--out", str(tmp_path / "adir.npy")]
    for argv, command, advice in (
        (theory + ["--set", "steps=10"], "theory", "is a file, not a directory: give another path"),
        (embed, "embed", "give another path there"),
    ):
        assert main(["-q", *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"directpred {command}: error: "), err
        assert "checkpoint" not in err[-1] and advice in err[-1], err[-1]


def test_a_failed_export_write_says_to_run_the_command_again_not_to_resume(trained, tmp_path, monkeypatch, capsys):
    """`directpred export` is no run: "Free disk space or fix permissions, then resume" made no sense for it."""
    import errno

    import torch

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "b.pt"
    assert main(["-q", "export", str(trained), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"directpred: error: cannot write {out}: No space left on device; nothing was written. Free disk space or "
        "fix permissions, then run the command again."
    )
    out.write_bytes(b"previous")
    assert main(["-q", "export", str(trained), "--out", str(out)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(
        "No space left on device; the previous file is kept. Free disk space or fix permissions, then run the "
        "command again."
    )
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["b.pt"]


def test_eval_refuses_overrides_of_how_the_run_was_trained(trained, tmp_path, capsys):
    """`directpred eval --set optim.lr=0.5` evaluated the run unchanged and wrote the override into eval.json as if
    it had counted; evaluation settings (eval.*, data.*, the device and precision) still change."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for key in ("optim.lr=0.5", "predictor.name=linear", "backbone.width=8"):
        assert main(["-q", "eval", str(run), "--no-linear", "--set", key]) == 2
        err = capsys.readouterr().err
        assert f"directpred eval --set {key.split('=')[0]}: these describe how the run was trained" in err, err
        assert "eval may change eval.*, data.*, train.device, train.precision" in err
    assert not (run / "eval.json").exists()
    assert main(["-q", "eval", str(run), "--no-linear", "--set", "eval.knn_k=3", "--set", "train.precision=fp32"]) == 0
    assert json.loads((run / "eval.json").read_text())["overrides"] == ["eval.knn_k=3", "train.precision=fp32"]


def test_a_run_directory_another_process_writes_is_refused(trained, tmp_path, capsys):
    """Two `directpred train` into one directory (or a resume beside a running one) both appended to metrics.jsonl
    and wrote last.pt; the directory is locked while a command writes it, and the second is refused untouched."""
    import fcntl
    import os

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "summary.json").unlink()  # not finished: a resume would train and evaluate
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    fd = os.open(run, os.O_RDONLY)  # as a running `directpred train` holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["-q", "train", "--resume", str(run), "--set", "train.max_steps=3"]) == 2
        assert f"{run} is being written by another directpred process" in capsys.readouterr().err
        config = str(run / "config.yaml")
        assert main(["-q", "train", config, "--out", str(run), "--set", "train.max_steps=3"]) == 2
        assert "is being written by another directpred process" in capsys.readouterr().err
        after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        assert after == before  # command.txt too: neither command is recorded
    finally:
        os.close(fd)
    assert main(["-q", "train", "--resume", str(run), "--set", "train.max_steps=3"]) == 0  # the lock went with it
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_plot_leaves_out_a_hand_edited_non_number_and_memory_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """A metrics.jsonl value that is not a number stopped `plot` with a ValueError traceback; it is left out with a
    warning. An allocation failure (numpy's MemoryError, CUDA's OutOfMemoryError) is one line saying what to do."""
    pytest.importorskip("matplotlib")
    import torch

    from directpred.diagnostics import plots

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    rows[1]["loss"] = "abc"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl: 1 train row(s) with a loss or step that is not a number (first: (2, 'abc'))" in err
    assert (tmp_path / "figs" / "overview.png").is_file()

    for exc in (MemoryError("Unable to allocate 74.5 GiB"), torch.OutOfMemoryError("CUDA out of memory.\nmore")):

        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(plots, "make_plots", fail)
        assert main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"directpred: error: out of memory in `directpred plot` ({type(exc).__name__}: ")
        assert line.endswith(
            "use smaller sizes (a smaller batch, data subset or simulated n), or a machine with more memory"
        )


def test_an_empty_out_is_refused_not_replaced_by_the_default(tmp_path, monkeypatch, capsys):
    """`--out "$RUN"` with RUN unset trained into runs/<config>-<time>, somewhere the user did not ask for."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(REPO / "configs" / "cpu" / "quickstart.yaml"), "--out", ""]) == 2
    assert capsys.readouterr().err.strip() == (
        "directpred: config error: --out is empty; give the run directory (or leave --out out for runs/<config>-<time>)"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_file_system_without_flock_is_not_taken_for_another_process(trained, tmp_path, monkeypatch, capsys):
    """NFS and Lustre without -o flock cannot lock a directory (ENOLCK, ENOSYS): every train was refused as if another
    process wrote the run. Only a lock held elsewhere (EWOULDBLOCK) refuses; otherwise the run goes on unlocked."""
    import errno

    from directpred import files as locks

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "summary.json").unlink()
    assert main(["-q", "train", "--resume", str(run), "--set", "train.max_steps=3"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert locks.run_dir_busy(run) is None


def test_a_forked_child_does_not_keep_the_run_directory_locked(tmp_path):
    """DataLoader workers are forked while a run holds its directory's lock; a flock belongs to the open file
    description, which they shared, so a resume right after the run was killed was refused as long as they lived.
    The child closes its copy at once: the lock goes with the process that took it."""
    import os
    import time

    from directpred.files import run_dir_busy, run_dir_lock

    run = tmp_path / "run"
    with run_dir_lock(run, create=True):
        (run / "x").write_text("keep the directory")
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child (its at-fork hooks have run): say so, then outlive the parent's lock a while
            os.write(ready_w, b"1")
            time.sleep(3)
            os._exit(0)
        assert os.read(ready_r, 1) == b"1"
        os.close(ready_r)
        os.close(ready_w)
        assert run_dir_busy(run) is not None  # held (by this process)
    try:
        assert run_dir_busy(run) is None  # released, though the child still runs
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    """`directpred diagnose RUN | head -1` (a reader that closes the pipe early) printed "Broken pipe (output): give
    another path there, or fix its permissions or free space" and exited 1. Now it ends as cat does: code 141
    (128 + SIGPIPE), nothing on stderr."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # the whole parameter table of a theory config, then the figure: far more than a pipe that is closed at once holds
    cmd = [sys.executable, "-m", "directpred", "theory", "simulate", str(REPO / "configs/theory/linear.yaml")]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "sim"), "--set", "steps=10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err
