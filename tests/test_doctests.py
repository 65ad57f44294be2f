"""The examples in docstrings run: doctest over every module of the package.

An example that needs data or a training run is marked ``# doctest: +SKIP``; everything else runs, here and on the
documentation site's API reference, where the same examples are shown.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import directpred

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Modules of the API reference whose examples must exist and run (not only be skipped).
PUBLIC_WITH_EXAMPLES = {
    "directpred.config",
    "directpred.config_doc",
    "directpred.losses",
    "directpred.methods.ema",
    "directpred.heads.correlation",
    "directpred.heads.directpred",
    "directpred.heads.optimal",
    "directpred.heads.mlp",
    "directpred.eval.knn",
    "directpred.diagnostics.metrics",
    "directpred.theory.dynamics",
    "directpred.theory.reduced",
    "directpred.backbones.resnet",
}


def _modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(directpred.__path__, "directpred.")
        if not info.name.endswith("__main__")
    )  # __main__ runs the CLI on import


def _doctests(name: str) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(importlib.import_module(name)) if t.examples]


def _run(name: str) -> tuple[int, int, str]:
    """(failed, examples run, the failure report) for module ``name``."""
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    for test in _doctests(name):
        runner.run(test, out=report.append)
    failed, tried = runner.failures, runner.tries  # tries: examples run (skipped ones are not)
    return failed, tried, "".join(report)


WITH_EXAMPLES = [name for name in _modules() if _doctests(name)]


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    failed, tried, report = _run(name)
    assert failed == 0, f"{failed} of {tried} docstring examples in {name} failed:\n{report}"


def test_public_modules_have_running_examples():
    assert PUBLIC_WITH_EXAMPLES <= set(WITH_EXAMPLES), PUBLIC_WITH_EXAMPLES - set(WITH_EXAMPLES)
    for name in sorted(PUBLIC_WITH_EXAMPLES):
        assert _run(name)[1] >= 1, f"{name}: every docstring example is skipped"


def test_a_wrong_example_is_reported():
    """The runner used above does fail on a wrong expected output (so a passing run means something)."""
    parser = doctest.DocTestParser()
    test = parser.get_doctest(
        ">>> from directpred.config import nest\n>>> nest('a.b', 1)\n{'a': {'b': 2}}\n", {}, "wrong", "wrong.py", 0
    )
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    runner.run(test, out=report.append)
    assert (runner.failures, runner.tries) == (1, 2)
    assert "Expected:\n    {'a': {'b': 2}}\nGot:\n    {'a': {'b': 1}}" in "".join(report)
