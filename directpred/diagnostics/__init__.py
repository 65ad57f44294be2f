"""Training diagnostics: metrics (spectra, alignment, collapse signals), the training-time hook with the collapse
rule, the one-checkpoint report (``directpred diagnose``) and the figures of runs (``directpred plot``).

The package exports the hook :class:`Diagnostics`, :func:`diagnostic_row` (every metric of one moment of training)
and :func:`predictor_matrix` (the matrix that plays W_p for any predictor), imported on first use so that
``import directpred.diagnostics`` (and the theory's plots, which use :mod:`directpred.diagnostics.plots`) stays free
of torch. The one-checkpoint report is :func:`directpred.diagnostics.report.diagnose`: it reads run directories
(a layer above the training code, docs/architecture.md), so this package does not import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from directpred.diagnostics.hook import Diagnostics, diagnostic_row
    from directpred.diagnostics.metrics import predictor_matrix


def __getattr__(name: str) -> Any:  # lazy: torch (and the training code's modules) only when a name is used
    if name in ("Diagnostics", "diagnostic_row"):
        from directpred.diagnostics import hook

        return getattr(hook, name)
    if name == "predictor_matrix":
        from directpred.diagnostics.metrics import predictor_matrix

        return predictor_matrix
    raise AttributeError(f"module 'directpred.diagnostics' has no attribute {name!r}")


__all__ = ["Diagnostics", "diagnostic_row", "predictor_matrix"]
