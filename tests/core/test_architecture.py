"""The import layers of docs/architecture.md hold: a module imports only from its own layer or the ones below."""

from __future__ import annotations

import ast

from conftest import REPO

# docs/architecture.md, "Who may import whom": module prefix -> layer (the longest matching prefix wins).
LAYERS = {
    "directpred.config": 0,
    "directpred.linalg": 0,
    "directpred.distributed": 0,
    "directpred.runtime": 0,
    "directpred.files": 0,
    "directpred._startup": 0,
    "directpred.data": 1,
    "directpred.backbones": 1,
    "directpred.heads": 1,
    "directpred.losses": 1,
    "directpred.methods": 2,
    "directpred.eval": 3,
    "directpred.diagnostics": 3,
    "directpred.diagnostics.metrics": 3,
    "directpred.diagnostics.hook": 3,
    "directpred.train": 4,
    "directpred.diagnostics.report": 5,
    "directpred.diagnostics.plots": 5,
    "directpred.export": 5,
    "directpred.sweep": 5,
    "directpred.theory": 5,
    "directpred.cli": 6,
    "directpred.__main__": 6,
    "directpred": 6,
}


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _imports(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):  # also the lazy imports inside functions
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("directpred.")}


def test_every_import_goes_down_the_layers():
    wrong = []
    for path in sorted((REPO / "directpred").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for target in _imports(ast.parse(path.read_text())):
            if _layer(target) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_theory_toolkit_needs_neither_torch_nor_the_training_code():
    for path in (REPO / "directpred" / "theory").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = _imports(tree) | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(
            n == "torch" or n.startswith(("torch.", "directpred.train", "directpred.methods")) for n in names
        ), path
