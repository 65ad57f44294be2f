"""Edge cases of the streamed data path found by an audit: each test failed before its fix.

Held-out splits `directpred shards` skipped without a word, files the batched (GPU-decode) path could not read,
class lists and labels of shards, cut-off shards, the order of unusual class names and nested images, non-UTF-8 file
names, the corrupt-file count of the batched path, and resuming after a corrupt file.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_mixed_folder
from PIL import Image

from directpred.config import load_config
from directpred.data.datasets import DataError, load_folder
from directpred.data.stream import (
    BatchDataset,
    FolderReader,
    ShardReader,
    StreamSource,
    decode_jpeg_cuda,
    write_shards,
)
from directpred.train.rundir import check_resume_config

SIZE = 16


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (20, 24)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)


def _folder(root: Path, classes: tuple[str, ...] = ("a", "b", "c"), n: int = 3, held_out: str = "val") -> Path:
    seed = 0
    for split, k in (("train", n), (held_out, 2)):
        for c in classes:
            for i in range(k):
                _jpeg(root / split / c / f"{i:02d}.jpg", seed)
                seed += 1
    return root


def test_shards_refuse_an_unusable_held_out_split_instead_of_leaving_it_out(tmp_path):
    """An extra class folder in val/ made write_shards skip val (exit 0, train shards only); the run then said 'no
    val shards, write them with directpred shards', the command just run."""
    root = _folder(tmp_path / "d")
    _jpeg(root / "val" / "zz_extra" / "00.jpg", 99)
    with pytest.raises(DataError, match=r"1 class folder\(s\) not in train/: zz_extra"):
        write_shards(root, tmp_path / "out", shard_size=4)
    # a split whose folder is absent is still skipped, and a test/ of unlabelled images (ImageNet's) passed over
    plain = _folder(tmp_path / "p")
    _jpeg(plain / "test" / "unlabelled_0.jpg", 7)
    assert write_shards(plain, tmp_path / "out2", shard_size=4, splits=("train", "val", "test")) == {
        "train": 9,
        "val": 6,
    }


def test_shards_splits_test_writes_the_test_folder(tmp_path):
    """`--splits train test` wrote val/ (test fell back to val first) and never test/."""
    root = _folder(tmp_path / "d")
    for c in ("a", "b", "c"):
        _jpeg(root / "test" / c / "00.jpg", 50 + ord(c))
    out = tmp_path / "out"
    assert write_shards(root, out, shard_size=100, splits=("train", "test")) == {"train": 9, "test": 3}
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]
    assert write_shards(root, out, shard_size=100) == {"train": 9, "val": 6}  # the default: val first


def test_an_empty_held_out_class_folder_names_a_fix_that_works(tmp_path):
    """'remove it' led to the next error (the class folder is missing); the held-out message asks for images."""
    root = _folder(tmp_path / "d")
    for f in (root / "val" / "c").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="empty class folder; add images of that class to it, or take the class out"):
        FolderReader(root, "val", classes=["a", "b", "c"])
    (root / "val" / "c").rmdir()
    with pytest.raises(DataError, match="is missing; add images of that class to it, or take the class out"):
        FolderReader(root, "val", classes=["a", "b", "c"])


