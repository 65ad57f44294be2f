"""Images read and decoded lazily, for data sets too large to hold in memory (ImageNet).

Two on-disk layouts give the same images under the same indices:

* an ImageFolder tree ``<root>/{train,val,test}/<class>/<image>`` (ImageNet's usual layout; ``val`` and ``test``
  are both accepted for the held-out split), listed in sorted (class, file name) order;
* tar shards in the WebDataset layout, ``<root>/{train,val,test}-NNNNNN.tar`` holding ``KEY.jpg`` (or ``.png``, ...)
  + ``KEY.cls`` (the class index as text) pairs, and ``<root>/classes.txt`` (one class name a line), written by
  :func:`write_shards` (``directpred shards``) from a folder in the folder's order.

What a DataLoader worker does (the decision this module documents): it reads a whole batch's files, decodes each
(Pillow, any format and mode: grayscale, CMYK, PNG), resizes the shorter side to ``decode_size`` (bicubic) and
centre-crops it to a ``decode_size`` square: exactly :func:`directpred.data.datasets._decode`, so the stream yields
the very pixels the in-memory path holds at the same size. The random resized crop and every other augmentation
stay on the training device with per-sample parameters from the step's generator (``directpred.data.augment``), so
data order and augmentation draws are pure functions of ``(seed, epoch, step)`` whatever the number of workers,
processes or resumes. (The one difference from BYOL's recipe: crops are drawn from the centre square of the
resized image, not from the whole non-square image; with ``decode_size = image_size * 8/7`` the crop still sees
the margin a 224 crop of a 256 image has.)

A process reads only its rows of each global batch (rank r of w takes rows ``r*B .. r*B+B`` of the epoch's
permutation, :func:`directpred.data.order.epoch_order`), a resumed run starts at a step, and a corrupt image is
named in a :class:`~directpred.data.datasets.DataError` or, with ``skip_corrupt``, replaced inside the worker by
the next decodable image of the data set (deterministically, so batch shapes and every other sample hold). Memory
is flat in the data set's size: the index holds one fixed-width byte string and one label per image, shared
copy-on-write with forked workers (numpy arrays, not Python lists whose reference counts would copy the pages).

Over 300 lines: the index, the two readers (folder, tar shards), the worker dataset and the batch sources share
the one sample order that makes a streamed run equal an in-memory one.
"""

from __future__ import annotations

import functools
import io
import os
import re
import signal
import tarfile
import threading
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from directpred.config import DataConfig
from directpred.data.datasets import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageArrays,
    _decode,
    decode_failure,
    require_two_classes,
)

# The held-out split: val/ (ImageNet's labelled validation set) first, test/ when there is no val/ (CIFAR-style
# layouts); a folder without class folders (ImageNet's unlabelled test images) is passed over.
SPLIT_NAMES = {"train": ("train",), "test": ("val", "test"), "val": ("val", "test")}
_SHARD = re.compile(r"^(train|val|test)-(\d{6,})\.tar$")


# ----------------------------------------------------------------------------------------------------------------
# The batch-source protocol: what the training loop consumes


class BatchSource(Protocol):
    """This process's uint8 batches (B, 3, H, W) of an epoch, starting at a step (mid-epoch resume).

    ``labelled_batches`` yields the same batches with their labels (B,) (int64, on the CPU; -1 for unlabelled
    images): the same order and the same images, so which of the two a run reads changes nothing in its training.
    """

    steps_per_epoch: int
    skipped: list[str]  # names of the corrupt files replaced so far (data.skip_corrupt)

    def batches(self, epoch: int, start_step: int = 0) -> Generator[torch.Tensor, None, None]:
        """The images of :meth:`labelled_batches` (sources subclass this protocol and inherit it)."""
        for images, _ in self.labelled_batches(epoch, start_step):
            yield images

    def labelled_batches(
        self, epoch: int, start_step: int = 0
    ) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]: ...


