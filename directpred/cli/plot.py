"""``directpred plot``: PNG figures of one or more runs (:func:`directpred.diagnostics.plots.make_plots`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from directpred.config import ConfigError

EPILOG = """examples:
  directpred plot runs/full/byol_directpred runs/full/byol_linear --out docs/figures/diagnostics
"""


def run(args: argparse.Namespace) -> int:
    from directpred.diagnostics.plots import make_plots  # needs matplotlib (the plot extra)

    run_dirs = [Path(p) for p in args.run_dirs]
    for d in run_dirs:
        if not d.is_dir():
            raise ConfigError(f"{d}: not a directory; give run directories made by `directpred train`")
    out = Path(args.out) if args.out else run_dirs[0] / "plots"
    for path in make_plots(run_dirs, out):
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plot",
        help="PNG figures of one or more runs (loss, kNN, spectra, alignment, effective rank)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Plot runs from their metrics.jsonl: overview.png overlays the runs; spectra_<run>.png "
        "shows heat maps of F^'s spectrum and of the per-eigenvector alignment over training.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories made by `directpred train`")
    p.add_argument("--out", help="folder for the PNG files (default: RUN_DIR/plots of the first run)")
    p.set_defaults(func=run)
