"""A generated ImageNet-like folder for the CPU proxy recipe, tests and benchmarks: JPEGs of varied sizes and
aspect ratios (about 0.6 to 1.6 times the given size), in ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``, with
class-dependent content (a coloured disc and stripes of a class-dependent angle on textured noise) so that a
network learns something in a few hundred steps.

    python -m directpred.data.proxy OUT --train 3000 --val 500 --classes 10 --size 96
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def proxy_image(rng: np.random.Generator, label: int, classes: int, size: int) -> np.ndarray:
    """One RGB uint8 image of class ``label`` with a random size around ``size``."""
    h = int(size * rng.uniform(0.6, 1.6))
    w = int(size * rng.uniform(0.6, 1.6))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.pi * label / classes
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / max(8, size / 6)))
    colour = np.array([(label * 67) % 256, (label * 151 + 40) % 256, (label * 29 + 90) % 256], dtype=np.float32)
    img = rng.normal(90, 30, (h, w, 3)).astype(np.float32) + 60 * stripes[..., None]
    cy, cx, r = rng.uniform(0.3 * h, 0.7 * h), rng.uniform(0.3 * w, 0.7 * w), min(h, w) * rng.uniform(0.2, 0.35)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img[disc] = 0.7 * colour + 0.3 * img[disc]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_proxy_folder(
    root: str | Path,
    *,
    train: int = 3000,
    val: int = 500,
    classes: int = 10,
    size: int = 96,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write ``train`` + ``val`` JPEGs over ``classes`` classes (round-robin) into ``root``; returns ``root``."""
    root = Path(root)
    for split, n, s in (("train", train, seed), ("val", val, seed + 1)):
        rng = np.random.default_rng(s)
        for i in range(n):
            label = i % classes
            d = root / split / f"n{label:08d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(proxy_image(rng, label, classes, size)).save(d / f"{split}_{i:07d}.JPEG", quality=quality)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_proxy_folder(a.out, train=a.train, val=a.val, classes=a.classes, size=a.size, seed=a.seed)
    print(f"wrote {a.train} train + {a.val} val JPEGs to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