def shard_rows(order: torch.Tensor, step: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """The indices rank ``rank`` of ``world`` processes reads at ``step`` of an epoch with permutation ``order``:
    rows ``rank*B .. rank*B+B`` of the step's global batch of ``B*world`` rows."""
    start = step * batch_size * world + rank * batch_size
    return order[start : start + batch_size]


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    from directpred.data.order import epoch_order

    return epoch_order(n, seed, epoch)


class InMemorySource(BatchSource):
    """Batches gathered from decoded images in memory (N, H, W, 3): today's path behind :class:`BatchSource`.

    ``labels`` (N,) are the images' labels (default: all -1, unlabelled)."""

    def __init__(
        self,
        images: torch.Tensor,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        labels: torch.Tensor | None = None,
    ) -> None:
        self.images, self.batch_size, self.seed, self.rank, self.world = images, batch_size, seed, rank, world
        self.labels = labels.cpu() if labels is not None else torch.full((len(images),), -1, dtype=torch.int64)
        self.steps_per_epoch = len(images) // (batch_size * world)
        self.skipped: list[str] = []

    def labelled_batches(
        self, epoch: int, start_step: int = 0
    ) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        order = _epoch_order(len(self.images), self.seed, epoch)
        for step in range(start_step, self.steps_per_epoch):
            idx = shard_rows(order, step, self.batch_size, self.rank, self.world)
            yield self.images[idx.to(self.images.device)].permute(0, 3, 1, 2), self.labels[idx]


# ----------------------------------------------------------------------------------------------------------------
# Readers: image index -> encoded bytes


class Reader(Protocol):
    """Random access to the encoded images of one split."""

    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int: ...

    def name(self, i: int) -> str: ...

    def read(self, i: int) -> bytes: ...


def _class_folders(split_dir: Path) -> list[str]:
    """The sorted names of the class folders in a split's folder (its images are not listed)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def _has_class_folders(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() for p in path.iterdir())


def _split_dir(root: Path, split: str, folders: tuple[str, ...] | None = None) -> Path:
    folders = folders or SPLIT_NAMES[split]
    for name in folders:
        if _has_class_folders(root / name):
            return root / name
    raise DataError(
        f"{root}: no {' or '.join(f'{n}/' for n in folders)} folder of class folders; a streamed data set "
        "is laid out as train/<class>/<image> and val/<class>/<image> (or test/), or as tar shards "
        "written by `directpred shards`"
    )


class FolderReader:
    """One split of an ImageFolder tree, listed in (class, path within the class folder) order, images in subfolders
    of a class folder included (as torchvision's ``ImageFolder`` and the in-memory path take them); files read on
    demand.

    Args:
        root: the tree (``train/<class>/...``, ``val/<class>/...`` or ``test/<class>/...``).
        split: ``train``, or ``val``/``test`` (the held-out split: ``val/``, else ``test/``).
        classes: the class list (a held-out split takes train's, so that labels agree); default: the split's folders.
        folders: the split's folder names to look for, first found taken (default: by ``split``, see above).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        classes: list[str] | None = None,
        folders: tuple[str, ...] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.dir = _split_dir(self.root, split, folders)
        found = _class_folders(self.dir)
        self.classes = classes if classes is not None else found
        if not self.classes:
            raise DataError(f"{self.dir}: no class folders")
        extra = sorted(set(found) - set(self.classes))
        if extra:  # its images would be left out of the evaluation without a word
            raise DataError(
                f"{self.dir}: {len(extra)} class folder(s) not in train/: {', '.join(extra[:5])}; both splits need the "
                "same class folders (remove them, or add them to train/)"
            )
        names: list[str] = []
        labels: list[int] = []
        for y, cls in enumerate(self.classes):
            cdir = self.dir / cls
            held_out = "add images of that class to it, or take the class out of train/ too"
            if not cdir.is_dir():
                raise DataError(f"{self.dir}: class folder {cls!r} (present in train/) is missing; {held_out}")
            files = sorted(
                os.path.relpath(os.path.join(where, f), cdir)
                for where, _, fs in os.walk(cdir, followlinks=True)
                for f in fs
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not files:
                fix = held_out if classes is not None else "remove it or add images"
                raise DataError(f"{cdir}: empty class folder; {fix} (an empty class would shift every label)")
            names += [f"{cls}/{f}" for f in files]
            labels += [y] * len(files)
        # One fixed-width byte array: shared copy-on-write by forked workers (no per-image Python objects). The
        # file system's bytes (os.fsencode), so that a name that is not UTF-8 reads back as the same file.
        self.names = np.array([os.fsencode(n) for n in names])
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return str(self.dir / os.fsdecode(self.names[i]))

    def read(self, i: int) -> bytes:
        return (self.dir / os.fsdecode(self.names[i])).read_bytes()


class ShardReader:
    """One split of WebDataset-layout tar shards, read by random access (an index of member offsets).

    The index (shard number, data offset, size, label per image) is built once from the tar headers (no image data
    is read) and kept as numpy arrays; reading an image is one ``pread``.
    """

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root = Path(root).expanduser()
        names = SPLIT_NAMES[split]
        shards: list[Path] = []
        for n in names:
            shards = sorted(p for p in self.root.iterdir() if (m := _SHARD.match(p.name)) and m.group(1) == n)
            if shards:
                break
        if not shards:
            raise DataError(
                f"{self.root}: no {names[0]}-NNNNNN.tar shards; write them with `directpred shards "
                f"FOLDER --out {self.root}`"
            )
        classes_file = self.root / "classes.txt"
        if not classes_file.is_file():
            raise DataError(
                f"{classes_file} is missing: the class names of the shards, one a line (written by `directpred shards`)"
            )
        # one name a line; a last line without its newline (a hand-written file) is a class too
        self.classes = [c for c in classes_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines() if c]
        if not self.classes:
            raise DataError(f"{classes_file} lists no class; write the shards again with `directpred shards`")
        self.shards = shards
        shard_ix, offsets, sizes, labels, keys = [], [], [], [], []
        for s, path in enumerate(shards):
            images: dict[str, tuple[int, int, str]] = {}
            cls: dict[str, int] = {}
            try:
                with tarfile.open(path, "r:") as tf:
                    for member in tf:
                        if not member.isfile():
                            continue
                        key, _, ext = member.name.rpartition(".")
                        if ext == "cls":
                            f = tf.extractfile(member)
                            cls[key] = int(f.read().decode().strip()) if f is not None else -1
                        elif ("." + ext.lower()) in IMAGE_EXTENSIONS:
                            images[key] = (member.offset_data, member.size, member.name)
                    end = tf.offset
                # tarfile ends its listing without an error where a cut-off file ends inside a header: a shard is
                # complete only with the two zero blocks that close a tar archive after its last member
                with open(path, "rb") as f:
                    f.seek(end)
                    if f.read(1024) != bytes(1024):
                        found = len(images)
                        raise ValueError(f"no end-of-archive blocks after byte {end}; cut off after {found} image(s)")
            except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
                raise DataError(
                    f"{path}: the shard is corrupt or truncated ({exc}); rewrite it with `directpred shards`"
                ) from None
            for key in sorted(images, key=_key_order):
                if key not in cls:
                    raise DataError(f"{path}: {images[key][2]} has no {key}.cls member (its class)")
                if not 0 <= cls[key] < len(self.classes):
                    raise DataError(
                        f"{path}: {key}.cls holds class {cls[key]}, but {classes_file.name} lists "
                        f"{len(self.classes)} classes (0..{len(self.classes) - 1}); write the shards again with "
                        "`directpred shards`"
                    )
                off, size, _ = images[key]
                shard_ix.append(s)
                offsets.append(off)
                sizes.append(size)
                labels.append(cls[key])
                keys.append(f"{path.name}:{images[key][2]}".encode())
        self.shard_ix = np.asarray(shard_ix, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = np.array(keys)
        self._fds: dict[int, int] = {}  # open shard descriptors of this process, oldest first
        self._pid = os.getpid()
        self.max_open = 64

    def __len__(self) -> int:
        return len(self.offsets)

    def name(self, i: int) -> str:
        return str(self.root / self.keys[i].decode())

    def read(self, i: int) -> bytes:
        if os.getpid() != self._pid:  # a forked worker: descriptors are per process
            self._fds, self._pid = {}, os.getpid()
        s = int(self.shard_ix[i])
        fd = self._fds.get(s)
        if fd is None:
            while len(self._fds) >= self.max_open:  # stay far below the open-file limit (ImageNet: 1,282 shards)
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[s] = os.open(self.shards[s], os.O_RDONLY)
        return os.pread(fd, int(self.sizes[i]), int(self.offsets[i]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}


def _key_order(key: str) -> tuple[int, int, str]:
    """Members in numeric order of their keys (``write_shards``' image indices: 999999 before 1000000), other keys
    after them in string order."""
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def is_shard_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory of tar shards (``train-NNNNNN.tar`` ...) rather than an ImageFolder tree."""
    path = Path(path).expanduser()
    return path.is_dir() and any(_SHARD.match(p.name) for p in path.iterdir())


def open_reader(path: str | Path, split: str) -> Reader:
    """A :class:`FolderReader` or :class:`ShardReader` for ``split`` (``train``, ``test``/``val``) of ``path``;
    held-out splits of a folder get the train split's class list (so labels agree)."""
    if is_shard_dir(path):
        return ShardReader(path, split)
    if split == "train":
        return FolderReader(path, "train")
    return FolderReader(path, split, classes=train_classes(path))


def train_classes(path: str | Path) -> list[str]:
    """The class names of an ImageFolder tree: the sorted folder names of its ``train/`` (without listing their
    images: ImageNet's train/ holds 1.28M files)."""
    return _class_folders(_split_dir(Path(path).expanduser(), "train"))


def write_shards(
    folder: str | Path, out: str | Path, *, shard_size: int = 1000, splits: tuple[str, ...] = ("train", "val")
) -> dict[str, int]:
    """Write the splits of an ImageFolder tree as WebDataset tar shards in the folder's order.

    Member ``KEY.<ext>`` holds the file's bytes unchanged (``.jpeg`` written ``.jpg``), ``KEY.cls`` its class index;
    ``KEY`` is the image's index in the split (6 digits or more). ``classes.txt`` lists the class names. A split
    whose folder is missing is skipped (``val`` falls back to ``test``, and is written under the name found; ``test``
    is ``test/`` only); a held-out folder that is there but unusable (an empty class folder, a class train/ lacks)
    raises :class:`DataError`, as ``train`` does, rather than leaving the split unwritten.
    Returns the number of images written per split. Shards are written under temporary names and renamed, so an
    interrupted run leaves no half shard under a final name. Shards of a written split numbered past the last one
    written (left in ``out`` by an earlier write with a smaller ``shard_size`` or a larger folder) are removed: a
    reader takes every ``SPLIT-NNNNNN.tar`` there, and would read their images twice or foreign ones. For the same
    reason ``val`` shards are removed (with a warning) when ``test`` shards are written from a folder without ``val/``:
    the reader takes ``val`` shards first.
    """
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    classes = train_classes(folder)
    counts: dict[str, int] = {}
    for split in splits:
        folders = ("test",) if split == "test" else SPLIT_NAMES[split]
        if split != "train" and not any(_has_class_folders(folder / f) for f in folders):
            continue  # no such split (ImageNet's test/ holds unlabelled images, no class folders: passed over)
        reader = FolderReader(folder, split, classes=classes, folders=folders)
        name = reader.dir.name
        if name in counts:  # val and test both asked for, one folder found
            continue
        for s, start in enumerate(range(0, len(reader), shard_size)):
            final = out / f"{name}-{s:06d}.tar"
            tmp = final.with_name(final.name + ".tmp")
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
                for i in range(start, min(start + shard_size, len(reader))):
                    ext = os.fsdecode(reader.names[i]).rsplit(".", 1)[-1].lower()
                    ext = "jpg" if ext == "jpeg" else ext
                    for member, data in (
                        (f"{i:06d}.{ext}", reader.read(i)),
                        (f"{i:06d}.cls", str(int(reader.labels[i])).encode()),
                    ):
                        info = tarfile.TarInfo(member)
                        info.size, info.mode, info.mtime = len(data), 0o644, 0
                        tf.addfile(info, io.BytesIO(data))
            os.replace(tmp, final)
        n_shards = -(-len(reader) // shard_size)
        # val shards in `out` when the folder has no val/ are an earlier write's: the reader would take them for
        # the held-out split in place of the test shards written now
        shadowing = name == "test" and not _has_class_folders(folder / "val")
        stale = []
        for p in out.iterdir():
            m = _SHARD.match(p.name)
            if m and m.group(1) == name and int(m.group(2)) >= n_shards:
                p.unlink()
            elif m and shadowing and m.group(1) == "val":
                stale.append(p.name)
                p.unlink()
        if stale:
            warnings.warn(
                f"{out}: removed {len(stale)} val shard(s) of an earlier write ({', '.join(stale[:3])}); {folder} has "
                "no val/, and the reader would have taken them for the held-out split instead of the test shards",
                stacklevel=2,
            )
        counts[name] = len(reader)
    # surrogateescape: a class folder named in another encoding than UTF-8 (held as surrogates) is written back as
    # its bytes, and read so (write_text raised UnicodeEncodeError)
    (out / "classes.txt").write_text("".join(c + "\n" for c in classes), encoding="utf-8", errors="surrogateescape")
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Decoding in workers


def crop_offset(size: int, crop: int) -> int:
    """Where the centre ``crop`` square of a ``size`` square starts (rows and columns): the one convention of the
    test-time centre crop, here and in :func:`directpred.export.read_image_folder`."""
    return (size - crop) // 2


def decode_to_tensor(blob: bytes, size: int, crop: int = 0) -> torch.Tensor:
    """Decode (Pillow) and resize the shorter side to ``size`` + centre-crop a square of ``crop or size``: uint8
    (3, c, c). The same pixels as the in-memory path's decoding at ``size`` (``directpred.data.datasets``)."""
    a = _decode(blob, size)
    if a.ndim != 3 or a.shape[0] != size or a.shape[1] != size:
        raise ValueError(f"decoded to shape {a.shape}")
    t = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)
    if crop and crop != size:
        o = crop_offset(size, crop)
        t = t[:, o : o + crop, o : o + crop]
    return t.contiguous()


@dataclass
class _Batch:
    """What a worker returns: the batch (uint8 or the raw byte tensors for decoding on the GPU), its indices, and
    the files that could not be decoded (with what replaced them)."""

    images: torch.Tensor | list[torch.Tensor]
    index: torch.Tensor
    skipped: list[str] = field(default_factory=list)
    used: torch.Tensor | None = None  # the images actually decoded (a corrupt one replaced), for the labels

    def pin_memory(self) -> _Batch:  # called by DataLoader(pin_memory=True)
        images = self.images.pin_memory() if isinstance(self.images, torch.Tensor) else self.images
        return _Batch(images, self.index, self.skipped, self.used)


class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: ``ds[list of indices]`` -> :class:`_Batch`.

    Args:
        reader: a :class:`Reader`.
        size: the decoded side (shorter side resized to it, centre square kept).
        crop: >0: keep the centre ``crop`` square of that (the test transform: resize 256, centre crop 224).
        skip_corrupt: replace an undecodable image by the next decodable one (in data-set order, wrapping) and
            report it; otherwise raise :class:`DataError` naming the file.
        raw: return the files' bytes (uint8 tensors) undecoded, for :func:`decode_jpeg_cuda`.
    """

    def __init__(
        self, reader: Reader, size: int, *, crop: int = 0, skip_corrupt: bool = False, raw: bool = False
    ) -> None:
        self.reader, self.size, self.crop, self.skip_corrupt, self.raw = reader, size, crop, skip_corrupt, raw

    def __len__(self) -> int:
        return len(self.reader)

    def decode(self, i: int) -> torch.Tensor:
        return decode_to_tensor(self.reader.read(i), self.size, self.crop)

    def load(self, i: int, skipped: list[str], used: list[int] | None = None) -> torch.Tensor:
        """Image ``i`` decoded; a corrupt one named or replaced (see the class); the index of the image decoded is
        appended to ``used``."""
        n = len(self.reader)
        for k in range(n):
            j = (i + k) % n
            try:
                image = self.decode(j)
                if used is not None:
                    used.append(j)
                return image
            except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt file
                if not self.skip_corrupt:
                    raise DataError(
                        f"{self.reader.name(j)} cannot be decoded ({decode_failure(exc)}); "
                        "replace it by a good copy and resume (with --force if the run refuses the changed file; "
                        "removing it would change which image each index is), or resume with --set "
                        "data.skip_corrupt=true to replace it by the next image with a warning"
                    ) from None
                skipped.append(self.reader.name(j))
        raise DataError(f"{self.reader.name(i)}: no image of the data set can be decoded")

    def _read_raw(self, i: int) -> torch.Tensor:
        """File ``i``'s bytes as a uint8 tensor; empty when it cannot be read or is empty, which is not a JPEG, so
        :func:`decode_jpeg_cuda` hands it to the Pillow fallback, whose :meth:`load` names or replaces it."""
        try:
            blob = self.reader.read(i)
        except OSError:
            blob = b""
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)

    def __getitem__(self, index: list[int] | torch.Tensor) -> _Batch:
        idx = torch.as_tensor(index, dtype=torch.int64)
        skipped: list[str] = []
        if self.raw:
            return _Batch([self._read_raw(int(i)) for i in idx], idx)
        used: list[int] = []
        images = torch.stack([self.load(int(i), skipped, used) for i in idx])
        return _Batch(images, idx, sorted(set(skipped)), torch.as_tensor(used, dtype=torch.int64))


def _identity(x: _Batch) -> _Batch:
    return x


#: Seconds a DataLoader worker goes on serving batches after a SIGTERM or SIGINT before it exits (with exit code 0).
STOP_GRACE_SECONDS = 20.0


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker leaves stopping to the training process. A stop reaches the workers too: torchrun stops a
    rank, and a terminal's Ctrl-C a command, by signalling the whole process group; Slurm (``scancel``, a time
    limit, preemption) signals every process of the job step by its pid. A worker killed by that SIGTERM made the
    training process fail mid-step ("DataLoader worker ... is killed by signal") instead of stopping after the step
    with its checkpoint. So the worker leaves the process group, and on SIGTERM or SIGINT goes on serving for
    :data:`STOP_GRACE_SECONDS` (the step in progress may still wait for its batch) and then exits with code 0, which
    the training process does not take for a failure. The training process ends its workers itself once it stops;
    a worker whose training process died exits within 5 s (DataLoader's watchdog). The grace is bounded because
    Python's exit terminates (SIGTERM) and then joins the workers of a loader left open: ignoring the signal would
    hang that exit. Windows has no process groups of this kind (and no ``os.setpgid``): there the worker stays in
    its group."""
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)
    leaving: list[threading.Timer] = []

    def stop_later(signum: int, frame: object) -> None:
        if not leaving:
            leaving.append(threading.Timer(STOP_GRACE_SECONDS, os._exit, args=(0,)))
            leaving[0].daemon = True
            leaving[0].start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_later)


def _warn_replaced(skipped: list[str]) -> None:
    """The warning of a batch whose corrupt files were replaced under ``skip_corrupt``."""
    warnings.warn(
        f"replaced {len(skipped)} corrupt image(s) by the next decodable one (data.skip_corrupt): "
        f"{', '.join(skipped[:3])}",
        RuntimeWarning,
        stacklevel=3,
    )


#: The batched JPEG decoders :func:`decode_jpeg_cuda` can use, in the order ``auto`` tries them.
JPEG_BACKENDS = ("torchcodec", "torchvision")


def jpeg_backend(name: str = "auto") -> str:
    """The batched JPEG decoder to use: ``torchcodec`` (TorchCodec's ``decode_jpeg``, nvJPEG on CUDA: the successor
    of torchvision's image decoders, which torchvision 0.29 deprecates) when it imports, else ``torchvision``
    (``torchvision.io.decode_jpeg``). ``name`` forces one; a forced TorchCodec that cannot be imported is a
    :class:`DataError` naming the fix."""
    if name not in ("auto", *JPEG_BACKENDS):
        raise ValueError(f"unknown JPEG backend {name!r}; use auto, {' or '.join(JPEG_BACKENDS)}")
    if name == "torchvision":
        return name
    error = _torchcodec_import_error()
    if error is None:
        return "torchcodec"
    if name == "torchcodec":
        raise DataError(
            f"TorchCodec cannot be imported ({error}); install the release built for torch {torch.__version__} "
            "(see TorchCodec's compatibility table), or use the torchvision backend"
        )
    return "torchvision"


@functools.cache
def _torchcodec_import_error() -> str | None:
    """Why TorchCodec's ``decode_jpeg`` cannot be imported, or None (tried once per process). Releases before its
    image decoding (0.16) import but have no ``decode_jpeg``: those count as missing too."""
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a wheel built for another torch fails with OSError/RuntimeError
        if isinstance(exc, ImportError) and "decode_jpeg" in str(exc):
            return "this TorchCodec release has no decode_jpeg (added in 0.16)"
        return f"{type(exc).__name__}: {exc}"
    return None


def _decode_jpegs(blobs: list[torch.Tensor], device: torch.device | str, backend: str) -> list[torch.Tensor]:
    """RGB uint8 (3, H, W) tensors of encoded JPEGs, decoded in one call on ``device``; RuntimeError if any fails."""
    if backend == "torchcodec":
        from torchcodec.decoders import decode_jpeg as decode

        return list(decode(blobs, mode="RGB", device=device))
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # the deprecation of torchvision's decoders: TorchCodec is the fix, and used
        warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision.*")
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))


_EXIF_ORIENTATION = 0x0112


def _is_jpeg(blob: torch.Tensor) -> bool:
    return bool(len(blob) > 3 and blob[0] == 0xFF and blob[1] == 0xD8)


def _exif_rotated(blob: torch.Tensor) -> bool:
    """Whether a JPEG carries an EXIF orientation other than 1 (TorchCodec applies it; Pillow, and so torchvision's
    ImageFolder and the in-memory path, do not). An EXIF segment sits in the file's first 64 KiB; Pillow reads the
    tag from the header only."""
    if b"Exif\x00\x00" not in blob[:65536].numpy().tobytes():
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob.numpy().tobytes())) as im:
            return im.getexif().get(_EXIF_ORIENTATION, 1) != 1
    except Exception:  # noqa: BLE001 - Pillow's fallback will name the file
        return True


