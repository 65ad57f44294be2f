"""The ``directpred`` command line (also ``python -m directpred``).

Subcommands: ``train`` (a run directory per run; YAML config + ``--set key=value`` overrides; ``--resume``),
``eval`` (kNN + linear probe of a run's checkpoint), ``export`` and ``embed`` (the trained backbone and its
features), ``sweep`` (configs x seeds, each a ``train`` subprocess, into one table), ``theory`` (the paper's learning
dynamics), and the diagnostics commands ``plot`` and ``diagnose``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from directpred.config import ConfigError

EPILOG = """examples:
  directpred train configs/cpu/quickstart.yaml --out runs/qs
  directpred train configs/cpu/quickstart.yaml --set predictor.name=linear --set train.epochs=3
  directpred train --resume runs/qs
  directpred eval runs/qs
  directpred export runs/qs --out backbone.pt
  directpred embed runs/qs --data my_images/ --out features.npy
  directpred sweep sweeps/cpu/cifar10_predictors.yaml --out runs/sweep_cpu
  torchrun --standalone --nproc_per_node=2 -m directpred train configs/cpu/quickstart.yaml --out runs/ddp
"""


# Packages of the optional extras (pyproject.toml) -> the extra that installs them.
OPTIONAL_PACKAGES = {"matplotlib": "plot", "onnx": "onnx", "onnxscript": "onnx"}


def cmd_shards(args: argparse.Namespace) -> int:
    from directpred.data.stream import write_shards

    if args.shard_size < 1:
        raise ConfigError(f"--shard-size {args.shard_size}: must be >= 1 (images per shard, e.g. 1000)")
    counts = write_shards(args.folder, args.out, shard_size=args.shard_size, splits=tuple(args.splits))
    for split, n in counts.items():
        print(f"{split}: {n} images in {-(-n // args.shard_size)} shard(s) {split}-NNNNNN.tar")
    print(f"written to {args.out} (with classes.txt); train from it with --set data.path={args.out}")
    return 0


def _print_results(results: dict, header: str) -> None:
    print(header)
    if results.get("knn_top1") is not None:
        print(f"  kNN top-1:           {results['knn_top1']:6.2f} %   (cosine, k=200, T=0.1 unless configured)")
    if results.get("linear_top1") is not None:
        print(f"  linear probe top-1:  {results['linear_top1']:6.2f} %   (final probe epoch)")
        print(f"  linear probe best:   {results['linear_top1_best']:6.2f} %   (best over probe epochs, as the "
              "authors' code reports)")
    if results.get("linear_top5") is not None:
        print(f"  linear top-5:        {results['linear_top5']:6.2f} %   (BYOL's protocol, final epoch)")


@contextlib.contextmanager
def stop_on_signals(trainer: Any) -> Iterator[None]:
    """While training: the first SIGINT/SIGTERM asks ``trainer`` to stop after the current step (it writes the
    checkpoint and raises ``TrainingInterrupted``); a second one stops at once (``KeyboardInterrupt``)."""

    def handle(signum: int, frame: object) -> None:
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handle)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from directpred import distributed
    from directpred.config import config_from_dict, dump_config, load_config
    from directpred.train.checkpoint import atomic_write_text
    from directpred.train.faults import TrainingInterrupted
    from directpred.train.loop import Trainer
    from directpred.train.rundir import check_resume_config

    if args.resume:
        run_dir = Path(args.resume)
        cfg_file = run_dir / "config.yaml"
        if not cfg_file.is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
        if args.config:
            raise ConfigError("give either a CONFIG file or --resume RUN_DIR, not both (use --set to change "
                              "allowed settings such as train.epochs on resume)")
        saved = config_from_dict(yaml.safe_load(cfg_file.read_text()))
        cfg = load_config(None, args.set, base=saved.to_dict())
        check_resume_config(saved, cfg, force=args.force)
        if cfg != saved and distributed.is_main():
            atomic_write_text(cfg_file, dump_config(cfg))
        trainer = Trainer(cfg, run_dir, resume=True, command=" ".join(sys.argv))
    else:
        if not args.config:
            raise ConfigError("directpred train needs a CONFIG file (e.g. configs/cpu/quickstart.yaml) or "
                              "--resume RUN_DIR")
        cfg = load_config(args.config, args.set)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{stamp}"
        trainer = Trainer(cfg, run_dir, command=" ".join(sys.argv))
    try:
        with stop_on_signals(trainer):
            summary = trainer.fit()
    except TrainingInterrupted as exc:
        if distributed.is_main():
            print(f"\n{exc}", file=sys.stderr)
        return 128 + exc.signum if exc.signum else 1
    if distributed.is_main():
        _print_results(summary, f"\nrun {run_dir}: {summary['epochs']:g} epochs, {summary['steps']} steps, "
                                f"{summary['images_per_second'] or 0:.0f} images/s, "
                                f"{summary['wall_seconds']:.0f} s wall")
        print(f"  summary: {run_dir / 'summary.json'}")
    distributed.shutdown()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from directpred.backbones import resolve_channels_last
    from directpred.config import config_from_dict, load_config
    from directpred.data.datasets import load_data
    from directpred.eval.protocol import evaluate
    from directpred.methods import build_method
    from directpred.runtime import resolve_device, resolve_precision
    from directpred.train.checkpoint import atomic_write_json, load_checkpoint

    run_dir = Path(args.run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; give a run directory made by `directpred train`")
    saved = config_from_dict(yaml.safe_load(cfg_file.read_text()))
    cfg = load_config(None, args.set, base=saved.to_dict())
    ckpt = Path(args.checkpoint) if args.checkpoint else run_dir / "checkpoints" / "last.pt"
    device = resolve_device(cfg.train.device)
    state = load_checkpoint(ckpt, map_location=device)
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg).to(device)
    if resolve_channels_last(cfg.train.channels_last, method, device):
        method = method.to(memory_format=torch.channels_last)
    method.load_state_dict(state["model"])
    if cfg.data.stream:
        from directpred.data.stream import load_stream_data

        data = load_stream_data(cfg.data)
    else:
        data = load_data(cfg.data, seed=cfg.train.seed)
    results = evaluate(method, data, cfg, device, linear=not args.no_linear,
                       autocast_dtype=resolve_precision(cfg.train.precision, device))
    results.update(checkpoint=str(ckpt), step=int(state["step"]))
    atomic_write_json(run_dir / "eval.json", results)
    _print_results(results, f"{run_dir} (checkpoint {ckpt.name}, step {state['step']}):")
    summary_file = run_dir / "summary.json"
    if summary_file.is_file() and not args.checkpoint:
        s = json.loads(summary_file.read_text())
        for key in ("knn_top1", "linear_top1", "linear_top1_best"):
            if s.get(key) is not None and results.get(key) is not None:
                print(f"  {key}: training run reported {s[key]:.2f} %, now {results[key]:.2f} % "
                      f"(difference {results[key] - s[key]:+.2f})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from directpred.export import export_backbone

    if args.onnx:
        try:
            import onnx  # noqa: F401
        except ImportError:
            print("directpred: error: --onnx needs the onnx package: pip install 'directpred[onnx]'", file=sys.stderr)
            return 1
    exp = export_backbone(args.source, args.out, checkpoint=args.checkpoint, torchscript=args.torchscript,
                          onnx=args.onnx)
    print(f"{args.out}: {exp.arch} width {exp.width}{' CIFAR stem' if exp.cifar_stem else ''}, {exp.out_dim}-d "
          f"features of {exp.image_size}x{exp.image_size} images, step {exp.step}")
    for label, path in (("TorchScript", args.torchscript), ("ONNX", args.onnx)):
        if path:
            print(f"{path}: {label} (input: normalised images (B, 3, {exp.image_size}, {exp.image_size}))")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from directpred.export import embed, read_backbone, read_image_folder, save_features
    from directpred.runtime import resolve_device

    exp = read_backbone(args.source, checkpoint=args.checkpoint)
    data, names = read_image_folder(args.data, image_size=exp.image_size, split=args.split,
                                    skip_corrupt=args.skip_corrupt)
    device = resolve_device(args.device)
    feats = embed(exp.build().to(device), data.images, exp.recipe, batch_size=args.batch_size, device=device)
    files = save_features(args.out, feats.numpy(), data.labels.numpy(), data.classes, names)
    print(f"{len(feats)} images, {len(data.classes)} classes, {feats.shape[1]}-d features -> "
          + ", ".join(str(f) for f in files))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="directpred", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="BYOL/SimSiam with DirectPred (Tian, Chen, Ganguli, ICML 2021): train, evaluate, diagnose, "
                    "and simulate the paper's learning dynamics.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (a run directory per run)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Pre-train with a YAML config, then report kNN and linear-probe accuracy. "
                                   "The run directory gets config.yaml, metrics.jsonl, TensorBoard events, "
                                   "checkpoints/ and summary.json.")
    p.add_argument("config", nargs="?", help="YAML config (see configs/); its keys override the defaults")
    p.add_argument("--out", help="run directory (default: runs/<config name>-<timestamp>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set predictor.rho=0.5 (repeatable; value parsed as YAML)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    p.add_argument("--force", action="store_true",
                   help="with --resume: accept config changes that are not normally allowed on resume")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="kNN + linear probe of a run's checkpoint",
                       description="Evaluate the online backbone of a run: kNN (cosine, weighted votes) and the "
                                   "authors' linear-probe protocol. Writes RUN_DIR/eval.json.")
    p.add_argument("run_dir", help="a run directory made by `directpred train`")
    p.add_argument("--checkpoint", help="checkpoint file (default: RUN_DIR/checkpoints/last.pt)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe (kNN only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override evaluation settings, e.g. --set eval.linear_epochs=100")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write the trained backbone as a plain state dict (and TorchScript/ONNX)",
                       description="Write the online backbone of a run as a dict with a torchvision ResNet "
                                   "state dict (no fc) and what rebuilds it (arch, width, stem, image size, "
                                   "normalisation). Load it with directpred.load_backbone(FILE).")
    p.add_argument("source", help="a run directory, a checkpoint file, or an exported file")
    p.add_argument("--out", required=True, help="the exported file, e.g. backbone.pt")
    p.add_argument("--checkpoint", help="with a run directory: this checkpoint instead of checkpoints/last.pt")
    p.add_argument("--torchscript", metavar="FILE", help="also write a traced TorchScript module")
    p.add_argument("--onnx", metavar="FILE", help="also write an ONNX graph (needs the onnx package)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embed", help="features of an ImageFolder with a run's backbone",
                       description="Embed every image of an ImageFolder (<class>/<image>, a directory or "
                                   ".tar/.tar.gz; a train/ + test/ layout gives --split) with the online backbone "
                                   "and the run's test-time transform. --out X.npy writes X.npy (features) and "
                                   "X.labels.npy; --out X.npz one file with features, labels, classes, paths.")
    p.add_argument("source", help="a run directory, a checkpoint file, or an exported file")
    p.add_argument("--data", required=True, help="an ImageFolder directory or .tar/.tar.gz")
    p.add_argument("--out", required=True, help="features.npy or features.npz")
    p.add_argument("--split", default="test", choices=["train", "test"],
                   help="which split of a train/ + test/ layout (default: test)")
    p.add_argument("--checkpoint", help="with a run directory: this checkpoint instead of checkpoints/last.pt")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--skip-corrupt", action="store_true", help="skip undecodable images with a warning")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("shards", help="write an ImageFolder tree as WebDataset tar shards",
                       description="Write train/ and val/ (or test/) of an ImageFolder tree as tar shards "
                                   "SPLIT-NNNNNN.tar (members KEY.jpg + KEY.cls, KEY the image's index in the "
                                   "folder's sorted order) and classes.txt. A streamed run (data.stream=true) reads "
                                   "them in the same order as the folder: the same seed gives the same epochs.")
    p.add_argument("folder", help="an ImageFolder directory with train/<class>/... and val/ or test/")
    p.add_argument("--out", required=True, help="the directory to write the shards to")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val", "test"],
                   help="splits to write (default: train val; val falls back to test/)")
    p.set_defaults(func=cmd_shards)

    from directpred.sweep import register as register_sweep

    register_sweep(sub)

    try:
        from directpred.cli.theory import register as register_theory
    except ImportError:
        pass
    else:
        register_theory(sub)
    try:
        from directpred.cli.diagnose import register as register_diagnostics
    except ImportError:
        pass
    else:
        register_diagnostics(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``directpred`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"directpred: config error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in OPTIONAL_PACKAGES:
            extra = OPTIONAL_PACKAGES[exc.name.split(".")[0]]
            print(f"directpred: error: `directpred {args.command}` needs {exc.name.split('.')[0]}, which is not "
                  f"installed: pip install 'directpred[{extra}]'", file=sys.stderr)
            return 1
        raise
    except Exception as exc:
        import urllib.error

        from directpred.data.datasets import DataError, DownloadError
        from directpred.train.checkpoint import CheckpointError
        from directpred.train.faults import TrainingError

        if isinstance(exc, (DownloadError, urllib.error.URLError)):  # a network failure, never a disk problem
            print(f"directpred: network error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, (DataError, CheckpointError, TrainingError, FloatingPointError)):
            print(f"directpred: error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError):  # e.g. a full disk while logging: checkpoints are written atomically
            print(f"directpred: error: {exc.strerror or exc} ({exc.filename or 'output'}); the last checkpoint "
                  "is intact: free space or fix permissions, then resume with `directpred train --resume RUN_DIR`",
                  file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
