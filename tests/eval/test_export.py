"""Taking the backbone out: export (state dict, TorchScript, ONNX), load_backbone and embed reproduce the run's own
evaluation features."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from conftest import synthetic_images, write_tar
from PIL import Image
from torch import nn

import directpred
from directpred.backbones import resnet, resolve_channels_last
from directpred.cli import main
from directpred.config import ConfigError, config_from_dict, load_config
from directpred.data.augment import eval_transform
from directpred.data.datasets import load_data
from directpred.data.views import view_recipes
from directpred.eval.features import extract_features
from directpred.eval.knn import KNNClassifier
from directpred.methods import build_method
from directpred.train.checkpoint import load_checkpoint, save_checkpoint
from directpred.train.loop import Trainer

TOL = dict(rtol=1e-4, atol=1e-5)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_folder) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    over = [
        "data.dataset=folder",
        f"data.path={tiny_folder}",
        f"data.cache_dir={tmp / 'cache'}",
        "backbone.width=4",
        "projector.hidden_dim=32",
        "projector.out_dim=16",
        "train.batch_size=16",
        "train.progress=false",
        "train.device=cpu",
        "train.precision=fp32",
        "eval.knn_every=0",
        "eval.linear=false",
        "eval.knn_k=10",
        "diag.every=0",
        "train.max_steps=3",
    ]
    Trainer(load_config(None, over), tmp / "run").fit()
    return tmp / "run"


def _reference(run: Path):
    """What `directpred eval` computes: the run's method from its checkpoint, features by directpred.eval."""
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg)
    channels_last = resolve_channels_last(cfg.train.channels_last, method, torch.device("cpu"))
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    method.load_state_dict(load_checkpoint(run / "checkpoints" / "last.pt")["model"])
    data = load_data(cfg.data, seed=cfg.train.seed)
    _, test_recipe = view_recipes(cfg, data)
    feats = {
        split: extract_features(
            method.encoder.backbone, getattr(data, split).images, test_recipe, channels_last=channels_last
        )
        for split in ("train", "test")
    }
    return feats, data, test_recipe


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated upstream
def test_export_load_backbone_and_torchscript_match_the_runs_features(run, tmp_path, capsys):
    feats, data, test_recipe = _reference(run)
    out, ts = tmp_path / "backbone.pt", tmp_path / "backbone.ts"
    assert main(["export", str(run), "--out", str(out), "--torchscript", str(ts)]) == 0
    assert "resnet18 width 4 CIFAR stem, 32-d features of 32x32 images, step 3" in capsys.readouterr().out

    saved = torch.load(out, weights_only=True)  # plain tensors and metadata only
    assert saved["format"] == "directpred-backbone" and saved["step"] == 3
    assert (saved["arch"], saved["width"], saved["cifar_stem"], saved["image_size"]) == ("resnet18", 4, True, 32)
    net = resnet("resnet18", width=4, cifar_stem=True)
    net.load_state_dict(saved["state_dict"])  # strict: exactly the torchvision ResNet's keys, no fc
    assert isinstance(net, torchvision.models.ResNet) and isinstance(net.fc, nn.Identity)

    x = eval_transform(data.test.images, test_recipe)
    for source in (out, run, run / "checkpoints" / "last.pt"):
        backbone = directpred.load_backbone(source)
        assert not backbone.training and backbone.recipe == test_recipe
        with torch.no_grad():
            torch.testing.assert_close(backbone(x), feats["test"], **TOL)
    traced = torch.jit.load(str(ts))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), feats["test"], **TOL)