def decode_jpeg_cuda(
    blobs: list[torch.Tensor],
    size: int,
    device: torch.device | str,
    *,
    crop: int = 0,
    fallback: BatchDataset | None = None,
    index: torch.Tensor | None = None,
    used: list[int] | None = None,
    skipped: list[str] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode a batch of encoded images on the GPU (nvJPEG through TorchCodec's or torchvision's ``decode_jpeg``,
    see :func:`jpeg_backend`), resize the shorter side to ``size`` (bicubic, antialiased) and centre-crop: uint8
    (B, 3, c, c) on ``device``.

    Files nvJPEG refuses (PNG, CMYK, corrupt) and JPEGs with an EXIF rotation (which TorchCodec would apply and
    Pillow does not) are decoded on the CPU by ``fallback`` (at ``index``), which also applies the corrupt-file
    policy (the index of each image decoded is appended to ``used``, given ``index``; the names of the corrupt
    files it replaced under ``skip_corrupt`` to ``skipped``).
    GPU pixels differ from Pillow's by interpolation rounding (a few grey levels).
    """
    backend = jpeg_backend(backend)
    out: list[torch.Tensor | None] = [None] * len(blobs)
    # torchvision's decode_jpeg ignores EXIF orientation by default, like Pillow; TorchCodec's applies it
    jpeg = [k for k, b in enumerate(blobs) if _is_jpeg(b) and not (backend == "torchcodec" and _exif_rotated(b))]
    if jpeg:
        decoded: list[torch.Tensor | None]
        try:
            decoded = list(_decode_jpegs([blobs[k] for k in jpeg], device, backend))
        except RuntimeError:  # one bad file fails the batched call: decode one by one
            decoded = []
            for k in jpeg:
                try:
                    decoded.append(_decode_jpegs([blobs[k]], device, backend)[0])
                except RuntimeError:
                    decoded.append(None)
        for k, img in zip(jpeg, decoded):
            if img is None:
                continue
            h, w = img.shape[-2:]
            s = size / min(h, w)
            nh, nw = max(size, round(h * s)), max(size, round(w * s))
            x = torch.nn.functional.interpolate(
                img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
            )
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[..., top : top + size, left : left + size]
            if crop and crop != size:
                o = crop_offset(size, crop)
                x = x[..., o : o + crop, o : o + crop]
            out[k] = x.round().clamp(0, 255).to(torch.uint8)[0]
    skipped = skipped if skipped is not None else []
    images: list[torch.Tensor] = []
    for k, img in enumerate(out):
        if img is None:
            if fallback is None or index is None:
                raise DataError(f"image {k} of the batch cannot be decoded on the GPU and no CPU fallback is given")
            replaced: list[int] = []
            img = fallback.load(int(index[k]), skipped, replaced).to(device)
            if used is not None:
                used.append(replaced[0])
        elif used is not None and index is not None:
            used.append(int(index[k]))
        images.append(img)
    return torch.stack(images)


# ----------------------------------------------------------------------------------------------------------------
# The streaming batch source


class StreamSource(BatchSource):
    """This process's batches of a streamed split: implements :class:`BatchSource`.

    Args:
        reader: the split's :class:`Reader`.
        size: the decoded side (``data.decode_size``).
        batch_size: per process; the global batch is ``batch_size * world``.
        seed: the data-order seed (``train.seed``).
        rank, world: this process and the number of processes.
        workers: DataLoader worker processes (0: decode in this process).
        skip_corrupt: see :class:`BatchDataset`.
        decode_device: workers only read bytes and the training process decodes the JPEGs in batches on this
            device (``cuda``: nvJPEG; the trainer sets it under ``data.decode: cuda``; ``cpu`` runs the same path
            with libjpeg-turbo, which is how the tests exercise it without a GPU). None: workers decode (Pillow).
        jpeg_decoder: the batched path's decoder (:func:`jpeg_backend`: ``auto``, ``torchcodec``, ``torchvision``).
        prefetch: batches each worker prepares ahead.
        pin_memory: put the workers' decoded batches in pinned memory (training on CUDA with ``decode_device``
            None: faster, asynchronous copies to the GPU).

    Attributes:
        skipped: names of the corrupt files replaced so far (``skip_corrupt``), in the order met.
        jpeg_decoder: the batched path's resolved decoder (``torchcodec`` or ``torchvision``); None when the
            workers decode.
    """

    def __init__(
        self,
        reader: Reader,
        size: int,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        skip_corrupt: bool = False,
        decode_device: torch.device | str | None = None,
        prefetch: int = 2,
        jpeg_decoder: str = "auto",
        pin_memory: bool = False,
    ) -> None:
        self.reader, self.size, self.batch_size, self.seed = reader, size, batch_size, seed
        self.pin_memory = pin_memory
        self.rank, self.world, self.workers, self.prefetch = rank, world, workers, prefetch
        self.decode_device = torch.device(decode_device) if decode_device is not None else None
        raw = self.decode_device is not None  # workers read bytes; decode_jpeg_cuda decodes them on the device
        self.jpeg_decoder = jpeg_backend(jpeg_decoder) if raw else None
        self.dataset = BatchDataset(reader, size, skip_corrupt=skip_corrupt, raw=raw)
        self._cpu = BatchDataset(reader, size, skip_corrupt=skip_corrupt)  # the batched path's Pillow fallback
        self.steps_per_epoch = len(reader) // (batch_size * world)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.reader)

    def index_batches(self, epoch: int, start_step: int = 0) -> list[torch.Tensor]:
        """The indices this process reads at each step of ``epoch`` from ``start_step`` on."""
        order = _epoch_order(len(self.reader), self.seed, epoch)
        return [
            shard_rows(order, s, self.batch_size, self.rank, self.world)
            for s in range(start_step, self.steps_per_epoch)
        ]

    def labelled_batches(
        self, epoch: int, start_step: int = 0
    ) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        plan = [b.tolist() for b in self.index_batches(epoch, start_step)]
        yield from self._stream(plan)

    def _stream(self, plan: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not plan:
            return
        loader = torch.utils.data.DataLoader(
            # batch_size=None: collate_fn gets each item (a whole _Batch), not the list torch's hint assumes
            self.dataset,
            batch_size=None,
            sampler=plan,
            num_workers=self.workers,
            collate_fn=_identity,  # type: ignore[arg-type]
            worker_init_fn=_leave_stop_signals_to_the_trainer,
            prefetch_factor=self.prefetch if self.workers else None,
            persistent_workers=False,
            pin_memory=self.pin_memory and not self.dataset.raw,  # raw bytes are decoded on the device instead
        )
        for b in loader:
            used, skipped = b.used, list(b.skipped)
            if isinstance(b.images, list):  # raw bytes: the dataset is raw only with a decode_device
                assert self.decode_device is not None
                used_list: list[int] = []
                images = decode_jpeg_cuda(
                    b.images,
                    self.size,
                    self.decode_device,
                    fallback=self._cpu,
                    index=b.index,
                    used=used_list,
                    skipped=skipped,
                    backend=self.jpeg_decoder or "auto",
                )
                used = torch.as_tensor(used_list, dtype=torch.int64)
                skipped = sorted(set(skipped))  # once a batch, as the workers count them
            else:
                images = b.images
            if skipped:
                self.skipped += skipped
                _warn_replaced(skipped)
            yield images, torch.from_numpy(self.reader.labels)[used if used is not None else b.index]


def iterate_split(
    reader: Reader,
    size: int,
    *,
    crop: int = 0,
    batch_size: int = 256,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    skip_corrupt: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's images of a split in data-set order (rows ``rank, rank+world, ...``), decoded at ``size`` and
    centre-cropped to ``crop``, in batches: (uint8 (b, 3, c, c), labels (b,)). For feature extraction. Under
    ``skip_corrupt`` a corrupt file's row holds the next decodable image with that image's label (and a warning
    names the file), so every row keeps its place."""
    mine = torch.arange(rank, len(reader), world)
    plan = [mine[s : s + batch_size].tolist() for s in range(0, len(mine), batch_size)]
    if not plan:
        return
    ds = BatchDataset(reader, size, crop=crop, skip_corrupt=skip_corrupt)
    # batch_size=None: collate_fn gets each item (a whole _Batch), not the list torch's hint assumes
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        sampler=plan,
        num_workers=workers,
        collate_fn=_identity,  # type: ignore[arg-type]
        worker_init_fn=_leave_stop_signals_to_the_trainer,
        prefetch_factor=2 if workers else None,
    )
    labels = torch.from_numpy(reader.labels)
    for b in loader:
        if b.skipped:
            _warn_replaced(b.skipped)
        yield b.images, labels[b.used if b.used is not None else b.index]


