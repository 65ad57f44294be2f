"""directpred: BYOL/SimSiam with DirectPred (Tian, Chen, Ganguli, ICML 2021).

Training, evaluation, training diagnostics and the paper's learning-dynamics theory.
"""

from collections.abc import Callable
from typing import Any

from directpred import _startup  # noqa: F401 (first: it notes the launcher of a torchrun worker before torch loads)

__version__ = "0.1.0"


def __getattr__(name: str) -> Callable[..., Any]:  # lazy, so that `import directpred` stays cheap (theory: numpy)
    if name == "load_backbone":
        from directpred.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'directpred' has no attribute {name!r}")


__all__ = ["__version__", "load_backbone"]
