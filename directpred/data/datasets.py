"""Datasets as decoded uint8 arrays in memory: CIFAR-10/100 and STL-10 through torchvision, any ImageFolder
directory, or a ``.tar``/``.tar.gz`` archive holding ``train/<class>/...`` and ``test/<class>/...``.

Folders and archives are decoded once (Pillow, both cores) into ``.npy`` files in ``data.cache_dir``, keyed by the
source's path, size and modification time, and written atomically; later runs memory-map them in a second. Images
of differing sizes are resized (shorter side) and centre-cropped to ``data.image_size``. Archives are read in place,
never extracted next to themselves (the shared mirror is read-only).

Over 300 lines: the sources (folder or archive, torchvision, the array cache) share the error handling that
tells network, disk and data problems apart.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import tarfile
import urllib.error
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from directpred import distributed
from directpred.config import DataConfig, path_exists
from directpred.files import fsync_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_CACHE_VERSION = 3  # 2: the folder key holds every file's relative path; 3: 16-bit images rescaled


class DataError(RuntimeError):
    """Missing, corrupt or inconsistent data; the message names the files and the fix."""


class DownloadError(DataError):
    """A dataset could not be downloaded (no network, a blocked or failing server); not a disk or data problem."""


# What urllib/http raise when the network is down or the server fails (URLError covers HTTPError and DNS errors).
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)

_TORCHVISION_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10"}


@dataclass
class ImageArrays:
    """Decoded images of one split.

    Attributes:
        images: uint8 tensor (N, H, W, 3).
        labels: int64 tensor (N,); -1 for unlabelled images (STL-10 ``unlabeled``).
        classes: class names, index = label.
        skipped: corrupt files skipped while decoding (with ``data.skip_corrupt``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor) -> ImageArrays:
        return ImageArrays(self.images[index], self.labels[index], self.classes, self.skipped)


@dataclass
class DataBundle:
    """The three roles data plays: pre-training images, and labelled train/test sets for kNN and the probe."""

    pretrain: ImageArrays
    train: ImageArrays
    test: ImageArrays
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def image_size(self) -> int:
        return int(self.pretrain.images.shape[1])