# ----------------------------------------------------------------------------------------------------------------
# A streamed data set in the roles a run needs


@dataclass
class StreamSplit:
    """One split of a streamed data set: its reader (labels and class names), nothing decoded."""

    reader: Reader
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.reader.labels)

    @property
    def classes(self) -> list[str]:
        return self.reader.classes


def content_fingerprint(split: ImageArrays | StreamSplit, samples: int = 32, *, skip_corrupt: bool = False) -> str:
    """A digest of the labels of ``split`` and of ``samples`` of its images, evenly spaced in its order, prefixed by
    what it hashed: ``pixels:`` (decoded, in memory) or ``bytes:`` (the files, when streamed; ``directpred shards``
    keeps them unchanged). The same for a moved copy, a ``.tar.gz`` of the folder, or (streamed) the folder's shards;
    different, bar a collision, for other images of the same count and classes. Digests of different kinds are not
    comparable (the same images in memory and streamed). Reads ``samples`` files when streamed.

    Raises:
        DataError: a sampled file cannot be read (under ``skip_corrupt`` it is hashed as unreadable instead, as the
            stream replaces it).
    """
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    n = len(split)
    digest.update(f"{n}:".encode())
    picks: list[int] = np.unique(np.linspace(0, n - 1, min(samples, n)).round()).astype(int).tolist() if n else []
    if isinstance(split, StreamSplit):
        digest.update(np.ascontiguousarray(split.reader.labels, dtype=np.int64).tobytes())
        for i in picks:
            try:
                digest.update(hashlib.blake2b(split.reader.read(i), digest_size=16).digest())
            except OSError as exc:
                if not skip_corrupt:
                    raise DataError(
                        f"{split.reader.name(i)}: cannot read it ({exc.strerror or exc}); fix its permissions or "
                        "restore it, or set data.skip_corrupt=true to train on without it"
                    ) from None
                digest.update(f"unreadable:{i}".encode())
        return "bytes:" + digest.hexdigest()
    digest.update(split.labels.cpu().numpy().astype(np.int64).tobytes())
    for i in picks:
        digest.update(split.images[i].cpu().contiguous().numpy().tobytes())
    return "pixels:" + digest.hexdigest()


