"""Folders and archives decode once into a cache; bad data fails with the files named."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from conftest import write_folder
from PIL import Image

from directpred.cli import main
from directpred.config import load_config
from directpred.data import datasets
from directpred.data.datasets import DataError, _decode, balanced_subset, load_folder
from directpred.data.stream import decode_to_tensor
from directpred.train.loop import Trainer


def test_folder_and_archive_decode_identically(tiny_folder, tiny_archive, tmp_path):
    a_train, a_test = load_folder(tiny_folder, cache_dir=tmp_path / "c1")
    b_train, b_test = load_folder(tiny_archive, cache_dir=tmp_path / "c2")
    assert a_train.classes == b_train.classes == ["class0", "class1", "class2", "class3"]
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.labels, b_test.labels)
    assert a_train.images.shape == (128, 32, 32, 3) and a_train.images.dtype == torch.uint8
    assert torch.equal(a_train.labels.bincount(), torch.tensor([32, 32, 32, 32]))


def test_the_content_fingerprint_follows_the_sampled_pixels_and_the_labels(tiny_folder, tiny_archive, tmp_path):
    """The digest a resume compares (content_fingerprint): the same for the folder and its archive; another for one
    pixel of a sampled image changed by one level, or two labels swapped; blind, by design, to an image it does not
    sample (32 of 128, evenly spaced: 0, 4, 8, ..., 127)."""
    from directpred.data.stream import content_fingerprint

    train, _ = load_folder(tiny_folder, cache_dir=tmp_path / "c1")
    ref = content_fingerprint(train)
    assert content_fingerprint(load_folder(tiny_archive, cache_dir=tmp_path / "c2")[0]) == ref
    pixel = train.subset(torch.arange(128))
    pixel.images[4, 10, 10, 1] ^= 1
    labels = train.subset(torch.arange(128))
    labels.labels[[0, 127]] = labels.labels[[127, 0]]
    unsampled = train.subset(torch.arange(128))
    unsampled.images[5] = 255 - unsampled.images[5]
    assert content_fingerprint(pixel) != ref and content_fingerprint(labels) != ref
    assert content_fingerprint(unsampled) == ref


def test_cache_is_reused_and_never_written_beside_the_archive(tiny_archive, tmp_path):
    before = sorted(os.listdir(tiny_archive.parent))
    load_folder(tiny_archive, cache_dir=tmp_path / "c")
    caches = list((tmp_path / "c" / "arrays").iterdir())
    assert len(caches) == 1 and (caches[0] / "meta.json").is_file()
    mtime = (caches[0] / "train_images.npy").stat().st_mtime_ns
    load_folder(tiny_archive, cache_dir=tmp_path / "c")
    assert (caches[0] / "train_images.npy").stat().st_mtime_ns == mtime
    assert sorted(os.listdir(tiny_archive.parent)) == before


def test_a_moved_image_is_decoded_again_not_read_from_the_cache(tmp_path):
    """Moving a file to another class or split keeps its size and mtime: the cache key must still change, or the
    cached arrays would carry the old labels and splits."""
    root = write_folder(tmp_path / "d", n_train=16, n_test=4)
    train0, test0 = load_folder(root, cache_dir=tmp_path / "c")
    first, second = sorted((root / "train" / "class0").iterdir())[:2]
    first.rename(root / "train" / "class1" / "moved.png")  # another class
    second.rename(root / "test" / "class0" / "moved.png")  # another split
    train, test = load_folder(root, cache_dir=tmp_path / "c")
    fresh_train, fresh_test = load_folder(root, cache_dir=tmp_path / "fresh")
    assert (len(train), len(test)) == (len(train0) - 1, len(test0) + 1)
    assert torch.equal(train.labels, fresh_train.labels) and torch.equal(train.images, fresh_train.images)
    assert torch.equal(test.labels, fresh_test.labels)
    assert train.labels.bincount()[1] == train0.labels.bincount()[1] + 1
    assert len(list((tmp_path / "c" / "arrays").iterdir())) == 2  # a second cache, for the new contents


def _cut_short(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CACHE_DAMAGE = {
    "truncated images": (lambda c: _cut_short(c / "train_images.npy"), "train_images.npy: mmap length is greater"),
    "truncated labels": (lambda c: _cut_short(c / "test_labels.npy"), "test_labels.npy: "),
    "invalid meta.json": (lambda c: (c / "meta.json").write_text('{"classes": ['), "meta.json: Expecting value"),
    "missing meta.json": (lambda c: (c / "meta.json").unlink(), "no meta.json"),
    "missing labels": (lambda c: (c / "train_labels.npy").unlink(), "no train_labels.npy"),
    "empty folder": (lambda c: [f.unlink() for f in c.iterdir()], "no meta.json"),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_a_damaged_cache_is_rebuilt_from_the_source_with_a_warning_naming_it(tiny_folder, tmp_path, damage):
    """A truncated .npy was a bare 'mmap length is greater than file size', an invalid meta.json a bare
    JSONDecodeError, a missing one 'No such file or directory ... then resume'."""
    train0, test0 = load_folder(tiny_folder, cache_dir=tmp_path / "c")
    train0.images, test0.images = train0.images.clone(), test0.images.clone()  # not mapped from the file cut below
    (cache,) = (tmp_path / "c" / "arrays").iterdir()
    original = {f.name: f.read_bytes() for f in cache.iterdir()}
    hurt, reason = CACHE_DAMAGE[damage]
    hurt(cache)
    with pytest.warns(UserWarning) as caught:
        train, test = load_folder(tiny_folder, cache_dir=tmp_path / "c")
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"the decoded-data cache {cache} cannot be read ({reason}")
    assert message.endswith(f"; rebuilding it from {tiny_folder}")
    assert torch.equal(train.images, train0.images) and torch.equal(train.labels, train0.labels)
    assert torch.equal(test.images, test0.images) and torch.equal(test.labels, test0.labels)
    assert train.classes == train0.classes and (train.skipped, test.skipped) == (0, 0)
    assert {f.name: f.read_bytes() for f in cache.iterdir()} == original  # the same files, byte for byte
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # no temporary or damaged copy left
    load_folder(tiny_folder, cache_dir=tmp_path / "c")  # read again, silently: no warning


def test_a_damaged_cache_that_cannot_be_rebuilt_names_the_folder_to_delete(tiny_folder, tmp_path, monkeypatch):
    load_folder(tiny_folder, cache_dir=tmp_path / "c")
    (cache,) = (tmp_path / "c" / "arrays").iterdir()
    (cache / "meta.json").write_text("not json")

    def full(file, content):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(datasets, "_write_synced", full)
    with pytest.warns(UserWarning), pytest.raises(DataError) as info:
        load_folder(tiny_folder, cache_dir=tmp_path / "c")
    assert str(info.value) == (
        f"the decoded-data cache {cache} cannot be read (meta.json: Expecting value: line 1 column 1 (char 0)), and "
        f"rebuilding it failed (No space left on device: {cache}.tmp{os.getpid()}/train_images.npy); delete that "
        f"folder (`rm -r {cache}`), free disk space or fix permissions there if need be, and run the command again"
    )
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # the temporary folder is removed
    monkeypatch.undo()
    shutil.rmtree(cache)  # what the message says to do works
    train, _ = load_folder(tiny_folder, cache_dir=tmp_path / "c")
    assert len(train) == 128 and json.loads((cache / "meta.json").read_text())["skipped"] == {"train": 0, "test": 0}


def test_the_cache_files_are_fsynced_before_the_rename_that_publishes_them(tiny_folder, tmp_path, monkeypatch):
    """A crash after the rename must not leave a published cache whose files were still in the page cache."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    load_folder(tiny_folder, cache_dir=tmp_path / "c")
    (cache,) = (tmp_path / "c" / "arrays").iterdir()
    tmp = f"{cache}.tmp{os.getpid()}"
    published = events.index(("replace", tmp))
    synced = {path for kind, path in events[:published] if kind == "fsync"}
    files = {f"{tmp}/{f.name}" for f in cache.iterdir()}
    assert len(files) == 5 and files | {tmp} <= synced, (files, synced)
    assert ("fsync", str(cache.parent)) in events[published:]  # the rename itself made durable