def balanced_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` samples with (as nearly as possible) equally many per class, in ascending order.

    Labels < 0 (unlabelled) count as one extra class. Deterministic for a given seed.
    """
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    quota = [0] * len(classes)
    remaining = n
    # Round-robin quotas so that classes smaller than n/C give their share to the others.
    while remaining > 0:
        open_classes = [i for i in range(len(classes)) if quota[i] < len(per_class[i])]
        if not open_classes:
            break
        share = max(remaining // len(open_classes), 1)
        for i in open_classes:
            take = min(share, len(per_class[i]) - quota[i], remaining)
            quota[i] += take
            remaining -= take
            if remaining == 0:
                break
    chosen = torch.cat([idx[:q] for idx, q in zip(per_class, quota)])
    return torch.sort(chosen).values


# ----------------------------------------------------------------------------------------------------------------
# Folders and archives


def _list_source(path: Path) -> dict[str, list[tuple[str, int]]]:
    """Map split -> [(member name, class index)]; validates the layout."""
    if path.is_dir():
        names = [str(p.relative_to(path)).replace(os.sep, "/") for p in path.rglob("*") if p.is_file()]
        dirs = {str(p.relative_to(path)).replace(os.sep, "/") for p in path.rglob("*") if p.is_dir()}
    elif tarfile.is_tarfile(path):
        try:
            with tarfile.open(path) as tf:
                members = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(
                f"{path}: the archive is corrupt or truncated ({exc}); re-copy it or point data.path "
                "at an extracted folder"
            ) from None
        names = [m.name.lstrip("./") for m in members if m.isfile()]
        dirs = {m.name.lstrip("./") for m in members if m.isdir()}
        dirs |= {n.rsplit("/", 1)[0] for n in names if "/" in n}
    else:
        raise DataError(
            f"{path} is neither a directory nor a tar archive; data.path must be an ImageFolder "
            "directory or a .tar/.tar.gz holding train/<class>/... and test/<class>/..."
        )
    # Accept one wrapping top-level folder (archive.tar.gz -> name/train/...).
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    prefix = ""
    if "train" not in roots and len(roots) == 1:
        prefix = next(iter(roots)) + "/"
    splits: dict[str, list[tuple[str, int]]] = {}
    non_images: list[str] = []
    class_lists: dict[str, list[str]] = {}
    for split in ("train", "test"):
        base = f"{prefix}{split}/"
        class_dirs = sorted(
            {d[len(base) :].split("/")[0] for d in dirs if d.startswith(base) and d != base.rstrip("/")}
            | {n[len(base) :].split("/")[0] for n in names if n.startswith(base) and n[len(base) :].count("/") >= 1}
        )
        if not class_dirs and path.is_dir() and (path / "classes.txt").is_file() and any(path.glob("train-*.tar")):
            raise DataError(  # `directpred shards` output: read lazily, shard by shard, never decoded into memory
                f"{path} holds tar shards (classes.txt, train-NNNNNN.tar), which are read streamed: add --set "
                "data.stream=true --set data.image_size=SIZE (e.g. 224; docs/imagenet.md)"
            )
        if not class_dirs:
            raise DataError(
                f"{path}: no '{base}<class>/' folders found; the data must be laid out as "
                "train/<class>/<image> and test/<class>/<image> (torchvision ImageFolder layout)"
            )
        class_lists[split] = class_dirs
        items: list[tuple[str, int]] = []
        counts = dict.fromkeys(class_dirs, 0)
        for n in sorted(names):
            if not n.startswith(base):
                continue
            rel = n[len(base) :]
            if "/" not in rel:
                continue
            cls = rel.split("/")[0]
            if not n.lower().endswith(IMAGE_EXTENSIONS):
                non_images.append(n)
                continue
            items.append((n, class_dirs.index(cls)))
            counts[cls] += 1
        # (class, path within the class folder), the streamed FolderReader's order; a plain sort of the paths put
        # class "a-b"'s images before class "a"'s ("-" sorts before "/")
        items.sort(key=lambda item: (item[1], item[0]))
        empty = [c for c, k in counts.items() if k == 0]
        if empty:
            raise DataError(
                f"{path}: {len(empty)} empty class folder(s) in {split}/: {', '.join(empty[:5])}; "
                "remove them or add images (an empty class would shift every label)"
            )
        splits[split] = items
    if class_lists["train"] != class_lists["test"]:
        only_train = sorted(set(class_lists["train"]) - set(class_lists["test"]))
        only_test = sorted(set(class_lists["test"]) - set(class_lists["train"]))
        raise DataError(
            f"{path}: train/ and test/ hold different classes (only in train: {only_train[:5]}, "
            f"only in test: {only_test[:5]}); both splits need the same class folders"
        )
    # Optional: unlabelled images (STL-10's "unlabeled") anywhere under unlabeled/, label -1, for pre-training only.
    unlabeled = sorted(n for n in names if n.startswith(f"{prefix}unlabeled/") and n.lower().endswith(IMAGE_EXTENSIONS))
    if unlabeled:
        splits["unlabeled"] = [(n, -1) for n in unlabeled]
    if non_images:
        warnings.warn(f"{path}: ignored {len(non_images)} non-image file(s), e.g. {non_images[:3]}", stacklevel=3)
    splits["__classes__"] = [(c, i) for i, c in enumerate(class_lists["train"])]
    return splits


def _to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB. Pillow's ``convert("RGB")`` clips the single-channel modes of more than 8 bits to
    0..255 (a 16-bit grey image turns almost all white), so these are rescaled first:

    * ``I;16`` (a 16-bit grey PNG or TIFF, any byte order): the top 8 bits, ``value >> 8`` (0..65535 -> 0..255).
    * ``I`` (32-bit integers; older Pillow opens 16-bit grey PNGs so): values within 0..65535 as 16 bits, the same
      ``>> 8``; an image with values outside that range is stretched from its own minimum to its maximum.
    * ``F`` (32-bit floats): values within 0..1 (the usual convention for float images) times 255, rounded; an
      image with values outside that range is stretched from its own minimum to its maximum (NaN as the minimum).

    A constant image that has to be stretched becomes black. Other modes (RGB, RGBA, L, P, CMYK, ...) are left
    to Pillow's conversion.
    """
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im.convert("RGB")
    a = np.asarray(im)
    if a.dtype.kind == "u":  # I;16, I;16B, I;16L, I;16N
        grey = (a.astype(np.uint16) >> 8).astype(np.uint8)
    else:  # I, F (and a signed 16-bit mode: as I)
        a = np.where(np.isnan(a), -np.inf, a.astype(np.float64))  # NaN as the minimum; +-inf clipped below
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        top = 1.0 if im.mode == "F" else 65535.0
        if 0.0 <= lo and hi <= top and finite.size == a.size:
            scaled = np.round(a * 255.0) if im.mode == "F" else np.floor(a / 256.0)
        else:
            a = np.clip(a, lo, hi)
            scaled = np.round((a - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros_like(a)
        grey = scaled.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(grey)).convert("RGB")


def _decode(blob: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as im:
        im = _to_rgb(im)
        if size and (im.width != size or im.height != size):
            scale = size / min(im.width, im.height)
            im = im.resize(
                (max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.Resampling.BICUBIC
            )
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8)


def decode_failure(exc: Exception) -> str:
    """A decoder's exception as the message about the file: without the in-memory buffer PIL names for it
    (``cannot identify image file <_io.BytesIO object at 0x7f...>``), since the caller names the file."""
    return f"{type(exc).__name__}: " + re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))


def _decode_chunk(args: tuple[list[bytes], int]) -> list[np.ndarray | str]:
    blobs, size = args
    out: list[np.ndarray | str] = []
    for b in blobs:
        try:
            out.append(_decode(b, size))
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt file
            out.append(decode_failure(exc))
    return out


def _read_blobs(path: Path, names: list[str]) -> list[bytes]:
    if path.is_dir():
        return [(path / n).read_bytes() for n in names]
    wanted = set(names)
    found: dict[str, bytes] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            name = m.name.lstrip("./")
            if m.isfile() and name in wanted:
                f = tf.extractfile(m)
                found[name] = f.read() if f is not None else b""
    return [found[n] for n in names]


def _decode_split(
    path: Path,
    items: list[tuple[str, int]],
    size: int,
    skip_corrupt: bool,
    blobs: list[bytes],
    skip_hint: str = "set data.skip_corrupt=true",
) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    chunks = [blobs[i : i + 2000] for i in range(0, len(blobs), 2000)]
    workers = max(1, min(os.cpu_count() or 1, 8))
    if workers > 1 and len(blobs) > 4000:
        with ProcessPoolExecutor(workers) as pool:
            decoded = [x for part in pool.map(_decode_chunk, [(c, size) for c in chunks]) for x in part]
    else:
        decoded = [x for c in chunks for x in _decode_chunk((c, size))]
    bad = [(items[i][0], d) for i, d in enumerate(decoded) if isinstance(d, str)]
    if bad and not skip_corrupt:
        listing = "; ".join(f"{n} ({why})" for n, why in bad[:5])
        raise DataError(
            f"{path}: {len(bad)} image(s) cannot be decoded: {listing}. Remove or replace them, or "
            f"{skip_hint} to skip them with a warning"
        )
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} corrupt image(s), e.g. {[n for n, _ in bad[:3]]}", stacklevel=3)
    good = [(d, items[i][1]) for i, d in enumerate(decoded) if not isinstance(d, str)]
    if not good:
        raise DataError(f"{path}: no decodable images")
    shapes = {d.shape for d, _ in good}
    if len(shapes) > 1:
        raise DataError(
            f"{path}: images have different sizes ({sorted(shapes)[:3]}...); set data.image_size to "
            "resize and centre-crop them to one size while decoding"
        )
    images = np.stack([d for d, _ in good])
    labels = np.asarray([y for _, y in good], dtype=np.int64)
    kept = [items[i][0] for i, d in enumerate(decoded) if not isinstance(d, str)]
    return images, labels, len(bad), kept


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def list_members(path: str | Path) -> list[str]:
    """The files of a directory or tar archive, as '/'-separated names relative to it (a leading './' removed)."""
    path = Path(path)
    if path.is_dir():
        return sorted(str(p.relative_to(path)).replace(os.sep, "/") for p in path.rglob("*") if p.is_file())
    try:
        with tarfile.open(path) as tf:
            return sorted(m.name.lstrip("./") for m in tf.getmembers() if m.isfile())
    except (tarfile.TarError, EOFError, OSError) as exc:
        if path.is_file() and not path.name.lower().endswith(TAR_SUFFIXES):  # an image, a .zip, a text file
            raise DataError(
                f"{path} is a file, not a folder or .tar/.tar.gz archive; give the folder that holds the images"
            ) from None
        # tarfile lists each decompressor's complaint on a line of its own
        reason = " ".join(str(exc).split())
        raise DataError(f"{path} is neither a directory nor a readable tar archive ({reason})") from None


def decode_images(
    path: str | Path,
    items: list[tuple[str, int]],
    size: int = 0,
    skip_corrupt: bool = False,
    skip_hint: str = "set data.skip_corrupt=true",
) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    """Decode ``items`` ((member name, label) pairs of a directory or archive) to uint8 (N, size, size, 3).

    Returns images, labels, the number of corrupt files skipped, and the names of the images kept. ``skip_hint``:
    how the caller's user skips corrupt files, named in the error (``directpred embed``: its ``--skip-corrupt``).
    """
    path = Path(path)
    return _decode_split(path, items, size, skip_corrupt, _read_blobs(path, [n for n, _ in items]), skip_hint)


def _cache_key(path: Path, size: int, skip_corrupt: bool) -> str:
    """The decoded cache's key: the source's path, size setting and contents. For a folder every file's relative
    path, size and mtime (a folder's own mtime misses edits inside class folders, and a move or rename keeps a
    file's size and mtime but changes its label or split); for an archive its size and mtime."""
    # os.fsencode: a file name that is not valid UTF-8 (a Latin-1 "café.jpg") is held as surrogates, which
    # str.encode() refused (UnicodeEncodeError before any image was read).
    h = hashlib.sha1(f"{_CACHE_VERSION}|".encode() + os.fsencode(path.resolve()) + f"|{size}|{skip_corrupt}".encode())
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(b"|" + os.fsencode(f.relative_to(path).as_posix()) + f":{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        st = path.stat()
        h.update(f"|{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_folder(
    path: str | Path, *, cache_dir: str | Path, image_size: int = 0, skip_corrupt: bool = False
) -> tuple[ImageArrays, ImageArrays]:
    """Decode (once, then from the cache) the ``train`` and ``test`` splits of a folder or archive
    (:func:`load_folder_splits` without the optional ``unlabeled`` split)."""
    splits = load_folder_splits(path, cache_dir=cache_dir, image_size=image_size, skip_corrupt=skip_corrupt)
    return splits["train"], splits["test"]


def load_folder_splits(
    path: str | Path, *, cache_dir: str | Path, image_size: int = 0, skip_corrupt: bool = False
) -> dict[str, ImageArrays]:
    """Decode (once, then from the cache) the splits of a folder or archive: ``train`` and ``test`` (class
    folders), and ``unlabeled`` when the source has an ``unlabeled/`` folder (images at any depth, label -1: STL-10's
    unlabelled images, for pre-training).

    The cache is a folder ``cache_dir/arrays/<name>-<key>/`` (a ``.npy`` of images and one of labels per split and
    a ``meta.json``), its files fsynced before one rename publishes it. A cache folder that cannot be read (a file
    missing, cut short or malformed) is rebuilt from the source, with a warning naming it.

    Raises:
        DataError: missing layout, empty class folders, mismatched classes, corrupt images (listing up to five
            and the count), or images of different sizes without ``image_size``; or a cache that cannot be read
            nor rebuilt (naming the folder to delete).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data.path {str(path)!r} does not exist")
    cache = Path(cache_dir).expanduser() / "arrays" / f"{path.name}-{_cache_key(path, image_size, skip_corrupt)}"
    if cache.exists():
        try:
            return _read_cache(cache)
        except _CacheUnreadable as exc:
            warnings.warn(
                f"the decoded-data cache {cache} cannot be read ({exc}); rebuilding it from {path}", stacklevel=2
            )
            damaged: str | None = str(exc)
    else:
        damaged = None
    try:
        _build_cache(path, cache, image_size, skip_corrupt, replace_damaged=damaged is not None)
        return _read_cache(cache)
    except (OSError, _CacheUnreadable) as exc:
        if damaged is None and isinstance(exc, OSError):
            root = Path(cache_dir).expanduser()
            denied = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            if denied and exc.filename and Path(os.fsdecode(exc.filename)).is_relative_to(root):
                # a cache folder that cannot be made (data.cache_dir=/sys/cache): the message said to resume
                raise DataError(
                    f"data.cache_dir={root}: cannot write the decoded-data cache there ({exc.strerror or exc}: "
                    f"{exc.filename}); set data.cache_dir to a writable folder (default ~/.cache/directpred)"
                ) from None
            raise  # no cache before: a failure to write the first one is the disk's (the CLI says so)
        if isinstance(exc, OSError):
            reason = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        else:
            reason = str(exc)
        what = (
            f"cannot be read ({damaged}), and rebuilding it failed ({reason})"
            if damaged
            else f"cannot be read ({reason})"
        )
        raise DataError(
            f"the decoded-data cache {cache} {what}; delete that folder (`rm -r {cache}`), free disk space or fix "
            "permissions there if need be, and run the command again"
        ) from None


class _CacheUnreadable(Exception):
    """A decoded-data cache folder that cannot be read: a file missing, cut short or not what it should be."""


def _read_cache(cache: Path) -> dict[str, ImageArrays]:
    """The splits stored in the decoded-data cache folder ``cache``, memory-mapped.

    Raises:
        _CacheUnreadable: a file of it is missing, cut short or malformed (the message names which and why).
    """
    try:
        saved = json.loads((cache / "meta.json").read_text())
        splits, classes = saved["skipped"], saved["classes"]
        if not isinstance(splits, dict) or not splits or not isinstance(classes, list):
            raise ValueError("meta.json lacks its splits or classes")
    except FileNotFoundError:
        raise _CacheUnreadable("no meta.json") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError: ValueErrors
        raise _CacheUnreadable(f"meta.json: {' '.join(str(exc).split())}") from None
    out: dict[str, ImageArrays] = {}
    for split in splits:
        name = f"{split}_images.npy"
        try:
            # Memory-mapped copy-on-write: pages are read when a batch touches them; the file is never written.
            images = np.load(cache / name, mmap_mode="c")
            name = f"{split}_labels.npy"
            labels = np.load(cache / name)
        except FileNotFoundError:
            raise _CacheUnreadable(f"no {name}") from None
        except (OSError, ValueError, EOFError) as exc:  # cut short: "mmap length is greater than file size"
            raise _CacheUnreadable(f"{name}: {' '.join(str(exc).split())}") from None
        if images.dtype != np.uint8 or images.ndim != 4 or labels.ndim != 1 or len(labels) != len(images):
            raise _CacheUnreadable(
                f"{split}_images.npy and {split}_labels.npy hold {images.dtype} {images.shape} and {labels.dtype} "
                f"{labels.shape}, not N uint8 images and their N labels"
            )
        try:
            skipped = int(splits[split])
        except (TypeError, ValueError):
            raise _CacheUnreadable(f"meta.json: the skipped count of {split} is {splits[split]!r}") from None
        out[split] = ImageArrays(torch.from_numpy(images), torch.from_numpy(labels), list(classes), skipped)
    if "train" not in out or "test" not in out:
        raise _CacheUnreadable(f"meta.json names the splits {sorted(out)}, not train and test")
    return out


def _write_synced(file: Path, content: np.ndarray | bytes) -> None:
    """Write ``content`` (an array, as ``.npy``, or bytes) to ``file`` and fsync it, so that the rename publishing
    it later never publishes data still in the page cache (lost, or cut short, in a crash)."""
    with open(file, "wb") as f:
        if isinstance(content, np.ndarray):
            np.save(f, content)
        else:
            f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _build_cache(path: Path, cache: Path, image_size: int, skip_corrupt: bool, *, replace_damaged: bool) -> None:
    """Decode the splits of ``path`` into a temporary folder beside ``cache``, fsync its files, and publish it as
    ``cache`` by one rename; ``replace_damaged``: ``cache`` exists and cannot be read, and is moved aside first.
    Another process that published ``cache`` first wins (its copy is the same)."""
    splits = _list_source(path)
    classes = [c for c, _ in splits["__classes__"]]
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        skipped_per_split: dict[str, int] = {}
        meta = {"source": str(path.resolve()), "classes": classes, "skipped": skipped_per_split}
        for split in [s for s in ("train", "test", "unlabeled") if s in splits]:
            items = splits[split]
            blobs = _read_blobs(path, [n for n, _ in items])
            images, labels, skipped, _ = _decode_split(path, items, image_size, skip_corrupt, blobs)
            _write_synced(tmp / f"{split}_images.npy", images)
            _write_synced(tmp / f"{split}_labels.npy", labels)
            skipped_per_split[split] = skipped
        _write_synced(tmp / "meta.json", json.dumps(meta).encode())
        fsync_dir(tmp)
        if replace_damaged:
            try:
                _read_cache(cache)
                return  # another process rebuilt it meanwhile: moving its copy aside would pull it from under it
            except _CacheUnreadable:
                pass
            aside = cache.with_name(cache.name + f".damaged{os.getpid()}")
            try:
                os.replace(cache, aside)
            except FileNotFoundError:  # another process moved it aside first
                pass
            if aside.is_dir() and not aside.is_symlink():
                shutil.rmtree(aside)
            elif aside.exists() or aside.is_symlink():  # a file where the folder should be
                aside.unlink()
        try:
            os.replace(tmp, cache)
        except OSError:  # another process finished first: its cache is read, and must be readable
            if not (cache / "meta.json").is_file():
                raise
        fsync_dir(cache.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# torchvision datasets


def _torchvision_dataset(name: str, root: str, split: str, download: bool) -> Any:  # a torchvision VisionDataset
    import torchvision

    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        return cls(root, train=split == "train", download=download)
    return torchvision.datasets.STL10(root, split=split, download=download)


def _offline_message(name: str, root: str, local_copy: str | None) -> str:
    copy = f"no local copy at data.local_copy={local_copy!r} and " if local_copy else ""
    return (
        f"{_TORCHVISION_NAMES[name]} is not available: {copy}no torchvision copy under data.root={root!r}. "
        f"Connect to the internet and set data.download=true, or give a local copy with --set "
        f"data.path=PATH (an ImageFolder directory or .tar/.tar.gz with train/<class>/ and test/<class>/, "
        f"e.g. cifar10-jpeg.tar.gz)"
    )


def _torchvision_split(name: str, root: str, split: str, download: bool, local_copy: str | None = None) -> ImageArrays:
    """One split of a torchvision dataset: the copy under ``root`` if it is complete, else (with ``download``)
    downloaded there.

    Raises:
        DownloadError: the download failed for a network reason (the message says so and how to avoid it).
        DataError: the dataset is missing and ``download`` is off, the downloaded file is corrupt, or the disk is
            full or ``root`` is not writable (a disk problem, told apart from the network by its message).
    """
    root = str(Path(root).expanduser())
    try:
        ds = _torchvision_dataset(name, root, split, download=False)
    except RuntimeError:  # not there (torchvision: "Dataset not found or corrupted")
        if not download:
            raise DataError(_offline_message(name, root, local_copy)) from None
        try:
            ds = _torchvision_dataset(name, root, split, download=True)
        except _NETWORK_ERRORS as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DownloadError(
                f"cannot download {_TORCHVISION_NAMES[name]} ({type(exc).__name__}: {reason}); no network? "
                f"Connect to the internet and retry, or give a local copy with --set data.path=PATH (an ImageFolder "
                f"directory or .tar/.tar.gz with train/<class>/ and test/<class>/, e.g. cifar10-jpeg.tar.gz)"
            ) from None
        except RuntimeError as exc:  # the md5 of the downloaded archive does not match
            raise DataError(
                f"{_TORCHVISION_NAMES[name]} under {root} is corrupt after downloading ({exc}); delete "
                f"{root} and retry, or give a local copy with --set data.path=PATH"
            ) from None
        except OSError as exc:  # after _NETWORK_ERRORS (also OSErrors): a full disk or an unwritable data.root
            # Said here, where the folder is known: the command line's generic OSError advice (the last checkpoint
            # is intact, resume) does not fit a run that has not started.
            raise DataError(
                f"cannot store {_TORCHVISION_NAMES[name]} under data.root={root!r} while downloading: "
                f"{exc.strerror or exc} ({exc.filename or root}); free disk space or make data.root writable (or "
                f"set it elsewhere), or give a local copy with --set data.path=PATH"
            ) from None
    if name in ("cifar10", "cifar100"):
        return ImageArrays(torch.from_numpy(ds.data), torch.as_tensor(ds.targets), list(ds.classes))
    images = torch.from_numpy(ds.data).permute(0, 2, 3, 1).contiguous()  # (N, 3, 96, 96) -> (N, 96, 96, 3)
    return ImageArrays(images, torch.as_tensor(ds.labels).long(), list(ds.classes))


def require_two_classes(labels: torch.Tensor | np.ndarray, classes: list[str], where: str, fix: str) -> None:
    """:class:`DataError` when the labelled images (label >= 0) of a split, ``where`` (e.g. ``data/train/``), span
    fewer than two classes: kNN and the linear probe would report a meaningless 100 %. ``fix``: what to add where.

    Examples:
        >>> require_two_classes(np.array([0, 0, -1]), ["cat"], "d/train/", "add a folder of another class")
        Traceback (most recent call last):
        ...
        directpred.data.datasets.DataError: d/train/ holds one class (cat): accuracies against labels need ... two; ...
    """
    present = sorted({int(y) for y in np.unique(np.asarray(labels)) if y >= 0})
    if len(present) >= 2:
        return
    what = f"one class ({classes[present[0]] if present[0] < len(classes) else present[0]})" if present else "no class"
    raise DataError(f"{where} holds {what}: accuracies against labels need at least two; {fix}")


def resolve_source(cfg: DataConfig) -> tuple[str, str | None]:
    """Where :func:`load_data` reads ``cfg`` from: ``("folder", path)`` for an ImageFolder directory or archive,
    ``("torchvision", None)`` for torchvision's copy under ``data.root`` (downloaded with ``data.download``).

    ``data.path`` always wins (it must exist); for cifar10/cifar100/stl10, ``data.local_copy`` is used when it
    exists; otherwise torchvision.
    """
    if cfg.dataset == "folder" or cfg.path:
        if not cfg.path or not path_exists(cfg.path):
            raise DataError(
                f"data.path {cfg.path!r} does not exist; point it at an ImageFolder directory or a "
                ".tar/.tar.gz archive with train/<class>/ and test/<class>/"
            )
        return "folder", cfg.path
    if cfg.local_copy and path_exists(cfg.local_copy):
        return "folder", cfg.local_copy
    return "torchvision", None


def load_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Build the :class:`DataBundle` of a :class:`directpred.config.DataConfig` (source: :func:`resolve_source`).

    Raises:
        DownloadError: a needed download failed for a network reason.
        DataError: the data is missing, corrupt or mis-arranged, or a labelled split holds fewer than two classes
            (the message names the files and the fix).
    """
    _, path = resolve_source(cfg)
    if path is not None:  # ("folder", path)
        splits = load_folder_splits(
            path, cache_dir=cfg.cache_dir, image_size=cfg.image_size, skip_corrupt=cfg.skip_corrupt
        )
        train, test = splits["train"], splits["test"]
        for part, arrays in (("train", train), ("test", test)):
            require_two_classes(
                arrays.labels,
                arrays.classes,
                f"{path}: {part}/",
                "add a folder of images of another class to train/ and test/ (`directpred embed` takes a folder of "
                "any classes, or none)",
            )
        pretrain = train
        if "unlabeled" in splits:  # pre-training on train + unlabeled, as torchvision's STL-10 "train+unlabeled"
            u = splits["unlabeled"]
            if u.images.shape[1:] != train.images.shape[1:]:
                raise DataError(
                    f"{path}: unlabeled/ images are {tuple(u.images.shape[1:3])}, train/ images "
                    f"{tuple(train.images.shape[1:3])}; set data.image_size to decode both to one size"
                )
            pretrain = ImageArrays(
                torch.cat([train.images, u.images]),
                torch.cat([train.labels, u.labels]),
                train.classes,
                train.skipped + u.skipped,
            )
        name = Path(path).name if cfg.dataset == "folder" else cfg.dataset
        if cfg.dataset == "stl10" and "unlabeled" not in splits:
            warnings.warn(
                f"data.dataset=stl10 read from the folder {path}: it has no unlabeled/ folder, so pre-training uses "
                f"its train/ images only ({len(train)}), not STL-10's train+unlabeled (105,000); add the unlabelled "
                "images under unlabeled/ (any layout), or use torchvision's copy (unset data.path and "
                "data.local_copy, set data.root)",
                stacklevel=2,
            )
    elif cfg.dataset in ("cifar10", "cifar100"):
        train = _torchvision_split(cfg.dataset, cfg.root, "train", cfg.download, cfg.local_copy)
        test = _torchvision_split(cfg.dataset, cfg.root, "test", cfg.download, cfg.local_copy)
        pretrain, name = train, cfg.dataset
    elif cfg.dataset == "stl10":
        pretrain = _torchvision_split("stl10", cfg.root, "train+unlabeled", cfg.download, cfg.local_copy)
        train = _torchvision_split("stl10", cfg.root, "train", cfg.download, cfg.local_copy)
        test = _torchvision_split("stl10", cfg.root, "test", cfg.download, cfg.local_copy)
        name = "stl10"
    else:
        raise DataError(f"unknown data.dataset {cfg.dataset!r}")
    for key, n, split in (("train_subset", cfg.train_subset, pretrain), ("test_subset", cfg.test_subset, test)):
        if n > len(split):  # balanced_subset keeps them all: say so rather than seem to have taken n
            warnings.warn(
                f"data.{key}={n} is more than the {len(split)} images there: all {len(split)} are used",
                stacklevel=2,
            )
    if cfg.train_subset:
        unlabelled = bool((pretrain.labels < 0).any())  # STL-10's train+unlabeled: the probe keeps all of train
        pretrain = pretrain.subset(balanced_subset(pretrain.labels, cfg.train_subset, seed))
        if not unlabelled:
            classes = int(torch.unique(train.labels).numel())
            if classes > int(torch.unique(pretrain.labels).numel()):  # a balanced subset misses one only if n < C
                raise DataError(
                    f"data.train_subset={cfg.train_subset} is fewer images than the {classes} classes: the kNN bank "
                    "and the linear probe would have no training image of some classes and could never predict "
                    f"them; set data.train_subset to at least {classes} (0: all images)"
                )
            train = pretrain
    if cfg.test_subset:
        classes = int(torch.unique(test.labels).numel())
        test = test.subset(balanced_subset(test.labels, cfg.test_subset, seed))
        if classes > int(torch.unique(test.labels).numel()):  # a one-class test split scored a meaningless 100 %
            raise DataError(
                f"data.test_subset={cfg.test_subset} is fewer images than the {classes} classes of the test split: "
                f"some classes would not be tested at all (one image scores 0 or 100 %); set data.test_subset to "
                f"at least {classes} (0: all images)"
            )
    return DataBundle(pretrain, train, test, name)


def load_data_shared(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """:func:`load_data` in every process of a torchrun group, process 0 first: it decodes and caches the images, the
    others then read its cache (N processes decoding at once did the work N times), and all stop with process 0's
    reason if it fails. In a single process: :func:`load_data`."""
    loaded = distributed.on_main(lambda: load_data(cfg, seed=seed), "load the data", DataError)
    return loaded if loaded is not None else load_data(cfg, seed=seed)
