"""``directpred theory {simulate, portrait, figures}``: the theory toolkit's command line.

``register(subparsers)`` plugs the ``theory`` subcommand into the main ``directpred`` parser; ``main(argv)`` runs it
alone (``python -m directpred.cli.theory figures --out out/figs``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

from directpred.theory.simulate import SimulationDiverged, load_simulate_config, run_simulate


def _cmd_simulate(args: argparse.Namespace) -> int:
    try:
        cfg = load_simulate_config(args.config, args.set or [])
    except (ValueError, OSError, yaml.YAMLError) as e:
        print(f"directpred theory simulate: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        run_simulate(cfg, Path(args.out))
    except SimulationDiverged as e:
        print(f"directpred theory simulate: error: {e}", file=sys.stderr)
        return 1
    sgd = ["sgd.npz"] if cfg.model == "linear" and cfg.sgd_batch > 0 else []  # the minibatch SGD run beside the flow
    names = ["trajectory.npz", *sgd, "summary.json", "summary.png"]
    print(f"wrote {args.out}/{{{','.join(names)}}} in {time.perf_counter() - t0:.1f}s")
    return 0


# portrait's numeric options: (flag, attribute, the smallest value allowed, whether it is allowed itself, meaning)
PORTRAIT_RANGES = (
    ("--eta", "eta", 0.0, True, "the weight decay η"),
    ("--alpha-p", "alpha_p", 0.0, False, "the relative predictor learning rate α_p"),
    ("--tau", "tau", 0.0, True, "the EMA ratio τ = W_a/W, 1 for SimSiam; an EMA started at 0 keeps it >= 0"),
    ("--sigma2", "sigma2", 0.0, True, "the augmentation variance σ²"),
    ("--s-max", "s_max", 0.0, False, "the top of the s axis; s_j, an eigenvalue of F, is >= 0"),
    ("--p-min", "p_min", -math.inf, False, "the left edge of the p axis"),
    ("--p-max", "p_max", -math.inf, False, "the right edge of the p axis"),
)


def portrait_error(args: argparse.Namespace) -> str | None:
    """The first impossible numeric option of ``theory portrait`` as ``--flag VALUE: what is allowed``, or None."""
    for flag, attr, low, closed, meaning in PORTRAIT_RANGES:
        value = getattr(args, attr)
        if not math.isfinite(value):
            return f"{flag} {value}: must be a finite number ({meaning})"
        if value < low or (value == low and not closed):
            return f"{flag} {value}: must be {'>=' if closed else '>'} {low:g} ({meaning})"
    if args.p_min >= args.p_max:
        return f"--p-min {args.p_min} --p-max {args.p_max}: the p axis needs --p-min < --p-max"
    return None


def _cmd_portrait(args: argparse.Namespace) -> int:
    from directpred.theory import plots
    from directpred.theory.reduced import fixed_points

    problem = portrait_error(args)
    if problem is not None:  # a numpy/matplotlib traceback, or a portrait of a system that cannot arise, before
        print(f"directpred theory portrait: error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.is_dir():  # an existing folder: the portrait goes in it (it went beside it as FOLDER.png)
        out = out / "portrait.png"
    elif not out.suffix:  # matplotlib writes NAME.png then: say so (the message named NAME before)
        out = out.with_name(out.name + ".png")
    else:
        formats = plots.image_formats()
        if out.suffix[1:].lower() not in formats:  # a matplotlib traceback before
            print(
                f"directpred theory portrait: error: --out {args.out}: cannot write '{out.suffix}' files; "
                f"use one of .{', .'.join(formats)} (e.g. portrait.png)",
                file=sys.stderr,
            )
            return 2
    fig, axes = plots.new_figure(1, 1, size=(4.5, 3.8))
    # Finite but extreme values (--tau 1e200, --eta 1e308) overflow float64: a numpy traceback before. numpy's
    # warnings on the way are held back and shown only if the portrait is drawn after all.
    try:
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always", RuntimeWarning)
            with np.errstate(over="raise", invalid="ignore"):
                fps = fixed_points(args.tau, args.eta, args.sigma2)
            plots.phase_portrait(
                axes[0, 0],
                alpha_p=args.alpha_p,
                eta=args.eta,
                tau=args.tau,
                sigma2=args.sigma2,
                p_range=(args.p_min, args.p_max),
                s_range=(0.0, args.s_max),
            )
    except (OverflowError, FloatingPointError, np.linalg.LinAlgError) as exc:
        print(
            f"directpred theory portrait: error: --alpha-p {args.alpha_p} --eta {args.eta} --tau {args.tau} "
            f"--sigma2 {args.sigma2}: beyond what float64 can compute ({type(exc).__name__}: {exc}); use values "
            "of ordinary size (the paper's figures: --tau 0.5 to 2, --eta 0 to 0.1, --alpha-p 1 to 10)",
            file=sys.stderr,
        )
        return 2
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    out.parent.mkdir(parents=True, exist_ok=True)
    plots.save(fig, str(out))
    print(f"wrote {out}; fixed points p* on s=p²/α_p: {np.round(fps, 4).tolist()}")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from directpred.theory.figures import make_figures

    only = [s.strip() for s in args.only.split(",")] if args.only else None
    try:
        times = make_figures(args.out, only)
    except ValueError as e:
        print(f"directpred theory figures: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(times)} figures to {args.out} in {sum(times.values()):.1f}s")
    return 0


def _add_theory_commands(theory: argparse.ArgumentParser) -> None:
    sub = theory.add_subparsers(dest="theory_command", metavar="{simulate,portrait,figures}", required=True)
    sim = sub.add_parser(
        "simulate",
        help="simulate the linear (Eqs. 2-4) or reduced (Eqs. 11-13) model from YAML",
        description="Simulate from a YAML config; writes trajectories (npz), summary.json, plots.",
    )
    sim.add_argument("config", help="YAML config (see configs/theory/*.yaml); unknown keys are errors")
    sim.add_argument("--out", required=True, help="output directory")
    sim.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key (value parsed as YAML); repeatable",
    )
    sim.set_defaults(func=_cmd_simulate)
    por = sub.add_parser(
        "portrait",
        help="phase portrait of Eqs. 11-12 at fixed tau",
        description="Streamlines of (p_j, s_j) with fixed points and the parabola s = p²/α_p.",
    )
    por.add_argument("--eta", type=float, default=0.01, help="weight decay η (default 0.01)")
    por.add_argument("--alpha-p", type=float, default=1.0, help="relative predictor learning rate α_p (default 1)")
    por.add_argument("--tau", type=float, default=1.0, help="EMA ratio τ = W_a/W >= 0, fixed (default 1 = SimSiam)")
    por.add_argument("--sigma2", type=float, default=0.0, help="augmentation variance σ² (default 0)")
    por.add_argument("--p-min", type=float, default=-0.6, help="left edge of the p axis (default -0.6)")
    por.add_argument("--p-max", type=float, default=1.6, help="right edge of the p axis (default 1.6)")
    por.add_argument("--s-max", type=float, default=2.0, help="top of the s axis, > 0 (default 2)")
    por.add_argument("--out", required=True, help="output PNG path")
    por.set_defaults(func=_cmd_portrait)
    fig = sub.add_parser(
        "figures",
        help="regenerate the paper's synthetic figures (3, 4, 5, 7, 8, 9, 10), alpha_p (the theory behind Fig. 6) and "
        "isoloss (DirectPred, DirectCopy and IsoLoss in the decoupled dynamics)",
        description="Write figN.png/.npz/.json/.txt for each synthetic figure of the paper.",
    )
    fig.add_argument("--out", required=True, help="output directory")
    fig.add_argument("--only", default=None, help="comma-separated subset, e.g. fig3,fig5 (default: all)")
    fig.set_defaults(func=_cmd_figures)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``theory`` subcommand (with sub-subcommands simulate, portrait, figures) to the main parser."""
    theory = subparsers.add_parser(
        "theory",
        help="learning-dynamics theory: simulations and the paper's figures",
        description="Learning dynamics of the linear BYOL/SimSiam model (paper §2-3).",
    )
    _add_theory_commands(theory)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m directpred theory {simulate,portrait,figures} ...``."""
    parser = argparse.ArgumentParser(
        prog="directpred theory",
        description="Learning dynamics of the linear BYOL/SimSiam model (paper §2-3).",
    )
    _add_theory_commands(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