def test_a_run_and_its_eval_work_on_with_a_damaged_cache(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides + ["train.max_steps=1"]), run).fit()
    (cache,) = (tmp_path / "cache" / "arrays").iterdir()
    original = {f.name: f.read_bytes() for f in cache.iterdir()}
    _cut_short(cache / "train_images.npy")
    capsys.readouterr()
    assert main(["eval", str(run), "--no-linear"]) == 0
    assert f"the decoded-data cache {cache} cannot be read (train_images.npy: " in capsys.readouterr().err
    assert json.loads((run / "eval.json").read_text())["knn_top1"] is not None
    (cache / "meta.json").unlink()
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=2"]) == 0
    assert "cannot be read (no meta.json); rebuilding it from" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in cache.iterdir()} == original


def test_balanced_subset():
    labels = torch.arange(10).repeat_interleave(50)
    idx = balanced_subset(labels, 100, seed=0)
    assert len(idx) == 100 and torch.equal(labels[idx].bincount(), torch.full((10,), 10))
    assert torch.equal(idx, balanced_subset(labels, 100, seed=0))
    skewed = torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    assert labels.new_tensor(skewed[balanced_subset(skewed, 40)].bincount().tolist()).tolist() == [5, 35]


def test_corrupt_images_are_named_or_skipped(tmp_path):
    root = write_folder(tmp_path / "d", n_train=4, n_test=2)
    bad = root / "train" / "class1" / "0005.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"1 image\(s\) cannot be decoded: .*0005\.png.*skip_corrupt"):
        load_folder(root, cache_dir=tmp_path / "c")
    with pytest.warns(UserWarning, match="skipped 1 corrupt"):
        train, _ = load_folder(root, cache_dir=tmp_path / "c", skip_corrupt=True)
    assert len(train) == 15 and train.skipped == 1


