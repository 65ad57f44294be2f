"""``directpred shards``: an ImageFolder tree as WebDataset tar shards for a streamed run (``data.stream``)."""

from __future__ import annotations

import argparse
import shlex

from directpred.config import ConfigError


def run(args: argparse.Namespace) -> int:
    """``directpred shards``."""
    from directpred.data.stream import write_shards

    if args.shard_size < 1:
        raise ConfigError(f"--shard-size {args.shard_size}: must be >= 1 (images per shard, e.g. 1000)")
    counts = write_shards(args.folder, args.out, shard_size=args.shard_size, splits=tuple(args.splits))
    for split, n in counts.items():
        print(f"{split}: {n} images in {-(-n // args.shard_size)} shard(s) {split}-NNNNNN.tar")
    print(
        f"written to {args.out} (with classes.txt); train from it with --set data.dataset=folder --set "
        f"data.stream=true --set data.image_size=SIZE (e.g. 224) --set data.path={shlex.quote(str(args.out))}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help="write an ImageFolder tree as WebDataset tar shards",
        description="Write train/ and val/ (or test/) of an ImageFolder tree as tar shards "
        "SPLIT-NNNNNN.tar (members KEY.jpg + KEY.cls, KEY the image's index in the "
        "folder's sorted order) and classes.txt. A streamed run (data.stream=true) reads "
        "them in the same order as the folder: the same seed gives the same epochs.",
    )
    p.add_argument("folder", help="an ImageFolder directory with train/<class>/... and val/ or test/")
    p.add_argument("--out", required=True, help="the directory to write the shards to")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument(
        "--splits",
        nargs="+",
        default=["train", "val"],
        choices=["train", "val", "test"],
        help="splits to write (default: train val; val falls back to test/)",
    )
    p.set_defaults(func=run)
