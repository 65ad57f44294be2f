"""``directpred export``: the trained backbone as a plain state dict (and TorchScript/ONNX)."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    """``directpred export``."""
    from directpred.config import install_hint
    from directpred.export import export_backbone

    if args.onnx:
        try:
            import onnx  # noqa: F401
        except ImportError:
            print(f"directpred: error: --onnx needs the onnx package: {install_hint('onnx')}", file=sys.stderr)
            return 1
    exp = export_backbone(
        args.source, args.out, checkpoint=args.checkpoint, torchscript=args.torchscript, onnx=args.onnx
    )
    print(
        f"{args.out}: {exp.arch} width {exp.width}{' CIFAR stem' if exp.cifar_stem else ''}, {exp.out_dim}-d "
        f"features of {exp.image_size}x{exp.image_size} images, step {exp.step}"
    )
    for label, path in (("TorchScript", args.torchscript), ("ONNX, one file with its weights inside", args.onnx)):
        if path:
            print(f"{path}: {label} (input: normalised images (B, 3, {exp.image_size}, {exp.image_size}))")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the trained backbone as a plain state dict (and TorchScript/ONNX)",
        description="Write the online backbone of a run as a dict with a torchvision ResNet "
        "state dict (no fc) and what rebuilds it (arch, width, stem, image size, "
        "normalisation). Load it with directpred.load_backbone(FILE).",
    )
    p.add_argument("source", help="a run directory, a checkpoint file, or an exported file")
    p.add_argument(
        "--out",
        required=True,
        help="the exported file, e.g. backbone.pt (a file of a run directory, such as its config.yaml or a checkpoint, "
        "is refused)",
    )
    p.add_argument("--checkpoint", help="with a run directory: this checkpoint instead of checkpoints/last.pt")
    p.add_argument("--torchscript", metavar="FILE", help="also write a traced TorchScript module")
    p.add_argument(
        "--onnx",
        metavar="FILE",
        help="also write an ONNX graph, one self-contained file (no .onnx.data beside it; needs the onnx extra)",
    )
    p.set_defaults(func=run)