def test_embed_writes_the_runs_features_and_labels(run, tmp_path, tiny_folder, capsys):
    feats, data, _ = _reference(run)
    assert main(["embed", str(run), "--data", str(tiny_folder), "--out", str(tmp_path / "f.npy")]) == 0
    got = np.load(tmp_path / "f.npy")
    np.testing.assert_allclose(got, feats["test"].numpy(), **TOL)
    assert np.array_equal(np.load(tmp_path / "f.labels.npy"), data.test.labels.numpy())
    # An archive, the train split, one .npz: the kNN of the embeddings is the run's own kNN figure.
    archive = write_tar(tiny_folder, tmp_path / "tiny.tar.gz")
    assert main(["embed", str(run), "--data", str(archive), "--split", "train", "--out", str(tmp_path / "t.npz")]) == 0
    z = np.load(tmp_path / "t.npz")
    np.testing.assert_allclose(z["features"], feats["train"].numpy(), **TOL)
    assert list(z["classes"]) == data.train.classes and str(z["paths"][0]).startswith("train/class0/")
    knn = KNNClassifier(k=10, temperature=0.1).fit(torch.from_numpy(z["features"]), torch.from_numpy(z["labels"]))
    summary = json.loads((run / "summary.json").read_text())
    assert 100.0 * knn.score(torch.from_numpy(got), data.test.labels) == pytest.approx(summary["knn_top1"])
    # A plain ImageFolder (<class>/<image>, no train/test).
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert (
        main(
            ["embed", str(tmp_path / "other.pt"), "--data", str(tiny_folder / "test"), "--out", str(tmp_path / "g.npy")]
        )
        == 1
    )
    assert "other.pt is neither a directpred checkpoint nor an exported backbone" in capsys.readouterr().err
    assert main(["embed", str(run), "--data", str(tiny_folder / "test"), "--out", str(tmp_path / "g.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), got)


def _layouts(tiny_folder: Path, root: Path) -> dict[str, Path]:
    """The tiny data's test images as a flat folder (no class folders), an ImageFolder with two loose images beside
    its class folders, and its train split alone under train/ (in a wrapping folder, as in an archive)."""
    import shutil

    tests = sorted((tiny_folder / "test").rglob("*.png"))
    (root / "flat").mkdir()
    for i, image in enumerate(tests):
        shutil.copy(image, root / "flat" / f"{i:03d}.png")
    shutil.copytree(tiny_folder / "test", root / "loose")
    shutil.copy(tests[0], root / "loose" / "stray.png")
    shutil.copytree(tiny_folder / "train", root / "wrap" / "train_only" / "train")
    return {name: root / name for name in ("flat", "loose", "wrap")}


def test_embed_of_a_flat_folder_gives_the_same_features_unlabelled(run, tmp_path, tiny_folder, capsys):
    """Images without class folders were refused ('no images in <class>/<image> folders'): they embed, labels -1."""
    data = _layouts(tiny_folder, tmp_path)
    assert main(["embed", str(run), "--data", str(tiny_folder / "test"), "--out", str(tmp_path / "ref.npz")]) == 0
    assert main(["embed", str(run), "--data", str(data["flat"]), "--out", str(tmp_path / "flat.npz")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("32 images, no class folders (labels -1), 32-d")
    ref, flat = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "flat.npz")
    np.testing.assert_array_equal(flat["features"], ref["features"])  # the same images in the same (sorted) order
    assert flat["labels"].tolist() == [-1] * 32 and flat["classes"].size == 0
    assert flat["paths"].tolist() == [f"{i:03d}.png" for i in range(32)]


@pytest.mark.parametrize(
    "layout,split,message",
    [
        (
            "flat",
            "test",
            "--split test: {data} has no split folders (train/, val/, test/, unlabeled/): it is one set of images "
            "(images without class folders); drop --split to embed all of them",
        ),
        (
            "loose",
            "train",
            "--split train: {data} has no split folders (train/, val/, test/, unlabeled/): it is one set of "
            "images (<class>/<image>); drop --split to embed all of them",
        ),
        (
            "wrap",
            None,
            "{data} has no train_only/test/ or train_only/val/ folder (the default split); its split "
            "folders: train/; give --split train",
        ),
        (
            "wrap",
            "test",
            "--split test: {data} has no train_only/test/ folder; its split folders: train/; give --split train",
        ),
    ],
    ids=["flat", "classes", "default-split", "named-split"],
)
def test_embed_refuses_a_split_the_data_does_not_have(layout, split, message, run, tmp_path, tiny_folder, capsys):
    """--split was ignored on data without split folders (the whole folder embedded), and a lone train/ folder was
    taken for a wrapping folder (its images embedded for the default --split test)."""
    data = _layouts(tiny_folder, tmp_path)[layout]
    argv = ["embed", str(run), "--data", str(data), "--out", str(tmp_path / "f.npy")]
    assert main([*argv, *(["--split", split] if split else [])]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "directpred: error: " + message.format(data=data)
    assert not (tmp_path / "f.npy").exists()


def test_embed_refuses_an_output_that_is_neither_npy_nor_npz(run, tmp_path, tiny_folder, capsys):
    """--out feats.txt wrote feats.txt.npy and feats.txt.labels.npy after the work; now it is refused before it (an
    extensionless --out still gets .npy)."""
    argv = ["embed", str(run), "--data", str(tiny_folder), "--split", "train", "--out"]
    assert main([*argv, str(tmp_path / "feats.txt")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'feats.txt'}: give a .npy file" in err and ".txt is neither" in err
    assert list(tmp_path.glob("feats*")) == []
    assert main([*argv, str(tmp_path / "feats")]) == 0
    assert sorted(p.name for p in tmp_path.glob("feats*")) == ["feats.labels.npy", "feats.npy"]


def test_embed_warns_about_images_beside_the_class_folders(run, tmp_path, tiny_folder, capsys):
    data = _layouts(tiny_folder, tmp_path)["loose"]
    assert main(["embed", str(run), "--data", str(data), "--out", str(tmp_path / "f.npz")]) == 0
    assert np.load(tmp_path / "f.npz")["labels"].size == 32  # the 32 in class folders
    assert (
        f"{data}: 1 image(s) directly under './' are in no <class>/ folder and are left out (e.g. stray.png); move "
        "them into one to embed them" in capsys.readouterr().err
    )
    assert (
        main(
            [
                "embed",
                str(run),
                "--data",
                str(data.parent / "wrap"),
                "--split",
                "train",
                "--out",
                str(tmp_path / "t.npz"),
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "t.npz")["paths"][0].startswith("train_only/train/class0/")


def test_a_class_named_like_a_split_is_a_class_not_a_split(tmp_path):
    """A top folder named train/ (CIFAR-100 has a class 'train') switched the whole folder to the split layout: the
    folder was refused without --split, and --split train embedded that class alone, unlabelled. Folders are splits
    only when all of them are named train/, val/ or test/."""
    from directpred.data.datasets import DataError
    from directpred.export import read_image_folder

    images, _ = synthetic_images(2, 3, size=8)
    root = tmp_path / "root"
    for i, name in enumerate(("apple", "bus", "train")):
        (root / "data" / name).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(images[2 * i + j]).save(root / "data" / name / f"{j}.png")
    for data in (root / "data", write_tar(root / "data", tmp_path / "data.tar.gz")):
        arrays, names = read_image_folder(data, image_size=8)
        assert arrays.classes == ["apple", "bus", "train"] and arrays.labels.tolist() == [0, 0, 1, 1, 2, 2]
        assert names == [f"{c}/{j}.png" for c in ("apple", "bus", "train") for j in range(2)]
        np.testing.assert_array_equal(arrays.images.numpy(), np.stack(images))
        with pytest.raises(DataError) as err:
            read_image_folder(data, image_size=8, split="train")
        assert str(err.value) == (
            f"--split train: {data} has no split folders (train/, val/, test/, unlabeled/): it is one set of images "
            "(<class>/<image> whose class folders apple/, bus/, train/ are not all split names, so train/ is a "
            "class); drop --split to embed all of them"
        )
    # Under a wrapping folder (an archive of data/), the same.
    wrapped = write_tar(root, tmp_path / "wrapped.tar.gz")
    arrays, names = read_image_folder(wrapped, image_size=8)
    assert arrays.classes == ["apple", "bus", "train"] and names[0] == "data/apple/0.png"


def test_export_loads_into_torchvision_resnet18(tmp_path):
    """Standard width and stem: the exported state dict is torchvision.models.resnet18's (fc removed)."""
    cfg = load_config(
        None,
        [
            "backbone.width=64",
            "backbone.cifar_stem=false",
            "data.image_size=64",
            "data.dataset=folder",
            f"data.path={tmp_path}",
        ],
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    save_checkpoint(tmp_path / "ck.pt", {"model": method.state_dict(), "config": cfg.to_dict(), "step": 7})
    assert main(["export", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "b.pt")]) == 0
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    tv.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), method.encoder.backbone.eval()(x), **TOL)


def test_onnx_export(run, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install onnx onnxscript)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    feats, data, test_recipe = _reference(run)
    assert main(["export", str(run), "--out", str(tmp_path / "b.pt"), "--onnx", str(tmp_path / "b.onnx")]) == 0
    onnx.checker.check_model(str(tmp_path / "b.onnx"))
    session = ort.InferenceSession(str(tmp_path / "b.onnx"))
    x = eval_transform(data.test.images, test_recipe).numpy()
    np.testing.assert_allclose(session.run(None, {"images": x})[0], feats["test"].numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_onnx_export_without_its_packages_names_the_install_and_writes_nothing(missing, run, tmp_path, monkeypatch):
    """export_backbone(onnx=F) without onnx wrote the backbone file (and the TorchScript one), then failed with a
    bare ModuleNotFoundError; without onnxscript, torch.onnx.export failed the same way after the writes."""
    import types

    from directpred.config import install_hint
    from directpred.export import export_backbone

    for package in ("onnx", "onnxscript"):  # as if installed, except `missing` (`import` raises ImportError)
        monkeypatch.setitem(sys.modules, package, None if package == missing else types.ModuleType(package))
    out, ts, graph = tmp_path / "b.pt", tmp_path / "b.ts", tmp_path / "b.onnx"
    with pytest.raises(ModuleNotFoundError) as info:
        export_backbone(run, out, torchscript=ts, onnx=graph)
    assert str(info.value) == (
        f"export_backbone(onnx=...) needs the {missing} package, which is not installed: {install_hint('onnx')}"
    )
    assert info.value.name == missing and isinstance(info.value, ImportError)  # what callers caught before
    assert not out.exists() and not ts.exists() and not graph.exists()


def test_embed_restores_the_callers_mode_and_gives_zero_rows_of_width_d(run):
    """embed left the caller's model in eval mode and returned shape (0, 0) for no images; extract_features restores
    the mode and gives (0, D)."""
    from directpred.export import embed

    feats, data, test_recipe = _reference(run)
    backbone = directpred.load_backbone(run).train()
    torch.testing.assert_close(embed(backbone, data.test.images, test_recipe, batch_size=7), feats["test"], **TOL)
    assert backbone.training and all(m.training for m in backbone.modules())
    assert embed(backbone, data.test.images[:0], test_recipe).shape == (0, 32) == (0, feats["test"].shape[1])
    assert backbone.training
    assert extract_features(backbone, data.test.images[:0], test_recipe).shape == (0, 32)
    backbone.eval()
    embed(backbone, data.test.images[:3], test_recipe)
    assert not backbone.training

    def failing(x):
        raise RuntimeError("out of memory")

    backbone.train()
    backbone.forward = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        embed(backbone, data.test.images, test_recipe)
    assert backbone.training  # also when a batch fails


def test_weights_of_another_architecture_give_an_error_that_names_it(run, tmp_path):
    # A checkpoint of another run given with --checkpoint (or an export file whose arch does not match its weights)
    # raised torch's page of missing/unexpected keys from build(), and export_backbone wrote such a file silently.
    from directpred.export import export_backbone, read_backbone
    from directpred.train.checkpoint import CheckpointError

    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state["model"] = {k.replace("layer4.1.", "layer4.2."): v for k, v in state["model"].items()}  # a deeper net's
    save_checkpoint(tmp_path / "foreign.pt", state)
    msg = (
        r"the backbone weights do not fit a resnet18 \(width=4, cifar_stem=True\), the run's backbone; is "
        + str(tmp_path / "foreign.pt").replace(".", r"\.")
        + r" a checkpoint of the run .*: 10 missing keys \(layer4\.1\.conv1\.weight, .*, \.\.\.\); 12 unexpected keys"
    )
    with pytest.raises(CheckpointError, match=msg):
        read_backbone(run, checkpoint=tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=msg):
        export_backbone(run, tmp_path / "bb.pt", checkpoint=tmp_path / "foreign.pt")
    assert not (tmp_path / "bb.pt").exists()
    with pytest.raises(CheckpointError, match="does not describe its weights"):
        directpred.load_backbone(tmp_path / "foreign.pt")
    exported = export_backbone(run, tmp_path / "ok.pt").to_dict()
    torch.save({**exported, "arch": "resnet34"}, tmp_path / "arch34.pt")
    with pytest.raises(
        CheckpointError, match=r"do not fit a resnet34 \(width=4, cifar_stem=True\): \d+ missing keys \(layer1\.2\."
    ):
        directpred.load_backbone(tmp_path / "arch34.pt")


def test_an_exported_file_of_another_version_or_missing_fields_is_refused(run, tmp_path):
    # A version-2 file was read as version 1 without a word; a file missing a field raised KeyError('width').
    from directpred.export import export_backbone
    from directpred.train.checkpoint import CheckpointError

    exported = export_backbone(run, tmp_path / "ok.pt").to_dict()
    torch.save({**exported, "version": 2}, tmp_path / "v2.pt")
    with pytest.raises(
        CheckpointError, match="v2.pt is an exported backbone of format version 2; this directpred reads version 1"
    ):
        directpred.load_backbone(tmp_path / "v2.pt")
    torch.save({k: v for k, v in exported.items() if k != "width"}, tmp_path / "nowidth.pt")
    with pytest.raises(CheckpointError, match=r"nowidth.pt is an exported backbone without \['width'\]"):
        directpred.load_backbone(tmp_path / "nowidth.pt")
    assert directpred.load_backbone(tmp_path / "ok.pt").recipe.size == exported["image_size"]


def test_overrides_or_checkpoint_for_an_exported_file_are_refused_not_ignored(run, tmp_path):
    """read_backbone(exported_file, overrides=...) returned the file's backbone as if no override had been given
    (and checkpoint= for a file source was ignored the same way)."""
    from directpred.export import export_backbone, read_backbone

    export_backbone(run, tmp_path / "bb.pt")
    over = ["data.image_size=24"]
    with pytest.raises(ConfigError) as info:
        read_backbone(tmp_path / "bb.pt", overrides=over)
    assert str(info.value) == (
        f"overrides ['data.image_size=24'] cannot apply to {tmp_path / 'bb.pt'}, an exported backbone: it records "
        "its architecture and evaluation recipe, not a configuration to rebuild them from. Drop the overrides, or "
        "give the run directory or checkpoint it was exported from"
    )
    last = run / "checkpoints" / "last.pt"
    with pytest.raises(ConfigError, match=r"picks a checkpoint of a run directory, but .*bb\.pt is a file; give "):
        read_backbone(tmp_path / "bb.pt", checkpoint=last)
    with pytest.raises(ConfigError, match=r"picks a checkpoint of a run directory, but .*last\.pt is a file"):
        read_backbone(last, checkpoint=last)
    # the run directory and its checkpoint take the same override (a valid key), and it reaches the config
    for source in (run, last):
        assert read_backbone(source, overrides=["eval.knn_k=7"]).config["eval"]["knn_k"] == 7


def test_a_checkpoint_without_its_image_size_says_how_to_give_it(run, tmp_path):
    """The message said --set data.image_size=N, which export and embed do not have; read_backbone's overrides
    (now refused only for exported files) give it."""
    from directpred.export import read_backbone

    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state.pop("image_size")
    state["config"]["data"]["image_size"] = 0  # a folder data set: no size to infer from the dataset's name
    save_checkpoint(tmp_path / "old.pt", state)
    with pytest.raises(ConfigError, match=r"read_backbone\(\.\.\., overrides=\['data\.image_size=N'\]\) in Python"):
        read_backbone(tmp_path / "old.pt")
    assert read_backbone(tmp_path / "old.pt", overrides=["data.image_size=24"]).image_size == 24


def test_embed_of_a_streamed_run_decodes_and_crops_as_its_evaluation(tmp_path, capsys):
    """A streamed run evaluates test images resized to data.decode_size and centre-cropped to data.image_size;
    embed (and load_backbone's recorded decode_size) gave features of the whole image resized to image_size
    instead (max |diff| 6 against the run's own features)."""
    from conftest import tiny_override_list, write_folder

    from directpred.data.stream import open_reader
    from directpred.eval.stream_eval import stream_features
    from directpred.export import read_backbone

    folder = write_folder(tmp_path / "data", n_train=16, n_test=8, size=48)
    sets = tiny_override_list(folder, tmp_path / "cache") + [
        "data.stream=true",
        "data.image_size=32",
        "data.decode_size=40",
        "train.max_steps=1",
        "train.batch_size=8",
    ]
    run_dir = tmp_path / "run"
    assert (
        main(
            ["train", str(REPO / "configs/cpu/quickstart.yaml"), "--out", str(run_dir)]
            + [a for s in sets for a in ("--set", s)]
        )
        == 0
    )
    exp = read_backbone(run_dir)
    assert (exp.image_size, exp.decode_size, exp.decode_side) == (32, 40, 40)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "b.pt")]) == 0
    exported = read_backbone(tmp_path / "b.pt")
    assert exported.decode_side == 40 and directpred.load_backbone(tmp_path / "b.pt").decode_size == 40
    net = exp.build()
    reader = open_reader(str(folder), "test")
    with torch.no_grad():
        own = torch.cat([f for f, _ in stream_features(net, reader, exp.recipe, decode_size=40)])
    assert main(["embed", str(tmp_path / "b.pt"), "--data", str(folder), "--out", str(tmp_path / "f.npz")]) == 0
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "f.npz")["features"]), own, **TOL)


def test_export_refuses_to_overwrite_a_runs_training_state(run, tmp_path, capsys):
    """`export RUN --out RUN/checkpoints/last.pt` replaced the run's training checkpoint with the export (the run
    could no longer resume); so did --torchscript onto another run's checkpoint. Refused before any work, naming the
    file; a copied training checkpoint elsewhere is recognised by its content. An earlier export is overwritten."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    last = copy / "checkpoints" / "last.pt"
    before = last.read_bytes()
    for option in ("--out", "--torchscript"):
        out = str(last) if option == "--out" else str(tmp_path / "b.pt")
        extra = [option, str(last)] if option != "--out" else []
        assert main(["export", str(run), "--out", out, *extra]) == 1
        err = capsys.readouterr().err
        assert f"{option} {last} is a file in the run {copy}'s checkpoints/" in err, err
    stray = tmp_path / "saved_state.pt"
    shutil.copy(last, stray)
    assert main(["export", str(run), "--out", str(stray)]) == 1
    assert f"--out {stray} is a training checkpoint" in capsys.readouterr().err
    assert last.read_bytes() == before and stray.read_bytes() == before
    assert main(["export", str(run), "--out", str(tmp_path / "b.pt")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "b.pt")]) == 0  # an export is not training state
