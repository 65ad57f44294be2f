"""The ``examples:`` in the help of ``directpred`` and its subcommands work as printed.

Those that only read runs (eval, export, embed, diagnose, plot) run verbatim here, on tiny runs made where the
examples expect them (``runs/qs``, ``runs/full/...``, in a scratch working directory) with the quick-start recipe's
training length (one epoch); the ones that train on CIFAR-10 or spawn processes (train, sweep, torchrun) are checked
for the files they name. Before, ``directpred diagnose --help`` showed ``checkpoints/epoch_0001.pt``, which a one-epoch
run never keeps (epoch_XXXX.pt are written every train.checkpoint_every = 10 epochs).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from directpred.cli import build_parser, main
from directpred.config import load_config
from directpred.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
READERS = ("eval", "export", "embed", "diagnose", "plot")


def help_examples() -> list[list[str]]:
    """Every example line of the main help and the subcommands' helps, split as a shell would."""
    parser = build_parser()
    epilogs = [parser.epilog or ""]
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        epilogs += [p.epilog or "" for p in action.choices.values()]
    lines = {line.strip() for text in epilogs for line in text.split("examples:", 1)[-1].splitlines()}
    return [shlex.split(line) for line in sorted(lines) if line.startswith(("directpred ", "torchrun "))]


def test_every_file_an_example_names_is_in_the_repository():
    examples = help_examples()
    assert {e[e.index("directpred") + 1] if "directpred" in e else "" for e in examples} >= {*READERS, "train", "sweep"}
    named = [arg for e in examples for arg in e if arg.startswith(("configs/", "sweeps/"))]
    assert named and [arg for arg in named if not (REPO / arg).is_file()] == []


def _tiny_run(run_dir: Path, tiny_overrides: list[str], *sets: str) -> None:
    # conftest's tiny run, with the linear probe and the diagnostics back on (what eval/plot/diagnose read)
    over = [*tiny_overrides, "data.local_copy=null", "eval.linear=true", "eval.linear_epochs=1", "eval.knn_k=5"]
    over += ["diag.every=2", "log.backends=[]", *sets]
    Trainer(load_config(REPO / "configs" / "cpu" / "quickstart.yaml", over), run_dir).fit()


def test_the_examples_that_read_runs_work_as_printed(tiny_folder, tiny_overrides, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")  # plot's example
    monkeypatch.chdir(tmp_path)
    _tiny_run(tmp_path / "runs" / "qs", tiny_overrides)
    _tiny_run(tmp_path / "runs" / "full" / "byol_directpred", tiny_overrides, "eval.linear=false")
    _tiny_run(tmp_path / "runs" / "full" / "byol_linear", tiny_overrides, "eval.linear=false", "predictor.name=linear")
    (tmp_path / "my_images").mkdir()  # embed's: a folder of the user's images, without class folders
    for i, image in enumerate(sorted((tiny_folder / "test").rglob("*.png"))[:5]):
        shutil.copy(image, tmp_path / "my_images" / f"{i}.png")
    ran = []
    for example in help_examples():
        if example[0] == "directpred" and example[1] in READERS:
            capsys.readouterr()
            assert main(["-q", *example[1:]]) == 0, (example, capsys.readouterr().err)
            ran.append(example[1])
    assert sorted(set(ran)) == sorted(READERS)
    assert (tmp_path / "backbone.pt").is_file() and (tmp_path / "features.npy").is_file()
    assert (tmp_path / "docs" / "figures" / "diagnostics" / "overview.png").is_file()
