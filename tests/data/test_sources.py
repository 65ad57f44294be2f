"""Where the data comes from: the quick start's local copy, torchvision's copy, a download, and the offline error.

The download is real (torchvision's own code over HTTP), from a server on 127.0.0.1 that serves a tiny fake
``cifar-10-python.tar.gz`` built here; torchvision's URL and checksums are pointed at it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import pickle
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from conftest import REPO, write_tar

from directpred.cli import main
from directpred.config import ConfigError, load_config
from directpred.data.datasets import DataError, DownloadError, load_data, resolve_source

QUICKSTART = REPO / "configs" / "cpu" / "quickstart.yaml"
# Make the quick start tiny; the data keys (dataset, local_copy, download) stay the config's own.
SMALL = [
    "backbone.width=4",
    "projector.hidden_dim=32",
    "projector.out_dim=16",
    "train.batch_size=16",
    "train.progress=false",
    "train.device=cpu",
    "train.precision=fp32",
    "train.channels_last=false",
    "eval.linear=false",
    "eval.knn_k=5",
    "diag.every=0",
    "train.log_every=1",
]
N_PER_BATCH, N_TEST = 8, 20


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fake_cifar10(folder: Path) -> tuple[Path, dict[str, str], np.ndarray, list[int]]:
    """A valid ``cifar-10-python.tar.gz`` with 5 x 8 training and 20 test images; returns (archive, md5 of each
    member, test images (N, 32, 32, 3), test labels)."""
    rng = np.random.default_rng(0)
    members: dict[str, bytes] = {}
    for i in range(1, 6):
        data = rng.integers(0, 256, (N_PER_BATCH, 3072), dtype=np.uint8)
        members[f"data_batch_{i}"] = pickle.dumps({"data": data, "labels": [int(x) for x in rng.integers(0, 10, 8)]})
    test = rng.integers(0, 256, (N_TEST, 3072), dtype=np.uint8)
    test_labels = [k % 10 for k in range(N_TEST)]
    members["test_batch"] = pickle.dumps({"data": test, "labels": test_labels})
    members["batches.meta"] = pickle.dumps({"label_names": [f"c{k}" for k in range(10)]})
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return (
        archive,
        {k: _md5(v) for k, v in members.items()},
        test.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
        test_labels,
    )


def _point_torchvision_at(monkeypatch, url: str, md5s: dict[str, str], tgz_md5: str) -> None:
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "url", url)
    monkeypatch.setattr(cls, "tgz_md5", tgz_md5)
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5s["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s["batches.meta"]})


@pytest.fixture
def cifar_server(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 URL served from 127.0.0.1; yields the served archive's test split."""
    served = tmp_path / "served"
    served.mkdir()
    archive, md5s, test_images, test_labels = fake_cifar10(served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _point_torchvision_at(
        monkeypatch, f"http://127.0.0.1:{server.server_port}/{archive.name}", md5s, _md5(archive.read_bytes())
    )
    yield test_images, test_labels
    server.shutdown()
    server.server_close()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 URL points at a closed port: every download fails like a machine without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    archive, md5s, _, _ = fake_cifar10(tmp_path)
    _point_torchvision_at(
        monkeypatch, f"http://127.0.0.1:{port}/cifar-10-python.tar.gz", md5s, _md5(archive.read_bytes())
    )


def _quickstart_args(tmp_path: Path, *extra: str) -> list[str]:
    sets = [
        *SMALL,
        f"data.root={tmp_path / 'tv'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.local_copy={tmp_path / 'no-mirror.tar.gz'}",
        *extra,
    ]
    return ["train", str(QUICKSTART), "--out", str(tmp_path / "run")] + [a for s in sets for a in ("--set", s)]


def test_quickstart_downloads_when_no_copy_exists_and_trains(tmp_path, cifar_server, capsys):
    test_images, test_labels = cifar_server
    assert main(_quickstart_args(tmp_path, "train.max_steps=2")) == 0
    summary = yaml.safe_load((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["knn_top1"] is not None
    assert (tmp_path / "tv" / "cifar-10-python.tar.gz").is_file()  # torchvision downloaded it into data.root
    # The run trained on exactly the served images.
    data = load_data(
        load_config(QUICKSTART, [f"data.root={tmp_path / 'tv'}", f"data.local_copy={tmp_path / 'none'}"]).data
    )
    assert torch.equal(data.test.images, torch.from_numpy(test_images))
    assert data.test.labels.tolist() == test_labels and len(data.pretrain) == 5 * N_PER_BATCH
    assert data.test.classes == [f"c{k}" for k in range(10)]


def test_quickstart_offline_fails_with_one_clear_line(tmp_path, offline, capsys):
    assert main(_quickstart_args(tmp_path)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("directpred: network error: cannot download CIFAR-10 (URLError: ")
    assert "Connect to the internet and retry, or give a local copy with --set data.path=PATH" in err
    assert "free space" not in err and "permissions" not in err  # not reported as a disk problem
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    with pytest.raises(DownloadError):
        load_data(load_config(QUICKSTART, [f"data.root={tmp_path / 'tv2'}", f"data.local_copy={tmp_path / 'x'}"]).data)


def test_unwritable_data_root_while_downloading_is_a_disk_error_not_a_resume(tmp_path, offline, capsys):
    """A data.root that cannot be created fails before any network access with the folder named, and without the
    generic advice to resume from a checkpoint (there is none)."""
    (tmp_path / "file").write_text("not a folder")
    root = tmp_path / "file" / "tv"
    assert main(_quickstart_args(tmp_path, f"data.root={root}")) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"directpred: error: cannot store CIFAR-10 under data.root='{root}' while downloading: Not a directory "
        f"({root}); free disk space or make data.root writable (or set it elsewhere), or give a local copy with "
        "--set data.path=PATH"
    )
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_no_download_and_no_copy_says_how_to_get_data(tmp_path, capsys):
    assert main(_quickstart_args(tmp_path, "data.download=false")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err == (
        f"directpred: error: CIFAR-10 is not available: no local copy at data.local_copy="
        f"'{tmp_path / 'no-mirror.tar.gz'}' and no torchvision copy under data.root='{tmp_path / 'tv'}'. "
        "Connect to the internet and set data.download=true, or give a local copy with --set "
        "data.path=PATH (an ImageFolder directory or .tar/.tar.gz with train/<class>/ and test/<class>/, "
        "e.g. cifar10-jpeg.tar.gz)"
    )
    with pytest.raises(DataError) as info:
        load_data(
            load_config(
                QUICKSTART, [f"data.root={tmp_path / 'tv'}", "data.download=false", f"data.local_copy={tmp_path / 'x'}"]
            ).data
        )
    assert not isinstance(info.value, DownloadError)


def test_quickstart_uses_the_mirror_beside_the_repository(tmp_path, tiny_folder, offline):
    """A fresh clone with ``shared/data/cifar10-jpeg.tar.gz`` beside it uses that copy (offline is fine), from any
    current directory; the run's config.yaml records the absolute path."""
    clone = tmp_path / "clone"
    (clone / "configs" / "cpu").mkdir(parents=True)
    shutil.copy(QUICKSTART, clone / "configs" / "cpu" / "quickstart.yaml")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    mirror = write_tar(tiny_folder, tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz")
    cfg = load_config(clone / "configs" / "cpu" / "quickstart.yaml")
    assert cfg.data.local_copy == str(mirror) and cfg.data.dataset == "cifar10" and cfg.data.download
    assert resolve_source(cfg.data) == ("folder", str(mirror))
    sets = [*SMALL, f"data.root={tmp_path / 'tv'}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2"]
    args = ["train", str(clone / "configs" / "cpu" / "quickstart.yaml"), "--out", str(tmp_path / "run")]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["local_copy"] == str(mirror)
    assert not (tmp_path / "tv").exists()  # torchvision was never asked
    data = load_data(dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "cache")))
    assert data.test.classes == ["class0", "class1", "class2", "class3"] and len(data.pretrain) == 4 * 32


def test_relative_data_paths(tmp_path, monkeypatch, tiny_folder):
    """In a config file, relative to the file's folder; in --set, relative to the current directory."""
    (tmp_path / "cfgs" / "sub").mkdir(parents=True)
    shutil.copytree(tiny_folder, tmp_path / "cfgs" / "data")
    f = tmp_path / "cfgs" / "sub" / "c.yaml"
    f.write_text(
        "data:\n  dataset: folder\n  path: ../data\n  local_copy: copy.tar\n  root: tv\n  cache_dir: ../cache\n"
    )
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "mine").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    cfg = load_config(f)
    assert cfg.data.path == str(tmp_path / "cfgs" / "data")
    assert cfg.data.local_copy == str(tmp_path / "cfgs" / "sub" / "copy.tar")
    assert cfg.data.root == str(tmp_path / "cfgs" / "sub" / "tv") and cfg.data.cache_dir == str(
        tmp_path / "cfgs" / "cache"
    )
    cfg = load_config(f, ["data.path=mine", "data.local_copy=~/x.tar", "data.cache_dir=c"])
    assert cfg.data.path == str(elsewhere / "mine") and cfg.data.local_copy == "~/x.tar"
    assert cfg.data.cache_dir == str(elsewhere / "c")
    # A saved (base) config is taken as it is.
    assert load_config(None, base={"data": {"dataset": "folder", "path": "mine"}}).data.path == "mine"
    with pytest.raises(
        ConfigError,
        match=r"data.path=.*the path does not exist.*or leave it unset to use "
        r"torchvision's cifar10",
    ):
        load_config(None, ["data.dataset=cifar10", "data.path=nope"])


def test_explicit_path_wins_over_local_copy_and_torchvision(tmp_path, tiny_folder, tiny_archive):
    cfg = load_config(None, ["data.dataset=cifar10", f"data.path={tiny_folder}", f"data.local_copy={tiny_archive}"])
    assert resolve_source(cfg.data) == ("folder", str(tiny_folder))
    cfg = load_config(None, ["data.dataset=cifar10", f"data.local_copy={tiny_archive}"])
    assert resolve_source(cfg.data) == ("folder", str(tiny_archive))
    cfg = load_config(None, ["data.dataset=cifar10", f"data.local_copy={tmp_path / 'missing'}"])
    assert resolve_source(cfg.data) == ("torchvision", None)


class _FakeSTL10:
    """torchvision.datasets.STL10's interface (``data`` (N, 3, 96, 96) uint8, ``labels``, ``classes``): 16 labelled
    training images, 32 unlabelled ones (label -1) and 8 test images, drawn from the split's name."""

    classes = [f"c{k}" for k in range(10)]
    calls: list[tuple[str, bool]] = []

    def __init__(self, root: str, split: str, download: bool = False) -> None:
        _FakeSTL10.calls.append((split, download))
        parts = split.split("+")
        self.data = np.concatenate([self._images(p) for p in parts])
        self.labels = np.concatenate([self._labels(p) for p in parts])

    @staticmethod
    def _images(part: str) -> np.ndarray:
        n = {"train": 16, "unlabeled": 32, "test": 8}[part]
        return np.random.default_rng(len(part)).integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)

    @staticmethod
    def _labels(part: str) -> np.ndarray:
        n = {"train": 16, "unlabeled": 32, "test": 8}[part]
        return np.full(n, -1) if part == "unlabeled" else np.arange(n) % 10


def test_stl10_pretrains_on_train_plus_unlabeled_and_probes_on_train(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.datasets, "STL10", _FakeSTL10)
    _FakeSTL10.calls = []
    cfg = load_config(None, ["data.dataset=stl10", f"data.root={tmp_path / 'tv'}", "data.local_copy=null"]).data
    data = load_data(cfg)
    assert _FakeSTL10.calls == [("train+unlabeled", False), ("train", False), ("test", False)]
    assert data.name == "stl10" and data.image_size == 96
    assert (len(data.pretrain), len(data.train), len(data.test)) == (48, 16, 8)
    # NCHW -> NHWC, the same pixels; the unlabelled images keep label -1 (never used by kNN or the probe)
    torch.testing.assert_close(data.train.images, torch.from_numpy(_FakeSTL10._images("train")).permute(0, 2, 3, 1))
    assert data.pretrain.labels[16:].eq(-1).all() and torch.equal(data.pretrain.labels[:16], data.train.labels)
    sub = load_data(dataclasses.replace(cfg, train_subset=8, test_subset=8))  # (the 8 test images: 8 classes)
    assert len(sub.pretrain) == 8 and len(sub.train) == 16 and len(sub.test) == 8  # the probe keeps every label


def test_stl10_from_a_folder_warns_that_it_pretrains_on_train_only(tiny_folder, tmp_path):
    cfg = load_config(None, ["data.dataset=stl10", f"data.path={tiny_folder}", f"data.cache_dir={tmp_path}"]).data
    with pytest.warns(UserWarning, match=r"no unlabeled/ folder, so pre-training uses its train/ images only \(128\)"):
        data = load_data(cfg)
    assert data.pretrain is data.train and len(data.pretrain) == 128


def test_a_folders_unlabeled_images_join_pretraining_only(tmp_path):
    """STL-10 as a folder: train/<class>/, test/<class>/ and unlabeled/ (any layout). Pre-training uses train +
    unlabeled (label -1) like torchvision's train+unlabeled; kNN and the probe use train/ only."""
    import warnings

    from conftest import synthetic_images, write_folder
    from PIL import Image

    root = write_folder(tmp_path / "stl", n_train=2, n_test=1, size=16)  # per class: 8 train, 4 test images
    images, _ = synthetic_images(3, 2, 16, 5)
    for i, img in enumerate(images):
        d = root / "unlabeled" / ("part1" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"u{i}.png")
    cfg = load_config(None, ["data.dataset=stl10", f"data.path={root}", f"data.cache_dir={tmp_path / 'c'}"]).data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "train/ only" warning
        data = load_data(cfg)
    assert (len(data.pretrain), len(data.train), len(data.test)) == (14, 8, 4)
    assert torch.equal(data.pretrain.labels[:8], data.train.labels) and data.pretrain.labels[8:].eq(-1).all()
    assert torch.equal(data.pretrain.images[:8], data.train.images)
    expected = {bytes(np.asarray(img).tobytes()) for img in images}
    assert {bytes(x.numpy().tobytes()) for x in data.pretrain.images[8:]} == expected
    sub = load_data(dataclasses.replace(cfg, train_subset=10))
    assert len(sub.pretrain) == 10 and len(sub.train) == 8  # the probe keeps every labelled image


def test_stl10_trains_one_step_with_its_recipe(monkeypatch, tmp_path):
    from directpred.data.views import view_recipes
    from directpred.train import Trainer

    monkeypatch.setattr(torchvision.datasets, "STL10", _FakeSTL10)
    over = [
        "data.dataset=stl10",
        f"data.root={tmp_path / 'tv'}",
        "data.local_copy=null",
        "backbone.width=4",
        "backbone.cifar_stem=false",
        "projector.hidden_dim=32",
        "projector.out_dim=16",
        "train.batch_size=16",
        "train.max_steps=1",
        "train.progress=false",
        "train.device=cpu",
        "train.precision=fp32",
        "eval.linear=false",
        "eval.knn_k=5",
        "eval.knn_every=0",
        "diag.every=0",
    ]
    trainer = Trainer(load_config(None, over), tmp_path / "run").setup()
    v1, v2 = view_recipes(trainer.cfg, trainer.data)
    assert v1.size == 96 and v1.mean is None and v1.blur_p == 1.0  # the authors' STL-10 recipe
    summary = trainer.fit()
    correct = summary["knn_top1"] * 8 / 100  # kNN over the 8 test images, fitted on the 16 labelled ones
    assert summary["steps"] == 1 and correct == pytest.approx(round(correct), abs=1e-9)