def test_a_file_that_is_no_image_is_named_without_pils_buffer(tmp_path):
    """PIL says `cannot identify image file <_io.BytesIO object at 0x7f...>` of the buffer it was given; the message
    names the file instead."""
    root = write_folder(tmp_path / "d", n_train=4, n_test=2)
    (root / "train" / "class1" / "0005.png").write_bytes(b"no image at all")
    with pytest.raises(DataError) as info:
        load_folder(root, cache_dir=tmp_path / "c")
    assert "0005.png (UnidentifiedImageError: cannot identify image file)" in str(info.value), str(info.value)
    assert "BytesIO" not in str(info.value)


def test_layout_errors_name_the_problem(tmp_path):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    (root / "train" / "class9").mkdir()
    with pytest.raises(DataError, match="empty class folder.*class9"):
        load_folder(root, cache_dir=tmp_path / "c")
    (root / "train" / "class9").rmdir()
    (root / "test" / "class3").rename(root / "test" / "other")
    with pytest.raises(DataError, match="different classes"):
        load_folder(root, cache_dir=tmp_path / "c")
    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="train/<class>"):
        load_folder(flat, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "missing", cache_dir=tmp_path / "c")


def test_truncated_archive_is_reported(tiny_archive, tmp_path):
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(tiny_archive.read_bytes()[: tiny_archive.stat().st_size // 2])
    with pytest.raises(DataError, match="broken.tar.gz"):
        load_folder(broken, cache_dir=tmp_path / "c")


def test_archive_with_wrapping_folder(tmp_path):
    root = write_folder(tmp_path / "wrap" / "mydata", n_train=2, n_test=1)
    archive = tmp_path / "wrapped.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(root, arcname="mydata")
    train, test = load_folder(archive, cache_dir=tmp_path / "c")
    assert len(train) == 8 and len(test) == 4


def test_mixed_sizes_need_image_size(tmp_path):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1, size=32)
    write_folder(tmp_path / "d2", n_train=1, n_test=1, size=40)
    (tmp_path / "d2" / "train" / "class0" / "0000.png").rename(root / "train" / "class0" / "big.png")
    with pytest.raises(DataError, match="data.image_size"):
        load_folder(root, cache_dir=tmp_path / "c")
    train, _ = load_folder(root, cache_dir=tmp_path / "c", image_size=24)
    assert train.images.shape[1:] == (24, 24, 3)


def test_a_subset_larger_than_the_split_says_that_all_images_are_used(tiny_overrides):
    """tiny_folder: 128 training and 32 test images. A train_subset above 128 keeps all of them, with a warning
    saying so; a test_subset of 20 is a real subset, without one."""
    from directpred.config import load_config
    from directpred.data.datasets import load_data

    cfg = load_config(None, tiny_overrides + ["data.train_subset=100000", "data.test_subset=20"])
    full = load_data(load_config(None, tiny_overrides).data)
    with pytest.warns(UserWarning) as caught:
        data = load_data(cfg.data)
    assert [str(w.message) for w in caught] == [
        "data.train_subset=100000 is more than the 128 images there: all 128 are used"
    ]
    assert len(data.pretrain) == 128 and torch.equal(data.pretrain.labels, full.pretrain.labels)
    assert len(data.test) == 20


def test_a_training_subset_smaller_than_the_classes_is_refused(tiny_overrides):
    """tiny_folder has 4 classes: a train_subset of 3 left one without a training image, so kNN and the probe could
    never predict it and reported a capped accuracy without a word; 4 keeps one image of each."""
    from directpred.config import load_config
    from directpred.data.datasets import load_data

    with pytest.raises(DataError, match=r"data.train_subset=3 is fewer images than the 4 classes.*at least 4"):
        load_data(load_config(None, tiny_overrides + ["data.train_subset=3"]).data)
    data = load_data(load_config(None, tiny_overrides + ["data.train_subset=4"]).data)
    assert sorted(data.train.labels.tolist()) == [0, 1, 2, 3]


def _image_bytes(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def test_16_bit_and_float_images_decode_to_the_expected_8_bit_values(tmp_path):
    """Pillow's convert("RGB") clips I;16/I/F to 0..255: a 16-bit gradient came out almost all white."""
    expected = np.arange(256, dtype=np.uint8).reshape(16, 16)
    grey16 = expected.astype(np.uint16) * 256 + np.uint16(100)  # 0..255 in the top byte, 100 in the low one
    grey16[0, 0] = 0
    png16 = _image_bytes(grey16, "PNG")
    with Image.open(io.BytesIO(png16)) as im:
        assert im.mode == "I;16"
    want = np.repeat(expected[:, :, None], 3, axis=2)
    assert np.array_equal(_decode(png16, 0), want)
    # The same through a data folder (the in-memory path) and the streamed decoder.
    root = tmp_path / "d"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            (root / split / c / "x.png").write_bytes(png16)
    train, _ = load_folder(root, cache_dir=tmp_path / "c")
    assert np.array_equal(train.images[0].numpy(), want)
    assert np.array_equal(decode_to_tensor(png16, 16).permute(1, 2, 0).numpy(), want)
    # 32-bit integers within the 16-bit range: the same >> 8; floats within 0..1: times 255.
    assert np.array_equal(_decode(_image_bytes(grey16.astype(np.int32), "TIFF"), 0), want)
    floats = expected.astype(np.float32) / 255
    assert np.array_equal(_decode(_image_bytes(floats, "TIFF"), 0), want)
    # Beyond those ranges: stretched from the image's minimum to its maximum.
    assert np.array_equal(_decode(_image_bytes(floats * 1000 - 3, "TIFF"), 0), want)
    assert np.array_equal(_decode(_image_bytes(expected.astype(np.int32) * 1000 - 7, "TIFF"), 0), want)
    # Non-finite pixels: NaN as the minimum, +-inf clipped to the finite range (+inf made the rest black before).
    odd = np.array([[0, 0.5, 1, np.inf], [0, 0.5, 1, np.nan], [0, 0.5, 1, -np.inf]], dtype=np.float32)
    assert _decode(_image_bytes(odd, "TIFF"), 0)[:, :, 0].tolist() == [[0, 128, 255, 255], [0, 128, 255, 0]] + [
        [0, 128, 255, 0]
    ]
    # 8-bit images are untouched.
    assert np.array_equal(_decode(_image_bytes(expected, "PNG"), 0), want)


def test_a_data_set_of_one_class_is_refused_but_embed_still_takes_it(tmp_path):
    """kNN against one class is 100 % whatever the network learnt: the tester's run reported exactly that."""
    from directpred.config import load_config
    from directpred.data.datasets import load_data
    from directpred.export import read_image_folder

    one = write_folder(tmp_path / "one", n_train=4, n_test=2, n_classes=1, size=8)
    cfg = load_config(None, ["data.dataset=folder", f"data.path={one}", f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(DataError) as info:
        load_data(cfg.data)
    message = str(info.value)
    assert message.startswith(f"{one}: train/ holds one class (class0): accuracies against labels need at least two; ")
    assert "\n" not in message and "add a folder of images of another class to train/ and test/" in message
    two = write_folder(tmp_path / "two", n_train=4, n_test=2, n_classes=2, size=8)
    cfg = load_config(None, ["data.dataset=folder", f"data.path={two}", f"data.cache_dir={tmp_path / 'c'}"])
    assert load_data(cfg.data).train.classes == ["class0", "class1"]
    # `directpred embed` reads a folder of one class, or a flat folder of unlabelled images, as before.
    arrays, _ = read_image_folder(one, image_size=8)
    assert arrays.classes == ["class0"] and len(arrays) == 2
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (one / "train" / "class0").iterdir():
        (flat / f.name).write_bytes(f.read_bytes())
    arrays, _ = read_image_folder(flat, image_size=8)
    assert arrays.classes == [] and arrays.labels.tolist() == [-1] * 4


def test_a_file_that_is_no_archive_is_named_in_one_line(tmp_path):
    from directpred.data.datasets import list_members

    image = write_folder(tmp_path / "d", n_train=1, n_test=1, n_classes=1, size=8) / "test" / "class0" / "0000.png"
    with pytest.raises(DataError) as info:
        list_members(image)
    assert str(info.value) == (
        f"{image} is a file, not a folder or .tar/.tar.gz archive; give the folder that holds the images"
    )
    broken = tmp_path / "images.tar.gz"  # meant as an archive: the archive's problem, on one line
    broken.write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match=r"images.tar.gz is neither a directory nor a readable tar archive \(") as info:
        list_members(broken)
    assert "\n" not in str(info.value)


def test_a_cache_dir_that_cannot_be_written_is_named_with_the_fix(tiny_overrides, tmp_path, monkeypatch):
    """data.cache_dir=/sys/cache: the message blamed the disk and said to resume, before anything had run."""
    import errno

    from directpred.config import load_config
    from directpred.data import datasets

    def denied(path, cache, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(cache))

    monkeypatch.setattr(datasets, "_build_cache", denied)
    cfg = load_config(None, tiny_overrides + [f"data.cache_dir={tmp_path / 'ro'}"]).data
    with pytest.raises(
        DataError, match=r"data.cache_dir=.*/ro: cannot write the decoded-data cache there \(Permission"
    ):
        datasets.load_data(cfg)

    def full(path, cache, *args, **kwargs):  # a full disk stays the disk's error (the CLI's message)
        raise OSError(errno.ENOSPC, "No space left on device", str(cache))

    monkeypatch.setattr(datasets, "_build_cache", full)
    with pytest.raises(OSError, match="No space left"):
        datasets.load_data(cfg)
