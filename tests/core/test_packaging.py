"""pyproject.toml declares what the package imports: runtime imports are runtime dependencies, optional ones are
behind extras and give a clear message when missing; scipy is for the tests only."""

from __future__ import annotations

import ast
import re
import sys

import pytest
from conftest import REPO

from directpred.cli import OPTIONAL_PACKAGES, main
from directpred.config import EXTRAS, install_hint

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

# import name -> distribution name
DISTRIBUTION = {"yaml": "pyyaml", "PIL": "pillow"}


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}

    return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


def _imports() -> dict[str, set[str]]:
    """Third-party top-level import names -> the package files importing them."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "directpred").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top != "directpred" and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_import_is_declared_and_scipy_is_test_only():
    runtime, extras = _requirements()
    imports = _imports()
    assert "scipy" not in imports and "scipy" not in runtime and "scipy" in extras["test"]
    for top, files in imports.items():
        dist = DISTRIBUTION.get(top, top).lower()
        if top in OPTIONAL_PACKAGES:
            assert dist in extras[OPTIONAL_PACKAGES[top]] and dist not in runtime, (top, files)
        else:
            assert dist in runtime, f"{top} (imported by {sorted(files)}) is not a runtime dependency"
    assert imports["matplotlib"] == {"directpred/diagnostics/plots.py", "directpred/theory/plots.py"}
    # No upper pins; torch new enough for torch.nn.utils.get_total_norm (2.6).
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if "<" in d], deps
    assert "torch>=2.6" in deps and "torchvision>=0.21" in deps


def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch, capsys):
    plotting = ("matplotlib.", "directpred.diagnostics.plots")
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith(plotting)]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "figs")]) == 1
    assert capsys.readouterr().err.strip() == (
        "directpred: error: `directpred plot` needs matplotlib, which is not installed: pip install matplotlib (or, "
        "in a clone of directpred, pip install -e '.[plot]')"
    )


def test_install_hints_name_the_extras_of_pyproject():
    """Every hint names an extra pyproject.toml declares, with exactly the packages it installs (directpred is not on
    PyPI: ``pip install 'directpred[plot]'`` would fetch another project or nothing)."""
    _, extras = _requirements()
    for extra, packages in EXTRAS.items():
        assert set(packages.split()) == extras[extra], extra
        assert (
            install_hint(extra) == f"pip install {packages} (or, in a clone of directpred, pip install -e '.[{extra}]')"
        )
    assert set(OPTIONAL_PACKAGES.values()) <= set(EXTRAS)
    for path in [*(REPO / "directpred").rglob("*.py"), REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        text = path.read_text()
        assert "'directpred[" not in text.replace("``pip install 'directpred[plot]'`` would", ""), path
