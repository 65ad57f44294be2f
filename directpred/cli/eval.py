"""``directpred eval``: kNN + linear probe of a run's checkpoint (the protocol of :mod:`directpred.eval.protocol`)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path

from directpred.config import DATA_LOCATION, Config, ConfigError, EvalConfig, diff_configs, parse_override


def print_results(results: Mapping[str, object], header: str, eval_cfg: EvalConfig) -> None:
    """The accuracy lines of ``directpred train`` and ``directpred eval`` (``eval_cfg``: the kNN's k and T)."""
    print(header)
    # A summary.json read back holds null where the accuracy was NaN (non-finite features): kNN is always evaluated,
    # the linear probe when eval.linear is on, so there a null is a NaN, and is said as one.
    evaluated = ["knn_top1"] + (["linear_top1", "linear_top1_best"] if eval_cfg.linear else [])
    results = {**results, **{k: math.nan for k in evaluated if k in results and results[k] is None}}
    if "knn_top1" in results:
        knn = results["knn_top1"]
        k = results.get("knn_k_used") or eval_cfg.knn_k  # the k that voted (a summary from before: the k asked)
        print(f"  kNN top-1:           {knn:6.2f} %   (cosine, k={k}, T={eval_cfg.knn_t:g})")
    if results.get("linear_top1") is not None:
        print(f"  linear probe top-1:  {results['linear_top1']:6.2f} %   (final probe epoch)")
        print(
            f"  linear probe best:   {results['linear_top1_best']:6.2f} %   (best over probe epochs, picked on the "
            "test set as the authors' code does: optimistic)"
        )
    if results.get("linear_top5") is not None:
        print(f"  linear top-5:        {results['linear_top5']:6.2f} %   (BYOL's protocol, final epoch)")
    _print_untrained(results)
    values = [results.get(k) for k in ("knn_top1", "linear_top1", "linear_top1_best", "linear_top5")]
    if any(isinstance(v, float) and math.isnan(v) for v in values):
        print("  nan: the features were non-finite (NaN or inf; a diverged model?), so no accuracy can be read")


def _print_untrained(results: Mapping[str, object]) -> None:
    """With ``eval.untrained``: the untrained network's figures beside the trained ones, and the gain."""
    parts = []
    for key, label in (("knn_top1", "kNN"), ("linear_top1", "linear"), ("linear_top1_best", "linear best")):
        before, after = results.get(f"untrained_{key}"), results.get(key)
        if isinstance(before, float) and isinstance(after, float):
            parts.append(f"{label} {before:.2f} % ({after - before:+.2f})")
    if parts:
        print(f"  untrained network:   {', '.join(parts)}   (eval.untrained: its initialisation; gain in brackets)")


def run(args: argparse.Namespace) -> int:
    """``directpred eval``: kNN + linear probe of a run's checkpoint, into ``RUN_DIR/eval.json`` (with the ``--set``
    overrides and the command line); with ``--untrained``, of the network at the initialisation training starts from
    (a run directory's or a config file's), into ``RUN_DIR/eval_untrained.json``."""
    import torch

    from directpred import distributed
    from directpred.backbones import resolve_channels_last
    from directpred.cli.train import command_line
    from directpred.config import load_config, read_json_object, read_run_config, run_holding
    from directpred.data.datasets import DataBundle, load_data_shared
    from directpred.data.stream import StreamData, load_stream_data
    from directpred.eval.protocol import evaluate
    from directpred.methods import build_method
    from directpred.runtime import resolve_device, resolve_precision
    from directpred.train.checkpoint import atomic_write_json, load_checkpoint, load_model_state

    target = Path(args.run_dir)
    untrained = args.untrained
    if untrained and args.checkpoint:
        raise ConfigError(
            "--untrained evaluates the network at its initialisation, not a checkpoint; give one of --untrained and "
            "--checkpoint"
        )
    run_dir: Path | None = target
    if untrained and target.is_file() and target.suffix in (".yaml", ".yml"):  # a recipe, before any run of it
        run_dir = None
        cfg = load_config(target, args.set)
        # As for a run: the probe runs unless --no-linear or --set eval.linear=false, whatever the file says.
        base_on = load_config(target).to_dict()
        base_on["eval"]["linear"] = True
        linear = not args.no_linear and load_config(None, args.set, base=base_on).eval.linear
    else:
        if target.is_file():  # a checkpoint (or a config without --untrained) given where its run goes
            if target.suffix in (".yaml", ".yml"):
                raise ConfigError(
                    f"{target} is a config file: a config has no trained network to evaluate; give the run directory "
                    f"`directpred train {target} --out RUN` made, or add --untrained to evaluate the network "
                    "training starts from"
                )
            run = run_holding(target)
            raise ConfigError(
                f"{target} is a file, not a run directory; give the run directory made by `directpred train`, and "
                f"the checkpoint with --checkpoint: `directpred eval {run or 'RUN_DIR'} --checkpoint {target}`"
            )
        saved = read_run_config(target)
        cfg = load_config(None, args.set, base=saved.to_dict())
        _check_eval_overrides(saved, cfg)
        # The probe runs unless --no-linear, whatever the run's own eval.linear; `--set eval.linear=false` asks the
        # same as --no-linear (it was ignored before). Read against a base with it on, so only the override counts.
        base_on = saved.to_dict()
        base_on["eval"]["linear"] = True
        linear = not args.no_linear and load_config(None, args.set, base=base_on).eval.linear
    if args.no_linear and any(parse_override(o) == ("eval.linear", True) for o in args.set):
        raise ConfigError("--no-linear and --set eval.linear=true ask for opposite things; give one of them")
    if args.json is not None:
        _check_json_target(args.json, run_dir, untrained)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Under torchrun the processes share the work as at the end of training (each extracts its share of the features;
    # the streamed probe's global batch is the per-process batch times the processes), and rank 0 writes and prints.
    distributed.die_with_launcher()
    distributed.init_from_env(device)
    ckpt: Path | None = None
    step = 0
    if not untrained:
        ckpt = Path(args.checkpoint) if args.checkpoint else target / "checkpoints" / "last.pt"
        state = load_checkpoint(ckpt, map_location=device, require=("model", "step"))
        step = int(state["step"])
        if args.checkpoint:
            _check_checkpoint_config(ckpt, state, saved, target)
    # The initialisation `directpred train` starts from (Trainer.setup seeds the same way and draws nothing else
    # from the global generator before it builds the method): with --untrained, the network evaluated.
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg).to(device)
    if resolve_channels_last(cfg.train.channels_last, method, device, training=False):
        method = method.to(memory_format=torch.channels_last)
    if ckpt is not None:
        load_model_state(method, state["model"], ckpt)
    data: DataBundle | StreamData
    if cfg.data.stream:
        data = load_stream_data(cfg.data)
    else:
        data = load_data_shared(cfg.data, seed=cfg.train.seed)
    results = evaluate(
        method,
        data,
        cfg,
        device,
        linear=linear,
        autocast_dtype=resolve_precision(cfg.train.precision, device),
    )
    if not distributed.is_main():
        return _leave_group()
    record = {
        **results,
        "world_size": distributed.world_size(),
        "checkpoint": None if ckpt is None else str(ckpt),
        "step": step,
        "overrides": list(args.set),  # what differs from the run's config.yaml (or the config file)
        "command": command_line(sys.argv),
    }
    if untrained:
        record |= {"untrained": True, "seed": cfg.train.seed}
    out = Path(args.json) if args.json else None
    if out is None and run_dir is not None:
        out = run_dir / ("eval_untrained.json" if untrained else "eval.json")
    if out is not None:
        atomic_write_json(out, record, retry="run the command again")
    if untrained:
        where = f"{run_dir}: the network" if run_dir is not None else f"{target}: the network"
        print_results(results, f"{where} at its initialisation (train.seed={cfg.train.seed}), untrained:", cfg.eval)
    else:
        assert ckpt is not None
        print_results(results, f"{target} (checkpoint {ckpt.name}, step {step}):", cfg.eval)
    if out is not None:
        print(f"  written to {out}")
    summary_file = None if run_dir is None else run_dir / "summary.json"
    if summary_file is not None and summary_file.is_file() and not args.checkpoint:
        s = read_json_object(summary_file, "no comparison with the training run") or {}
        if untrained and saved.train.seed != cfg.train.seed:
            s = {}  # another seed's initialisation than the run trained from: no gain to read
        otherwise = [
            k
            for k in diff_configs(saved, cfg)
            if (k.startswith(("eval.", "data.")) or k == "train.precision")
            and k != "eval.linear"
            and not k.startswith(DATA_LOCATION)
        ]
        if untrained and otherwise and s:
            print(f"  (no gain over the trained run: evaluated with other {', '.join(otherwise)} than it was)")
            s = {}
        for key in ("knn_top1", "linear_top1", "linear_top1_best", "linear_top5"):  # top-5: BYOL's streamed probe
            if key.startswith("linear") and not saved.eval.linear and s.get(key) is None:
                continue  # the run was trained without the probe: its null says "not run", not NaN
            if key in s and results.get(key) is not None:
                trained = math.nan if s[key] is None else s[key]  # null: NaN at the end of training (non-finite)
                if untrained:
                    print(
                        f"  {key}: the trained run reported {trained:.2f} %, {trained - results[key]:+.2f} over its "
                        f"untrained network ({results[key]:.2f} %)"
                    )
                else:
                    print(
                        f"  {key}: training run reported {trained:.2f} %, now {results[key]:.2f} % "
                        f"(difference {results[key] - trained:+.2f})"
                    )
    return _leave_group()


def _check_json_target(json_out: str, run_dir: Path | None, untrained: bool) -> None:
    """Refuse a ``--json`` that would overwrite a run's own files (its checkpoint: the run could no longer resume;
    its ``config.yaml``, ``summary.json``, ...), before any evaluation, as ``export --out`` does; the evaluated
    run's own ``eval.json`` (``eval_untrained.json``), where the record goes by default, is allowed."""
    import os

    from directpred.export import _check_export_target

    default = None if run_dir is None else run_dir / ("eval_untrained.json" if untrained else "eval.json")
    if default is not None and os.path.realpath(json_out) == os.path.realpath(default):
        return
    _check_export_target(json_out, "--json", what="the record", example="eval_copy.json")


def _leave_group() -> int:
    """Every process leaves the process group together (under torchrun), then ends without the finalisation that can
    abort a gloo process (:func:`directpred.distributed.exit_process`); 0."""
    from directpred import distributed

    if distributed.shutdown():
        distributed.exit_process(0)
    return 0


# What `directpred eval --set` may change: how the evaluation runs and where it reads the data. The rest describes
# how the run was trained: changing it would either not load (another backbone) or change nothing (optim.lr) while
# eval.json records it as if it had.
EVAL_CHANGES = ("eval.", "data.", "train.device", "train.precision", "train.channels_last", "train.seed")


def _check_eval_overrides(saved: Config, cfg: Config) -> None:
    other = list(diff_configs(saved, cfg, beyond=EVAL_CHANGES))
    if other:
        raise ConfigError(
            f"directpred eval --set {', '.join(other)}: these describe how the run was trained, not how it is "
            f"evaluated; eval may change {', '.join(a + '*' if a.endswith('.') else a for a in EVAL_CHANGES)} "
            "(to train otherwise, start a new run)"
        )


def _check_checkpoint_config(ckpt: Path, state: dict, saved: Config, run_dir: Path) -> None:
    """Refuse a ``--checkpoint`` trained with another configuration than ``run_dir``'s (another run's, of the same
    shape, would be evaluated with this run's recipe and written into its ``eval.json``)."""
    from directpred.export import checkpoint_config_differences

    shown = checkpoint_config_differences(state, saved)
    if shown:
        raise ConfigError(
            f"--checkpoint {ckpt} was trained with another configuration than {run_dir / 'config.yaml'} ({shown}); "
            "evaluate it from its own run directory (`directpred eval THAT_RUN --checkpoint ...`)"
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="kNN + linear probe of a run's checkpoint",
        description="Evaluate the online backbone of a run: kNN (cosine, weighted votes) and the "
        "run's linear probe (eval.linear_protocol: the authors' or BYOL's). Writes RUN_DIR/eval.json. With "
        "--untrained: the same network at its random initialisation (of a run directory or a config file), the "
        "baseline that shows what training added.",
    )
    p.add_argument(
        "run_dir", help="a run directory made by `directpred train` (with --untrained, a config file will do too)"
    )
    p.add_argument("--checkpoint", help="checkpoint file (default: RUN_DIR/checkpoints/last.pt)")
    p.add_argument(
        "--untrained",
        action="store_true",
        help="evaluate the network at the initialisation `directpred train` starts from (train.seed; --set "
        "train.seed=S for another): the baseline a trained run is judged against. Writes RUN_DIR/eval_untrained.json",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        help="write the results here (default: RUN_DIR/eval.json, with --untrained RUN_DIR/eval_untrained.json; "
        "for a config file nothing unless given)",
    )
    p.add_argument(
        "--no-linear", action="store_true", help="skip the linear probe (kNN only; same as --set eval.linear=false)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override evaluation settings (eval.*, data.*, train.device/precision/channels_last/seed), e.g. "
        "--set eval.linear_epochs=100",
    )
    p.set_defaults(func=run)
