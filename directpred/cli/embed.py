"""``directpred embed``: features of an ImageFolder with a run's backbone."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from directpred.config import ConfigError


def run(args: argparse.Namespace) -> int:
    """``directpred embed``."""
    from directpred.export import embed, features_target_problem, read_backbone, read_image_folder, save_features
    from directpred.runtime import resolve_device

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1 (images per forward pass, e.g. 256)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise ConfigError(f"--device {args.device!r}: use auto, cpu, cuda or cuda:N")
    problem = features_target_problem(args.out)
    if problem is not None:  # before the work: it wrote <dir>.npy beside the directory, with exit 0
        print(f"directpred embed: error: --out {problem}", file=sys.stderr)
        return 1
    suffix = Path(args.out).suffix
    if suffix not in ("", ".npy", ".npz"):  # checked before the work: it wrote X.txt.npy before
        raise ConfigError(
            f"--out {args.out}: give a .npy file (the features, with the labels in X.labels.npy beside it) or a .npz "
            f"file (features, labels, classes, paths); {suffix} is neither"
        )
    device = resolve_device(args.device, option="--device")  # before any reading: a wrong device fails at once
    exp = read_backbone(args.source, checkpoint=args.checkpoint)
    data, names = read_image_folder(
        args.data,
        image_size=exp.image_size,
        decode_size=exp.decode_side,  # a streamed run's test images: resized to decode_size, centre crop
        split=args.split,
        held_out=exp.held_out,  # the default split: the run's own held-out images (a streamed run's val/ first)
        skip_corrupt=args.skip_corrupt,
        skip_hint="pass --skip-corrupt",
    )
    feats = embed(exp.build().to(device), data.images, exp.recipe, batch_size=args.batch_size, device=device)
    files = save_features(args.out, feats.numpy(), data.labels.numpy(), data.classes, names)
    labels = f"{len(data.classes)} classes" if data.classes else "no class folders (labels -1)"
    print(f"{len(feats)} images, {labels}, {feats.shape[1]}-d features -> " + ", ".join(str(f) for f in files))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="features of an ImageFolder with a run's backbone",
        description="Embed every image of an ImageFolder (<class>/<image>, a directory or "
        ".tar/.tar.gz; images without class folders get label -1; a layout of split folders (train/, val/, test/, "
        "unlabeled/) gives --split, by default the held-out images the run's kNN and linear probe use) with the "
        "online backbone and the run's test-time transform. --out X.npy writes X.npy (features) and "
        "X.labels.npy; --out X.npz one file with features, labels, classes, paths.",
    )
    p.add_argument("source", help="a run directory, a checkpoint file, or an exported file")
    p.add_argument(
        "--data",
        required=True,
        help="a folder or .tar/.tar.gz of images: <class>/<image>, split folders of those (train/ + test/, "
        "ImageNet's train/ + val/, STL-10's train/ + test/ + unlabeled/), or images without class folders (labels -1)",
    )
    p.add_argument("--out", required=True, help="features.npy or features.npz (a file, not a directory)")
    p.add_argument(
        "--split",
        choices=["train", "val", "test", "unlabeled"],
        help="which split folder to embed (unlabeled/: every image in it, label -1). Default: the held-out split "
        "the run evaluates on, the first with class folders of val/, test/ for a streamed run (as its reader: an "
        "ImageNet test/ of unlabelled images is passed over) and of test/, val/ for an in-memory one. Refused for "
        "data without split folders (top folders are splits only when all are named train, val, test or unlabeled: "
        "otherwise they are classes)",
    )
    p.add_argument("--checkpoint", help="with a run directory: this checkpoint instead of checkpoints/last.pt")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--skip-corrupt", action="store_true", help="skip undecodable images with a warning")
    p.set_defaults(func=run)
