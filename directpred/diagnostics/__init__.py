"""Training diagnostics: metrics (spectra, alignment, collapse signals), the training-time hook with the collapse
rule, the one-checkpoint report (``directpred diagnose``) and the figures of runs (``directpred plot``)."""