@pytest.mark.parametrize("how", ["deleted", "empty"])
def test_the_batched_decode_path_names_or_replaces_an_unreadable_file(tmp_path, how):
    """With data.decode=cuda the workers read bytes outside the corrupt-file policy: a deleted file raised a bare
    FileNotFoundError and an empty one a ValueError from torch.frombuffer, even under skip_corrupt. Both now reach
    the Pillow fallback, which names the file or replaces it, as the worker-decode path does."""
    root = _folder(tmp_path / "d")
    reader = FolderReader(root, "train")
    victim = Path(reader.name(1))
    if how == "deleted":
        victim.unlink()
    else:
        victim.write_bytes(b"")
    idx = torch.tensor([0, 1, 2])
    for skip in (False, True):
        raw = BatchDataset(reader, SIZE, raw=True, skip_corrupt=skip)[idx.tolist()]
        fallback = BatchDataset(reader, SIZE, skip_corrupt=skip)
        used: list[int] = []
        skipped: list[str] = []
        if not skip:
            with pytest.raises(DataError, match=f"{victim} cannot be decoded"):
                decode_jpeg_cuda(raw.images, SIZE, "cpu", fallback=fallback, index=idx, used=used, skipped=skipped)
            continue
        got = decode_jpeg_cuda(raw.images, SIZE, "cpu", fallback=fallback, index=idx, used=used, skipped=skipped)
        assert skipped == [str(victim)] and used == [0, 2, 2]
        worker = BatchDataset(reader, SIZE, skip_corrupt=True)[idx.tolist()]  # the worker-decode path
        assert worker.used.tolist() == used and worker.skipped == skipped
        assert (got.float() - worker.images.float()).abs().max() <= 12  # GPU-path interpolation vs Pillow


def test_the_batched_path_counts_each_corrupt_file_once_a_batch(tmp_path):
    """Two adjacent corrupt files: the worker path counted 2, the batched path 3 (the second one twice)."""
    root = _folder(tmp_path / "d")
    reader = FolderReader(root, "train")
    for i in (1, 2):
        Path(reader.name(i)).write_bytes(b"\xff\xd8 not a jpeg")
    counts = {}
    for device in (None, "cpu"):
        src = StreamSource(reader, SIZE, batch_size=9, seed=0, skip_corrupt=True, decode_device=device)
        with pytest.warns(RuntimeWarning, match="replaced"):
            list(src.batches(0))
        counts[device] = sorted(src.skipped)
    assert counts[None] == counts["cpu"] == sorted([reader.name(1), reader.name(2)])


