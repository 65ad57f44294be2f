"""Edges of `directpred export` and `directpred embed`: another run's checkpoint, split layouts (STL-10, ImageNet),
the ONNX file, output paths that are directories or a run's own files, atomic writes, a source that does not
exist, and an image-size override. Each test's docstring says what was wrong before."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_images, tiny_override_list, write_folder
from PIL import Image

from directpred.cli import main
from directpred.config import load_config
from directpred.train.checkpoint import CheckpointError
from directpred.train.loop import Trainer

TOL = dict(rtol=1e-4, atol=1e-5)


def _tiny(folder: Path, cache: Path, *extra: str) -> list[str]:
    return [*tiny_override_list(folder, cache), "train.max_steps=2", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_folder) -> dict[str, Path]:
    """Two tiny runs of the same network on the same data, one with CIFAR's augmentation (and normalisation), one
    with ImageNet's."""
    tmp = tmp_path_factory.mktemp("edges")
    out = {}
    for name in ("cifar", "imagenet"):
        Trainer(load_config(None, _tiny(tiny_folder, tmp / "cache", f"data.augment={name}")), tmp / name).fit()
        out[name] = tmp / name
    return out


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------------
# 1. --checkpoint of another run


@pytest.mark.parametrize("command", ["export", "embed"])
def test_a_checkpoint_of_another_run_is_refused_not_exported_with_this_runs_recipe(
    command, runs, tmp_path, tiny_folder, capsys
):
    """`export RUN_A --checkpoint RUN_B/checkpoints/last.pt` exited 0 with run A's normalisation (CIFAR's mean/std)
    on run B's weights (trained with ImageNet's), and its config claimed A's augmentation; embed computed features
    the same way. Refused now as `directpred eval` refuses it, naming both files and the fix."""
    from directpred.export import read_backbone

    a, b = runs["cifar"], runs["imagenet"]
    other = b / "checkpoints" / "last.pt"
    out = tmp_path / ("b.pt" if command == "export" else "f.npy")
    extra = ["--data", str(tiny_folder)] if command == "embed" else []
    assert main([command, str(a), "--checkpoint", str(other), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"directpred: config error: checkpoint {other} (--checkpoint) was trained with another configuration than "
        f"{a / 'config.yaml'} (data.augment: 'cifar' in the run, 'imagenet' in the checkpoint"
    ), err
    assert f"give {other} itself as the source" in err
    assert not out.exists()
    # The checkpoint itself as the source: rebuilt with its own recipe, which is not run A's.
    own, theirs = read_backbone(other), read_backbone(a)
    assert own.mean == pytest.approx([0.485, 0.456, 0.406]) and theirs.mean == pytest.approx([0.4914, 0.4822, 0.4465])
    assert own.config["data"]["augment"] == "imagenet"
    # A checkpoint of the run itself (a copy elsewhere, e.g. a kept epoch) is taken, as by eval.
    shutil.copy(a / "checkpoints" / "last.pt", tmp_path / "a_copy.pt")
    same = read_backbone(a, checkpoint=tmp_path / "a_copy.pt")
    assert same.mean == theirs.mean and same.step == theirs.step


# ---------------------------------------------------------------------------------------------------------------
# 2. split layouts: STL-10's unlabeled/, ImageNet's unlabelled test/


def _save(images: list[np.ndarray], folder: Path, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{start + i:04d}.png")


def test_an_stl10_layout_has_an_unlabeled_split_not_three_classes(tmp_path):
    """train/ test/ unlabeled/ (STL-10) was read as one ImageFolder of three classes named train, test and
    unlabeled (every image labelled by its split), and --split test was refused ('no split folders'). The training
    loader reads unlabeled/ as a split of unlabelled images; so does embed now."""
    from directpred.data.datasets import _list_source
    from directpred.export import read_image_folder

    root = write_folder(tmp_path / "stl", n_train=2, n_test=3, n_classes=2, size=8)
    extra, _ = synthetic_images(3, 1, size=8, seed=5)
    _save(extra[:2], root / "unlabeled")
    _save(extra[2:], root / "unlabeled" / "deeper", start=2)  # any depth, as the training loader takes them
    listed = _list_source(root)
    for split in (None, "test"):  # the default split is test/, the run's held-out images
        arrays, names = read_image_folder(root, image_size=8, split=split)
        assert arrays.classes == ["class0", "class1"]
        assert names == [n for n, _ in sorted(listed["test"])]
        assert arrays.labels.tolist() == [y for _, y in sorted(listed["test"])] == [0, 0, 0, 1, 1, 1]
    arrays, names = read_image_folder(root, image_size=8, split="unlabeled")
    assert names == [n for n, _ in listed["unlabeled"]]
    assert names == ["unlabeled/0000.png", "unlabeled/0001.png", "unlabeled/deeper/0002.png"]
    assert arrays.labels.tolist() == [-1, -1, -1] and arrays.classes == []
    np.testing.assert_array_equal(arrays.images.numpy(), np.stack(extra))


def _imagenet_layout(tiny_folder: Path, root: Path) -> Path:
    """train/<class>/ and val/<class>/ (the tiny data's train and test images), and a test/ of the same test
    images without class folders (ImageNet's unlabelled test set)."""
    shutil.copytree(tiny_folder / "train", root / "train")
    shutil.copytree(tiny_folder / "test", root / "val")
    (root / "test").mkdir()
    for i, image in enumerate(sorted((tiny_folder / "test").rglob("*.png"))):
        shutil.copy(image, root / "test" / f"{i:05d}.png")
    return root


def test_the_default_split_of_an_imagenet_layout_is_val_not_its_unlabelled_test(run_in_memory, tmp_path, tiny_folder):
    """train/<class>/ val/<class>/ test/<images> (ImageNet): the default split was test/, its unlabelled images
    (labels -1), whereas the runs' loaders take val/ and pass over a test/ without class folders. Now embed's
    default is val/, the images the run's kNN and linear probe use, as the streamed reader picks them."""
    from directpred.data.stream import open_reader
    from directpred.export import read_image_folder

    root = _imagenet_layout(tiny_folder, tmp_path / "imagenet")
    reader = open_reader(root, "test")  # the streamed run's held-out split
    assert reader.dir == root / "val"
    assert main(["embed", str(run_in_memory), "--data", str(root), "--out", str(tmp_path / "f.npz")]) == 0
    z = np.load(tmp_path / "f.npz")
    assert z["paths"].tolist() == [f"val/{os.fsdecode(n)}" for n in reader.names]
    assert z["labels"].tolist() == reader.labels.tolist() and z["classes"].tolist() == reader.classes
    for held_out in (("val", "test"), ("test", "val")):  # a streamed run's order, an in-memory run's
        arrays, names = read_image_folder(root, image_size=32, held_out=held_out)
        assert names == z["paths"].tolist() and arrays.labels.tolist() == reader.labels.tolist()
    # --split test still embeds the unlabelled images, when asked for
    argv = ["embed", str(run_in_memory), "--data", str(root), "--split", "test", "--out", str(tmp_path / "t.npz")]
    assert main(argv) == 0
    t = np.load(tmp_path / "t.npz")
    assert (t["labels"] == -1).all() and len(t["labels"]) == len(z["labels"]) == 32


def test_the_default_held_out_split_is_the_runs_own(tmp_path, tiny_folder, capsys):
    """With labelled val/ and test/ both, a streamed run evaluates on val/ (the streamed reader's order) and an
    in-memory run on test/ (its loader reads no val/): the default split follows the run. A test/ without class
    folders is never the default: it is named in the error when nothing else is held out."""
    from directpred.data.datasets import DataError
    from directpred.export import BackboneExport, read_image_folder

    root = write_folder(tmp_path / "three", n_train=2, n_test=2, n_classes=2, size=8)
    shutil.copytree(root / "train", root / "val")  # other images than test/'s
    assert read_image_folder(root, image_size=8)[1][0].startswith("val/")
    assert read_image_folder(root, image_size=8, held_out=("test", "val"))[1][0].startswith("test/")

    def held_out(stream: bool) -> tuple[str, ...]:
        exp = BackboneExport({}, "resnet18", 4, True, 32, 32, None, None, 0, {"data": {"stream": stream}})
        return exp.held_out

    assert held_out(True) == ("val", "test") and held_out(False) == ("test", "val")

    flat = tmp_path / "flat_test"
    shutil.copytree(root / "train", flat / "train")
    _save(synthetic_images(2, 1, size=8)[0], flat / "test")
    with pytest.raises(DataError) as info:
        read_image_folder(flat, image_size=8)
    assert str(info.value) == (
        f"{flat} has no val/ or test/ folder of class folders (the default split: the held-out images a run "
        "evaluates on; test/ holds images without class folders, which no run evaluates on); its split folders: "
        "train/, test/; give --split test"
    )
    assert read_image_folder(flat, image_size=8, split="test")[0].labels.tolist() == [-1, -1]


@pytest.fixture(scope="module")
def run_in_memory(runs) -> Path:
    return runs["cifar"]


# ---------------------------------------------------------------------------------------------------------------
# 3. ONNX: one self-contained file, written atomically


def test_the_onnx_file_is_self_contained_and_loads_alone(run_in_memory, tmp_path):
    """torch.onnx.export wrote the weights to b.onnx.data beside b.onnx, which the command never mentioned: b.onnx
    copied alone did not load in onnxruntime. Now the graph holds its weights, and no sidecar is written."""
    pytest.importorskip("onnx", reason="the onnx package is not installed (pip install onnx onnxscript)")
    pytest.importorskip("onnxscript", reason="the onnxscript package is not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    import directpred
    from directpred.data.augment import eval_transform

    made = tmp_path / "made"
    made.mkdir()
    assert main(["export", str(run_in_memory), "--out", str(made / "b.pt"), "--onnx", str(made / "b.onnx")]) == 0
    assert sorted(p.name for p in made.iterdir()) == ["b.onnx", "b.pt"]  # no b.onnx.data, no temporaries
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(made / "b.onnx", alone / "copied.onnx")
    session = ort.InferenceSession(str(alone / "copied.onnx"))
    net = directpred.load_backbone(made / "b.pt")
    images = torch.from_numpy(np.stack(synthetic_images(5, 1, size=32)[0]))  # 5 images: the batch axis is dynamic
    x = eval_transform(images, net.recipe)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], net(x).numpy(), rtol=1e-3, atol=1e-4)


def test_a_failing_onnx_export_keeps_the_previous_file(run_in_memory, tmp_path, monkeypatch):
    """The exporter wrote straight to the final path: one that failed midway left a torn b.onnx in place of the
    previous one. Now the graph is built in memory and written atomically."""
    import directpred.export as export

    def exporter(model, args, f=None, **kwargs):
        if f is not None:  # an exporter writing to the final path, failing midway
            Path(f).write_bytes(b"torn")
        raise RuntimeError("the exporter failed")

    monkeypatch.setattr(export, "_check_onnx_exporter", lambda: None)
    monkeypatch.setattr(torch.onnx, "export", exporter)
    graph = tmp_path / "b.onnx"
    graph.write_bytes(b"previous graph")
    with pytest.raises(RuntimeError, match="the exporter failed"):
        export.export_backbone(run_in_memory, tmp_path / "b.pt", onnx=graph)
    assert graph.read_bytes() == b"previous graph" and _temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# 4. embed --out a directory


@pytest.mark.parametrize("kind", ["existing", "separator"])
def test_embed_refuses_an_out_that_is_a_directory(kind, run_in_memory, tmp_path, tiny_folder, capsys):
    """`embed --out DIR` (an existing directory) or `--out DIR/` wrote DIR.npy and DIR.labels.npy beside it, with
    exit 0. Refused before any work, naming a file to give instead."""
    from directpred.export import save_features

    target = tmp_path / "feats"
    if kind == "existing":
        target.mkdir()
    out = str(target) + (os.sep if kind == "separator" else "")
    assert main(["embed", str(run_in_memory), "--data", str(tiny_folder), "--out", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    what = "is a directory" if kind == "existing" else "ends in a path separator, so it names a directory"
    assert err == (
        f"directpred embed: error: --out {out} {what}, not a file; give another path there: a file to write, e.g. "
        f"{target / 'features.npy'} (the features, with {target / 'features.labels.npy'} beside it) or "
        f"{target / 'features.npz'}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == (["feats"] if kind == "existing" else [])
    with pytest.raises(IsADirectoryError, match="not a file; give another path there"):
        save_features(out, np.zeros((1, 2)), np.zeros(1, dtype=np.int64), [], ["a.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == (["feats"] if kind == "existing" else [])


# ---------------------------------------------------------------------------------------------------------------
# 5. data.image_size override of a checkpoint that records its size


def test_an_image_size_override_wins_over_the_recorded_size(run_in_memory):
    """read_backbone(..., overrides=['data.image_size=24']) kept the checkpoint's recorded 32 while the export's
    config said 24: the override was silently ignored. It wins now, as `directpred eval --set data.image_size=24`
    evaluates at 24; data.image_size=0 (the data set's size) keeps the recorded one."""
    from directpred.export import read_backbone

    for source in (run_in_memory, run_in_memory / "checkpoints" / "last.pt"):
        exp = read_backbone(source, overrides=["data.image_size=24"])
        assert (exp.image_size, exp.recipe.size, exp.config["data"]["image_size"]) == (24, 24, 24)
        with torch.no_grad():  # the network takes 24-pixel images: the CIFAR stem has no fixed input size
            assert exp.build()(torch.zeros(2, 3, 24, 24)).shape == (2, exp.out_dim)
        assert read_backbone(source, overrides=["data.image_size=0"]).image_size == 32
        assert read_backbone(source).image_size == 32


# ---------------------------------------------------------------------------------------------------------------
# 6. a run's own files; atomic feature files


@pytest.mark.parametrize("name", ["config.yaml", "summary.json", "metrics.jsonl", "command.txt"])
def test_export_refuses_to_overwrite_a_file_the_run_owns(name, run_in_memory, tmp_path, capsys):
    """`export RUN --out RUN/config.yaml` replaced the run's config.yaml with a zip (the run could not be read,
    evaluated or resumed any more); the same for its summary.json, metrics.jsonl, command.txt. Only checkpoints/
    was protected. Refused before any work, for --torchscript and --onnx too."""
    run = tmp_path / "run"
    shutil.copytree(run_in_memory, run)
    (run / "command.txt").write_text("directpred train ...\n")  # a run made by Trainer directly has none
    target = run / name
    before = target.read_bytes()
    for option in ("--out", "--torchscript"):
        argv = ["export", str(run), "--out", str(target if option == "--out" else tmp_path / "b.pt")]
        assert main([*argv, *([option, str(target)] if option != "--out" else [])]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"directpred: error: {option} {target} is the run {run}'s {name}, a file the run writes and reads back: "
            f"the export would replace it; write the export elsewhere (e.g. {run / 'backbone.pt'})"
        )
    assert target.read_bytes() == before and not (tmp_path / "b.pt").exists()
    assert main(["export", str(run), "--out", str(run / "backbone.pt")]) == 0  # beside them is fine


def test_export_refuses_an_out_that_ends_in_a_separator(run_in_memory, tmp_path, capsys):
    """`export RUN --out newdir/` wrote a file named newdir (the separator dropped) with exit 0."""
    out = str(tmp_path / "newdir") + os.sep
    assert main(["export", str(run_in_memory), "--out", out]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"directpred: error: --out {out} ends in a path separator, so it names a directory, not a file; give the "
        f"path of a file to write, e.g. {tmp_path / 'newdir' / 'backbone.pt'}"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_a_failed_features_write_keeps_the_previous_files(suffix, tmp_path, monkeypatch):
    """save_features wrote with np.save/np.savez straight to the final paths: a write that failed midway (a full
    disk) left a torn features file (and, for .npy, new labels were never written beside it, or old ones were kept
    beside new features). Now each file goes through a temporary file and a rename, the features before the
    labels' rename: a failure keeps both previous files, and leaves no temporary."""
    import errno

    from directpred.export import save_features

    out = tmp_path / f"f{suffix}"
    old_feats, old_labels = np.arange(6.0).reshape(3, 2), np.array([0, 1, 0])
    save_features(out, old_feats, old_labels, ["a", "b"], ["x", "y", "z"])
    written = sorted(p.name for p in tmp_path.iterdir())
    before = {name: (tmp_path / name).read_bytes() for name in written}
    new_feats = np.ones((4, 2))
    real_save, real_savez = np.save, np.savez

    def full_disk(file, *args, **kwargs):
        """Writes part of its output, then fails as a full disk does."""
        if isinstance(file, (str, os.PathLike)):
            Path(file).write_bytes(b"torn")
        else:
            file.write(b"torn")
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(file, arr, *args, **kwargs):
        return (full_disk if arr.shape == new_feats.shape else real_save)(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises((OSError, CheckpointError), match="No space left on device"):
        save_features(out, new_feats, np.array([1, 1, 1, 1]), ["a", "b"], list("wxyz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == written  # no temporary left
    assert {name: (tmp_path / name).read_bytes() for name in written} == before
    monkeypatch.setattr(np, "save", real_save)
    monkeypatch.setattr(np, "savez", real_savez)
    files = save_features(out, new_feats, np.array([1, 1, 1, 1]), ["a", "b"], list("wxyz"))
    got = np.load(files[0])
    np.testing.assert_array_equal(got["features"] if suffix == ".npz" else got, new_feats)
    labels = got["labels"] if suffix == ".npz" else np.load(files[1])
    assert labels.tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------------------
# 7. a source that does not exist


@pytest.mark.parametrize("command", ["export", "embed"])
def test_a_source_that_does_not_exist_is_named_as_such(command, tmp_path, tiny_folder, capsys):
    """`directpred export nope --out z.pt` said 'no checkpoint at nope', as if a run directory had lost its
    checkpoint; now it says that the path does not exist and what to give."""
    nope = tmp_path / "nope"
    out = tmp_path / ("z.pt" if command == "export" else "z.npy")
    extra = ["--data", str(tiny_folder)] if command == "embed" else []
    assert main([command, str(nope), "--out", str(out), *extra]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"directpred: error: {nope} does not exist; give a run directory (made by `directpred train`), a checkpoint "
        "file (e.g. RUN_DIR/checkpoints/last.pt) or an exported backbone (made by `directpred export`)"
    )
    assert not out.exists()