@dataclass
class StreamData:
    """The roles of :class:`~directpred.data.datasets.DataBundle` for a streamed data set: pre-training images
    (= the labelled train split) and the held-out split, read lazily.

    Attributes:
        image_size: the side of the views and of the test crops (``data.image_size``).
        decode_size: the side the workers decode to (``data.decode_size``, else ``image_size``).
    """

    pretrain: StreamSplit
    train: StreamSplit
    test: StreamSplit
    name: str
    image_size: int
    decode_size: int

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def load_stream_data(cfg: DataConfig) -> StreamData:
    """The :class:`StreamData` of a :class:`directpred.config.DataConfig` with ``stream: true``.

    Raises:
        DataError: no such folder, a missing split, empty class folders, missing or corrupt shards, a split of
            fewer than two classes.
    """
    if not cfg.path or not Path(cfg.path).expanduser().is_dir():
        raise DataError(
            f"data.path {cfg.path!r} is not a directory; a streamed data set is an ImageFolder tree "
            "(train/<class>/..., val/<class>/...) or a folder of tar shards (`directpred shards`)"
        )
    train = StreamSplit(open_reader(cfg.path, "train"))
    test = StreamSplit(open_reader(cfg.path, "test"))
    if test.classes != train.classes:
        raise DataError(f"{cfg.path}: the held-out split's classes differ from train's")
    fix = "add a folder of images of another class to train/ and val/"
    for reader in (train.reader, test.reader):
        if isinstance(reader, ShardReader):
            where = f"{cfg.path}: {reader.shards[0].name.rsplit('-', 1)[0]}-*.tar"
            fix = "add images of another class to the folder they were written from and write the shards again"
        else:
            where = f"{getattr(reader, 'dir', cfg.path)}/"
        require_two_classes(
            reader.labels, reader.classes, where, f"{fix} (`directpred embed` takes a folder of any classes, or none)"
        )
    return StreamData(train, train, test, Path(cfg.path).name, cfg.image_size, cfg.decode_size or cfg.image_size)
