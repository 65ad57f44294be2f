"""The lazy (streamed) data path: same pixels as the in-memory path, sharding, resume, corrupt files, tar shards."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_mixed_folder

from directpred.cli import worker_message
from directpred.data.datasets import DataError, load_folder
from directpred.data.order import epoch_order
from directpred.data.stream import (
    BatchDataset,
    FolderReader,
    InMemorySource,
    ShardReader,
    StreamSource,
    decode_jpeg_cuda,
    is_shard_dir,
    iterate_split,
    jpeg_backend,
    open_reader,
    write_shards,
)

SIZE = 24


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return write_mixed_folder(tmp_path_factory.mktemp("mixed") / "data")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, mixed) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(mixed, out, shard_size=4, splits=("train", "test"))
    return out


def _all(source: StreamSource | InMemorySource, epoch: int, start: int = 0) -> list[torch.Tensor]:
    return list(source.batches(epoch, start))


def test_lazy_path_yields_the_in_memory_images(mixed, tmp_path):
    train, test = load_folder(mixed, cache_dir=tmp_path, image_size=SIZE)
    reader = FolderReader(mixed, "train")
    assert reader.labels.tolist() == train.labels.tolist()
    ds = BatchDataset(reader, SIZE)
    lazy = ds[list(range(len(reader)))].images  # (N, 3, S, S)
    assert torch.equal(lazy, train.images.permute(0, 3, 1, 2))
    # The same epoch, batch by batch, from memory and from disk (order: epoch_order of (seed, epoch)).
    mem = InMemorySource(train.images, batch_size=4, seed=3)
    lazy_src = StreamSource(reader, SIZE, batch_size=4, seed=3)
    assert mem.steps_per_epoch == lazy_src.steps_per_epoch == len(reader) // 4
    for a, b in zip(_all(mem, 1), _all(lazy_src, 1), strict=True):
        assert torch.equal(a, b)
    # Held-out split: train's class list, test's images.
    test_reader = open_reader(mixed, "test")
    assert test_reader.labels.tolist() == test.labels.tolist()
    got = torch.cat([x for x, _ in iterate_split(test_reader, SIZE, batch_size=4)])
    assert torch.equal(got, test.images.permute(0, 3, 1, 2))


def test_ranks_cover_each_image_once_and_form_the_global_batch(mixed):
    reader = FolderReader(mixed, "train")
    world, b = 3, 2
    ranks = [StreamSource(reader, SIZE, batch_size=b, seed=5, rank=r, world=world) for r in range(world)]
    single = StreamSource(reader, SIZE, batch_size=b * world, seed=5)
    for epoch in (0, 1):
        seen = torch.cat([torch.cat(src.index_batches(epoch)) for src in ranks])
        steps = ranks[0].steps_per_epoch
        assert steps == len(reader) // (b * world)
        assert len(set(seen.tolist())) == len(seen) == steps * b * world  # no image twice within an epoch
        order = epoch_order(len(reader), 5, epoch)
        assert set(seen.tolist()) == set(order[: steps * b * world].tolist())
        per_rank = [_all(src, epoch) for src in ranks]
        for step, whole in enumerate(_all(single, epoch)):  # the ranks' shards make up the one-process batch
            assert torch.equal(torch.cat([per_rank[r][step] for r in range(world)]), whole)
    assert not torch.equal(torch.cat(ranks[0].index_batches(0)), torch.cat(ranks[0].index_batches(1)))


def test_labelled_batches_are_the_batches_with_their_labels(mixed, tmp_path):
    """What the online probe reads: the same images in the same order as ``batches``, and each image's label."""
    train, _ = load_folder(mixed, cache_dir=tmp_path, image_size=SIZE)
    reader = FolderReader(mixed, "train")
    memory = InMemorySource(train.images, batch_size=4, seed=3, labels=train.labels)
    stream = StreamSource(reader, SIZE, batch_size=4, seed=3, workers=1)
    for source, labels in ((memory, train.labels), (stream, torch.from_numpy(reader.labels))):
        order = epoch_order(len(labels), 3, 1)
        pairs = list(source.labelled_batches(1, 2))
        assert len(pairs) == source.steps_per_epoch - 2
        for step, ((images, y), plain) in enumerate(zip(pairs, _all(source, 1, 2), strict=True), start=2):
            assert torch.equal(images, plain)
            assert torch.equal(y, labels[order[step * 4 : step * 4 + 4]])
    unlabelled = InMemorySource(train.images, batch_size=4, seed=3)  # labels not given: -1
    assert next(unlabelled.labelled_batches(0))[1].tolist() == [-1] * 4