def test_a_class_list_without_its_last_newline_and_labels_out_of_range(tmp_path):
    """classes.txt written without a final newline lost its last class, and .cls labels were never checked: the run
    trained, then failed in the evaluation with an IndexError."""
    root = _folder(tmp_path / "d", classes=("a", "b"))
    out = tmp_path / "s"
    write_shards(root, out, shard_size=4)
    (out / "classes.txt").write_text("a\nb")
    assert ShardReader(out, "train").classes == ["a", "b"]
    (out / "classes.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"000003\.cls holds class 1, but classes.txt lists 1 classes \(0\.\.0\)"):
        ShardReader(out, "train")


def test_a_shard_cut_off_anywhere_is_refused(tmp_path):
    """tarfile ends its listing silently when a file ends inside a header: cut there, an 18-image shard was indexed
    as 1 image with no error. Every cut now either raises DataError or (past the last member) keeps all images."""
    root = _folder(tmp_path / "d", n=6)
    out = tmp_path / "s"
    write_shards(root, out, shard_size=100, splits=("train",))
    shard = out / "train-000000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tf:
        end = max(m.offset_data + m.size for m in tf.getmembers())
    silent = []
    for cut in range(0, end, 61):
        shard.write_bytes(data[:cut])
        try:
            reader = ShardReader(out, "train")
        except DataError as exc:
            assert "corrupt or truncated" in str(exc)
            continue
        silent.append((cut, len(reader)))
    assert silent == []
    shard.write_bytes(data)
    assert len(ShardReader(out, "train")) == 18


def test_streamed_and_in_memory_order_agree_for_any_class_names_and_nested_images(tmp_path):
    """The in-memory path sorted whole paths ('a-b/...' before 'a/...', as '-' sorts before '/') and took images in
    subfolders of a class folder, which the streamed reader ignored: other labels at the same index, other counts."""
    root = _folder(tmp_path / "d", classes=("a", "a-b", "c"), held_out="test")
    _jpeg(root / "train" / "a" / "sub" / "00.jpg", 77)
    _jpeg(root / "train" / "a" / "zz.jpg", 78)
    train, _ = load_folder(root, cache_dir=tmp_path / "cache", image_size=SIZE)
    reader = FolderReader(root, "train")
    assert len(reader) == len(train.labels) == 11
    assert reader.labels.tolist() == train.labels.tolist() == [0] * 5 + [1] * 3 + [2] * 3
    lazy = BatchDataset(reader, SIZE)[list(range(len(reader)))].images
    assert torch.equal(lazy, train.images.permute(0, 3, 1, 2))
    names = [Path(reader.name(i)).relative_to(root / "train").as_posix() for i in range(5)]
    assert names == ["a/00.jpg", "a/01.jpg", "a/02.jpg", "a/sub/00.jpg", "a/zz.jpg"]


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    """os.scandir hands such a name back with surrogate escapes; n.encode() raised UnicodeEncodeError."""
    root = _folder(tmp_path / "d")
    victim = root / "train" / "a" / "00.jpg"
    odd = os.fsdecode(b"caf\xe9.jpg")
    try:
        os.rename(victim, victim.with_name(odd))
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take a non-UTF-8 name")
    reader = FolderReader(root, "train")
    names = [Path(reader.name(i)).name for i in range(len(reader))]
    assert odd in names
    assert BatchDataset(reader, SIZE)[[names.index(odd)]].images.shape == (1, 3, SIZE, SIZE)
    out = tmp_path / "s"
    write_shards(root, out, shard_size=4, splits=("train",))
    assert len(ShardReader(out, "train")) == len(reader)


def _streamed(tiny_overrides: list[str], data: Path) -> list[str]:
    """A tiny streamed run of 12 images in 3 classes (``write_mixed_folder(n_per_class=4)``): 3 steps an epoch."""
    return tiny_overrides + [
        f"data.path={data}",
        "data.stream=true",
        "data.image_size=32",
        "data.decode_size=36",
        "data.augment=imagenet",
        "backbone.width=4",
        "train.batch_size=4",
        "train.epochs=2",
        "eval.linear=false",
        "eval.knn_every=0",
    ]


def test_skip_corrupt_may_change_on_resume(tiny_overrides):
    """The corrupt-file error says to resume with data.skip_corrupt=true; the resume check refused that change."""
    saved = load_config(None, tiny_overrides)
    check_resume_config(saved, load_config(None, tiny_overrides + ["data.skip_corrupt=true"]))


def test_a_replaced_corrupt_file_resumes_with_force_only(tiny_overrides, tmp_path):
    """Restoring a corrupt file is the fix the error names, but the checkpoint's data digest samples 32 images
    (index 0 always): the resume was refused with no way on. It now names --force, which accepts it with a warning,
    while a changed image count is refused even with --force."""
    from directpred.train.loop import Trainer, TrainingError

    data = write_mixed_folder(tmp_path / "data", n_per_class=4)
    base = _streamed(tiny_overrides, data)
    run = tmp_path / "run"
    Trainer(load_config(None, base + ["train.max_steps=2"]), run).fit()
    first = FolderReader(data, "train").name(0)
    _jpeg(Path(first), 1234)  # "a good copy": other bytes at index 0
    cfg = load_config(None, base + ["train.max_steps=0"])
    with pytest.raises(TrainingError, match="if you replaced a corrupt file by a good copy, resume with --force"):
        Trainer(cfg, run, resume=True).fit()
    with pytest.warns(UserWarning, match=r"other images: .* \(accepted by --force\)"):
        Trainer(cfg, run, resume=True, accept_changed_images=True).fit()
    assert (run / "summary.json").is_file()
    for split in ("train", "test"):
        shutil.rmtree(data / split / "n00000002")
    with pytest.raises(TrainingError, match="training images 12 -> 8"):
        Trainer(cfg, tmp_path / "run", resume=True, accept_changed_images=True).fit()


def test_decoded_batches_are_pinned_for_a_cuda_device_only(tiny_overrides, tmp_path):
    """DataLoader(pin_memory=...) was `decode_device is not None and ... and not raw`: never true, as raw is
    `decode_device is not None`. Batches decoded by the workers for a CUDA step are now pinned; none are otherwise."""
    from directpred.data.stream import load_stream_data
    from directpred.train.loop import make_batch_source

    data = write_mixed_folder(tmp_path / "data", n_per_class=2)
    for decode, device, pinned in (("cpu", "cuda", True), ("cuda", "cuda", False), ("auto", "cpu", False)):
        sets = [f"data.path={data}", "data.stream=true", "data.image_size=32", f"data.decode={decode}"]
        cfg = load_config(None, tiny_overrides + sets)
        source = make_batch_source(cfg, load_stream_data(cfg.data), torch.device(device))
        assert isinstance(source, StreamSource) and source.pin_memory is pinned


def test_the_held_out_reader_does_not_list_the_train_images(tmp_path, monkeypatch):
    """open_reader(path, "test") built a whole train FolderReader (every train image listed: 1.28M files for
    ImageNet, at every process start) only for its class names."""
    from directpred.data import stream

    root = _folder(tmp_path / "d")
    walked: list[str] = []
    walk = os.walk
    monkeypatch.setattr(stream.os, "walk", lambda top, **kw: walked.append(Path(top).parent.name) or walk(top, **kw))
    reader = stream.open_reader(root, "test")
    assert set(walked) == {"val"} and reader.classes == ["a", "b", "c"] and len(reader) == 6


def test_test_shards_written_over_an_earlier_writes_val_shards_are_read(tmp_path):
    """The reader takes val shards before test shards: val shards left in --out by a write of another folder were
    read in place of the test shards written now, from a folder with test/ and no val/."""
    out = tmp_path / "s"
    write_shards(_folder(tmp_path / "with_val"), out, shard_size=100)
    assert (out / "val-000000.tar").is_file()
    other = _folder(tmp_path / "with_test", classes=("a", "b", "c"), held_out="test")
    for f in (other / "test" / "a").iterdir():  # 5 held-out images, not 6: which shards are read shows
        f.unlink()
        break
    with pytest.warns(UserWarning, match=r"removed 1 val shard\(s\) of an earlier write \(val-000000.tar\)"):
        assert write_shards(other, out, shard_size=100) == {"train": 9, "test": 5}
    assert len(ShardReader(out, "test")) == 5


def test_a_resume_that_decodes_otherwise_says_so_and_the_advice_is_accepted(tiny_overrides, tmp_path, monkeypatch):
    """data.decode=auto decodes in the workers (Pillow) on a CPU and with nvJPEG on CUDA: a streamed run resumed on
    the other kind of machine changed decoders, and so pixels, without a word (as train.precision=auto warns). The
    GPU side is stood in for by the batched path on the CPU (data.decode=cuda's code with libjpeg-turbo)."""
    from directpred.train import loop
    from directpred.train.rundir import check_resume_config

    data = write_mixed_folder(tmp_path / "data", n_per_class=4)
    base = _streamed(tiny_overrides, data) + ["data.decode=auto"]
    run = tmp_path / "run"
    loop.Trainer(load_config(None, base + ["train.max_steps=2"]), run).fit()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["decoder"] == "pillow"
    make = loop.make_batch_source

    def on_a_gpu(cfg, data, device):  # what data.decode=auto builds under CUDA: the batched decoder
        source = make(cfg, data, device)
        return StreamSource(source.reader, source.size, batch_size=4, seed=cfg.train.seed, decode_device="cpu")

    monkeypatch.setattr(loop, "make_batch_source", on_a_gpu)
    with pytest.warns(RuntimeWarning, match=r"decoded by pillow up to step 2; data.decode=auto decodes them with "):
        loop.Trainer(load_config(None, base + ["train.max_steps=3"]), run, resume=True).fit()
    check_resume_config(load_config(None, base), load_config(None, base + ["data.decode=cpu"]))  # the advice works
