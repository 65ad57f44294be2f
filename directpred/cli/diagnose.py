"""``directpred diagnose``: text report of the diagnostics of one checkpoint (:mod:`directpred.diagnostics.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  directpred diagnose runs/full/byol_linear
  directpred diagnose runs/full/byol_linear/checkpoints/last.pt --batches 4
"""


def run(args: argparse.Namespace) -> int:
    from directpred.config import ConfigError, strict_json
    from directpred.diagnostics.report import diagnose

    if args.no_data and args.batches is not None:  # --batches was ignored unseen
        raise ConfigError(
            f"--batches {args.batches} runs training batches, which --no-data leaves out; give one of them"
        )
    args.batches = 2 if args.batches is None else args.batches
    if args.batches < 0:  # ran as --batches 0 (no batch metrics) before
        raise ConfigError(f"--batches {args.batches}: must be >= 0 (training batches to run; 0 or --no-data: none)")
    row, lines = diagnose(Path(args.target), batches=args.batches, use_data=not args.no_data)
    if args.json:
        print(strict_json(row))
    else:
        print("\n".join(lines))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="text report of the diagnostics of one checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Spectrum of F^, alignment and asymmetry of W_p, p_j vs sqrt(s_j), effective ranks and "
        "the collapse rule, for one checkpoint (RUN_DIR means RUN_DIR/checkpoints/last.pt).",
    )
    p.add_argument("target", metavar="RUN_DIR|CHECKPOINT", help="a run directory or a checkpoint file")
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        help="training batches to run for the representation/projection metrics (default 2)",
    )
    p.add_argument(
        "--no-data", action="store_true", help="do not load data: report only F^ and W_p from the checkpoint"
    )
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object instead of text")
    p.set_defaults(func=run)