def test_mid_epoch_resume_gives_exactly_the_remaining_batches_with_workers(mixed):
    reader = FolderReader(mixed, "train")
    full = _all(StreamSource(reader, SIZE, batch_size=3, seed=1), 2)
    resumed = _all(StreamSource(reader, SIZE, batch_size=3, seed=1, workers=2), 2, start=4)
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed, strict=True):
        assert torch.equal(a, b)


def test_corrupt_jpeg_is_named_or_replaced_by_the_next_image(mixed, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(mixed, root)
    victim = sorted((root / "train" / "n00000001").glob("*.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    reader = FolderReader(root, "train")
    i = [reader.name(k) for k in range(len(reader))].index(str(victim))
    with pytest.raises(DataError, match=f"{victim}.*cannot be decoded.*data.skip_corrupt=true") as info:
        BatchDataset(reader, SIZE)[[i]]
    # docs/troubleshooting.md: replace and resume; removing the file would shift the indices a resume relies on
    assert (
        "replace it by a good copy and resume (with --force if the run refuses the changed file; removing it would "
        "change which image each index is)" in str(info.value)
    )
    in_process = str(info.value)
    # Under skip_corrupt the worker replaces it by image i+1: batch shapes and every other sample hold.
    clean = BatchDataset(FolderReader(mixed, "train"), SIZE)
    idx = [i - 1, i, i + 1]
    got = BatchDataset(reader, SIZE, skip_corrupt=True)[idx]
    assert got.skipped == [str(victim)] and got.used.tolist() == [i - 1, i + 1, i + 1]  # the labels' rows
    ref = clean[[i - 1, i + 1, i + 1]].images
    assert torch.equal(got.images, ref)
    with pytest.raises(DataError, match=f"{victim}.*cannot be decoded") as info:  # from a worker, still named
        _all(StreamSource(reader, SIZE, batch_size=len(reader), seed=0, workers=1), 0)
    # The command line prints the worker's message, not the worker's traceback torch wraps around it.
    assert "Traceback" in str(info.value)
    assert worker_message(info.value) == f"{in_process} (in DataLoader worker process 0)"
    # Through worker processes: the run goes on, the file is reported.
    src = StreamSource(reader, SIZE, batch_size=len(reader), seed=0, workers=1, skip_corrupt=True)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        (batch,) = _all(src, 0)
    assert batch.shape == (len(reader), 3, SIZE, SIZE)
    assert src.skipped == [str(victim)]


def test_shards_and_folders_give_the_same_epoch(mixed, shards):
    assert is_shard_dir(shards) and not is_shard_dir(mixed)
    assert sorted(p.name for p in shards.glob("train-*.tar")) == [f"train-{k:06d}.tar" for k in range(6)]
    folder, tar = FolderReader(mixed, "train"), ShardReader(shards, "train")
    assert tar.classes == folder.classes and tar.labels.tolist() == folder.labels.tolist()
    assert all(tar.read(k) == folder.read(k) for k in range(len(folder)))
    a = _all(StreamSource(folder, SIZE, batch_size=4, seed=9), 0)
    b = _all(StreamSource(tar, SIZE, batch_size=4, seed=9, workers=2), 0)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    few = ShardReader(shards, "train")
    few.max_open = 2  # descriptors are recycled: reads across 6 shards with at most 2 open
    assert all(few.read(k) == folder.read(k) for k in reversed(range(len(folder))))
    assert len(few._fds) == 2
    held_out = open_reader(shards, "val")  # val/test are one role: found under either name
    assert held_out.labels.tolist() == open_reader(mixed, "test").labels.tolist()


def test_held_out_split_is_val_before_test_and_never_a_flat_folder(tmp_path, mixed):
    """ImageNet copies may hold the unlabelled test images as a flat test/ beside val/<class>/: val/ is the held-out
    split; test/ serves only when there is no val/ (CIFAR-style layouts)."""
    root = tmp_path / "imagenet"
    shutil.copytree(mixed / "train", root / "train")
    shutil.copytree(mixed / "test", root / "val")
    (root / "test").mkdir()
    (root / "test" / "ILSVRC2012_test_00000001.JPEG").write_bytes(b"unlabelled")
    held_out = open_reader(root, "test")
    assert held_out.labels.tolist() == FolderReader(mixed, "test").labels.tolist()
    assert all("/val/" in held_out.name(i) for i in range(len(held_out)))
    shutil.copytree(mixed / "train", root / "test", dirs_exist_ok=True)  # test/ with class folders too: val/ wins
    assert [open_reader(root, "test").name(i) for i in range(3)] == [held_out.name(i) for i in range(3)]


def test_shard_members_are_read_in_numeric_key_order(tmp_path, mixed):
    """Past a million images the keys grow a digit: a shard holding 999999 and 1000000 lists them in index order
    (as the folder does), not in string order."""
    import io
    import tarfile

    blob = next((mixed / "train").rglob("*.JPEG")).read_bytes()
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tf:
        for key, label in (("1000001", 1), ("999998", 0), ("1000000", 1), ("999999", 0)):
            for member, data in ((f"{key}.jpg", blob), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    (tmp_path / "classes.txt").write_text("a\nb\n")
    reader = ShardReader(tmp_path, "train")
    assert [reader.name(i).rsplit(":", 1)[1] for i in range(4)] == [
        "999998.jpg",
        "999999.jpg",
        "1000000.jpg",
        "1000001.jpg",
    ]
    assert reader.labels.tolist() == [0, 0, 1, 1]


def test_feature_extraction_labels_a_replaced_corrupt_image_with_its_replacement(tmp_path, mixed):
    """Under skip_corrupt the evaluation's split iterator puts the next decodable image in a corrupt file's row: the
    label must be that image's (here the next class's), not the corrupt file's."""
    root = tmp_path / "bad"
    shutil.copytree(mixed, root)
    reader = FolderReader(root, "train")
    last0 = max(i for i in range(len(reader)) if reader.labels[i] == 0)  # its replacement is class 1's first image
    Path(reader.name(last0)).write_bytes(b"\xff\xd8 truncated")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        rows = list(iterate_split(reader, SIZE, batch_size=len(reader), skip_corrupt=True))
    ((images, labels),) = rows
    assert labels[last0] == 1 and labels.tolist()[:last0] == reader.labels[:last0].tolist()
    assert torch.equal(images[last0], images[last0 + 1])


def test_shard_errors_name_the_fix(tmp_path, shards):
    with pytest.raises(DataError, match="no train-NNNNNN.tar shards; write them with `directpred shards"):
        ShardReader(tmp_path, "train")
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    (bad / "train-000001.tar").write_bytes((bad / "train-000001.tar").read_bytes()[:700])
    with pytest.raises(DataError, match="train-000001.tar: the shard is corrupt or truncated"):
        ShardReader(bad, "train")


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs CUDA"))
TORCHCODEC = pytest.param(
    "torchcodec", marks=pytest.mark.skipif(jpeg_backend() != "torchcodec", reason="TorchCodec cannot be imported")
)


@pytest.mark.parametrize("backend", [TORCHCODEC, "torchvision"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_batched_device_decode_is_close_to_pillow(mixed, device, backend):
    """The ``data.decode: cuda`` path (workers read bytes, the training process decodes a batch with TorchCodec's
    or torchvision's ``decode_jpeg(list, device=...)``, resizes and crops there, PNG/CMYK/refused files through the
    Pillow fallback). On ``cpu`` it runs everything but nvJPEG itself."""
    reader = FolderReader(mixed, "train")
    cpu = BatchDataset(reader, SIZE)
    raw = BatchDataset(reader, SIZE, raw=True)
    idx = list(range(len(reader)))
    used: list[int] = []
    got = decode_jpeg_cuda(
        raw[idx].images, SIZE, device, fallback=cpu, index=torch.tensor(idx), used=used, backend=backend
    ).cpu()
    ref = cpu[idx].images
    assert got.shape == ref.shape and used == idx
    diff = (got.float() - ref.float()).abs()
    assert diff.mean() < 6 and diff.flatten(1).mean(1).max() < 20
    # Through the source (workers read bytes, the device decodes): the same batches as Pillow's, up to rounding.
    source = StreamSource(reader, SIZE, batch_size=4, seed=2, workers=1, decode_device=device, jpeg_decoder=backend)
    assert source.jpeg_decoder == backend
    dev = list(source.batches(0))
    cpu_batches = list(StreamSource(reader, SIZE, batch_size=4, seed=2).batches(0))
    assert len(dev) == len(cpu_batches) and all(g.device.type == device for g in dev)
    assert all((g.cpu().float() - c.float()).abs().mean() < 6 for g, c in zip(dev, cpu_batches))


@pytest.mark.parametrize("backend", [TORCHCODEC, "torchvision"])
def test_batched_decode_keeps_an_exif_rotated_jpeg_as_stored_like_pillow(tmp_path, backend):
    """TorchCodec applies a JPEG's EXIF orientation, Pillow (hence ImageFolder and the workers' path) does not: the
    batched path hands such a file to the Pillow fallback, so both paths give the same pixels."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    arr = torch.randint(0, 256, (30, 60, 3), generator=rng, dtype=torch.uint8)
    arr[:, :30] //= 4  # a dark left half: a rotation by 90 degrees moves it to the top or bottom
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    for name, e in (("rotated.jpg", exif), ("plain.jpg", None)):
        im = Image.fromarray(arr.numpy())
        im.save(tmp_path / name, quality=95, **({"exif": e} if e is not None else {}))
    blobs = [
        torch.frombuffer(bytearray((tmp_path / n).read_bytes()), dtype=torch.uint8)
        for n in ("rotated.jpg", "plain.jpg")
    ]

    class _Files(FolderReader):
        def __init__(self) -> None:
            pass

        def __len__(self) -> int:
            return 2

        def name(self, i: int) -> str:
            return ("rotated.jpg", "plain.jpg")[i]

        def read(self, i: int) -> bytes:
            return (tmp_path / self.name(i)).read_bytes()

    pillow = BatchDataset(_Files(), 30)
    got = decode_jpeg_cuda(blobs, 30, "cpu", fallback=pillow, index=torch.tensor([0, 1]), backend=backend)
    ref = pillow[[0, 1]].images
    assert torch.equal(got[0], ref[0])  # the Pillow fallback decoded it: exactly Pillow's pixels
    assert (got[1].float() - ref[1].float()).abs().mean() < 3  # the plain JPEG went through the batched decoder
    if backend == "torchcodec":  # the file does carry a rotation that TorchCodec would apply
        from torchcodec.decoders import decode_jpeg

        assert decode_jpeg(blobs[0]).shape[-2:] == (60, 30)


def test_jpeg_backend_falls_back_or_names_the_fix(monkeypatch):
    import sys

    assert jpeg_backend("torchvision") == "torchvision"
    with pytest.raises(ValueError, match="unknown JPEG backend 'nvjpeg'"):
        jpeg_backend("nvjpeg")
    from directpred.data.stream import _torchcodec_import_error

    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # `import torchcodec.decoders` raises ImportError
    _torchcodec_import_error.cache_clear()  # the import is tried once per process
    try:
        assert jpeg_backend("auto") == "torchvision"
        with pytest.raises(DataError, match="TorchCodec cannot be imported.*or use the torchvision backend"):
            jpeg_backend("torchcodec")
    finally:
        _torchcodec_import_error.cache_clear()


def test_jpeg_backend_treats_a_torchcodec_without_decode_jpeg_as_missing(monkeypatch):
    """TorchCodec releases before 0.16 (e.g. 0.11, the one for torch 2.11) import but decode only video and audio:
    ``auto`` must fall back to torchvision rather than fail at the first batch."""
    import sys
    import types

    from directpred.data.stream import _torchcodec_import_error

    old = types.ModuleType("torchcodec.decoders")
    old.VideoDecoder = object  # what an old release's torchcodec.decoders offers: no decode_jpeg
    monkeypatch.setitem(sys.modules, "torchcodec", types.ModuleType("torchcodec"))
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", old)
    _torchcodec_import_error.cache_clear()
    try:
        assert jpeg_backend("auto") == "torchvision"
        with pytest.raises(DataError, match="no decode_jpeg \\(added in 0.16\\).*use the torchvision backend"):
            jpeg_backend("torchcodec")
    finally:
        _torchcodec_import_error.cache_clear()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_batched_device_decode_replaces_a_corrupt_jpeg_like_the_workers(mixed, tmp_path, device):
    """Under skip_corrupt a truncated JPEG is replaced by the next decodable image on the batched path too (through
    the Pillow fallback), and the labels follow the images used, exactly as on the workers' path (with nvJPEG where
    CUDA exists: its error on the bad file must send the batch down the one-by-one path, not stop it)."""
    root = tmp_path / "bad"
    shutil.copytree(mixed, root)
    victim = sorted((root / "train" / "n00000001").glob("*.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated: decode_jpeg and Pillow both refuse it
    reader = FolderReader(root, "train")
    batched = StreamSource(reader, SIZE, batch_size=len(reader), seed=0, skip_corrupt=True, decode_device=device)
    workers = StreamSource(reader, SIZE, batch_size=len(reader), seed=0, skip_corrupt=True)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        ((images, labels),) = list(batched.labelled_batches(0))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        ((ref_images, ref_labels),) = list(workers.labelled_batches(0))
    assert torch.equal(labels.cpu(), ref_labels) and batched.skipped == workers.skipped == [str(victim)]
    assert images.device.type == device and (images.cpu().float() - ref_images.float()).abs().mean() < 6


def test_held_out_class_absent_from_train_is_refused_not_dropped(tmp_path, mixed):
    """A val/ class folder that train/ lacks would be left out of the streamed evaluation without a word (the
    in-memory loader refuses it too): the reader names it."""
    root = tmp_path / "data"
    shutil.copytree(mixed, root)
    shutil.copytree(root / "test" / "n00000001", root / "test" / "n00000099")
    with pytest.raises(DataError) as info:
        open_reader(root, "test")
    assert str(info.value) == (
        f"{root / 'test'}: 1 class folder(s) not in train/: n00000099; both splits need the same class folders "
        "(remove them, or add them to train/)"
    )


_GROUP_SIGTERM_CHILD = """
import signal, sys, time
from directpred.data.stream import FolderReader, StreamSource
stopped = []
signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))  # as `directpred train` does
source = StreamSource(FolderReader(sys.argv[1], "train"), 24, batch_size=3, seed=1, workers=1)
batches = source.batches(0)
first = next(batches)
print("ready", flush=True)
deadline = time.time() + 60
while not stopped and time.time() < deadline:
    time.sleep(0.05)
rest = list(batches)  # the step in progress and the loop's shutdown still need the workers
print("stopped" if stopped else "no signal", 1 + len(rest), flush=True)
"""


_LEFT_OPEN_CHILD = """
import sys, time
from directpred.data import stream
from directpred.data.stream import FolderReader, StreamSource
stream.STOP_GRACE_SECONDS = 1.0  # read by the forked worker when the signal comes
source = StreamSource(FolderReader(sys.argv[1], "train"), 24, batch_size=3, seed=1, workers=1)
LEFT_OPEN = source.batches(0)
next(LEFT_OPEN)
print("exiting", flush=True)
"""


def test_a_loader_left_open_does_not_hang_the_exit(mixed):
    """Python's exit terminates (SIGTERM) and then joins the workers of a loader nobody closed: a worker that
    ignored SIGTERM hung it for ever (the whole test suite, once); it exits after its grace instead."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _LEFT_OPEN_CHILD, str(mixed)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["exiting"], proc.stderr
    assert time.monotonic() - t0 < 45


def _descendants(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes, and theirs (Linux ``/proc``)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


@pytest.mark.parametrize("how", ["group", "every_pid"])
def test_a_sigterm_to_the_run_leaves_the_workers_to_the_training_process(mixed, how):
    """torchrun stops a rank (and Ctrl-C a command) by signalling its whole process group, and Slurm (``scancel``, a
    time limit, preemption) by signalling every process of the job step by its pid: the DataLoader workers must not
    die of it, or the training process fails mid-step instead of stopping after it with a checkpoint."""
    import os
    import signal
    import subprocess
    import sys

    if how == "every_pid" and not Path("/proc/self/task").is_dir():
        pytest.skip("finding the worker processes needs Linux /proc")

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _GROUP_SIGTERM_CHILD, str(mixed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own group, as a torchrun rank
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        if how == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            workers = _descendants(proc.pid)
            assert workers, "the DataLoader worker was not found"
            for pid in [proc.pid, *workers]:
                os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = len(FolderReader(mixed, "train")) // 3
    assert proc.returncode == 0, err
    assert out.split() == ["stopped", str(steps)]


def test_rewriting_shards_removes_the_stale_shards_of_an_earlier_write(tmp_path, mixed):
    """Shards written again into the same folder with a larger shard size leave no shard of the earlier write past
    the new last one: the reader takes every SPLIT-NNNNNN.tar and would see those images twice."""
    out = tmp_path / "shards"
    write_shards(mixed, out, shard_size=4, splits=("train", "test"))
    assert len(list(out.glob("train-*.tar"))) == 6
    write_shards(mixed, out, shard_size=100, splits=("train", "test"))
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]
    folder, tar = FolderReader(mixed, "train"), ShardReader(out, "train")
    assert len(tar) == len(folder) and tar.labels.tolist() == folder.labels.tolist()


def test_a_streamed_data_set_of_one_class_is_refused(tmp_path):
    from conftest import write_folder

    from directpred.config import load_config
    from directpred.data.stream import load_stream_data

    one = write_folder(tmp_path / "one", n_train=4, n_test=2, n_classes=1, size=8)
    data_cfg = load_config(
        None, ["data.dataset=folder", "data.stream=true", f"data.path={one}", "data.image_size=8"]
    ).data
    with pytest.raises(DataError) as info:
        load_stream_data(data_cfg)
    assert str(info.value).startswith(
        f"{one / 'train'}/ holds one class (class0): accuracies against labels need at least two; add a folder of "
        "images of another class to train/ and val/"
    )
    shards = tmp_path / "shards"
    write_shards(one, shards, shard_size=4, splits=("train", "test"))
    with pytest.raises(DataError, match=r"train-\*\.tar holds one class \(class0\): .*write the shards again"):
        load_stream_data(dataclasses.replace(data_cfg, path=str(shards)))
    two = write_folder(tmp_path / "two", n_train=4, n_test=2, n_classes=2, size=8)
    assert load_stream_data(dataclasses.replace(data_cfg, path=str(two))).num_classes == 2
