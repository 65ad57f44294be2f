"""The streamed data path inside training and evaluation: the ImageNet configs run, streaming trains exactly as the
in-memory path, shards as folders, mid-epoch resume is exact, kNN and BYOL's linear evaluation stream."""

from __future__ import annotations

import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import write_mixed_folder

from directpred.cli import main
from directpred.config import ConfigError, load_config
from directpred.data.augment import recipe
from directpred.data.datasets import DataError
from directpred.data.stream import FolderReader, iterate_split
from directpred.eval.knn import KNNClassifier
from directpred.eval.stream_eval import ByolLinearEval, knn_stream, stream_features
from directpred.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
IMAGENET_CONFIGS = sorted((REPO / "configs" / "imagenet").glob("*.yaml"))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    return write_mixed_folder(tmp_path_factory.mktemp("jpegs") / "data", n_per_class=10, classes=3)


def stream_overrides(tiny_overrides: list[str], path: Path, size: int = 32) -> list[str]:
    return tiny_overrides + [
        f"data.path={path}",
        "data.stream=true",
        f"data.image_size={size}",
        f"data.decode_size={size + 4}",
        "data.workers=0",
        "data.augment=imagenet",
        "backbone.width=4",
        "train.batch_size=8",
        "eval.linear=false",
        "eval.knn_every=0",
    ]


@pytest.mark.parametrize("path", IMAGENET_CONFIGS, ids=lambda p: p.stem)
def test_imagenet_configs_load_and_run_two_steps(path, tiny_overrides, jpegs, tmp_path):
    cfg = load_config(path, stream_overrides(tiny_overrides, jpegs) + ["train.max_steps=2"])
    assert cfg.data.stream and cfg.eval.linear_protocol == "byol" and cfg.data.augment == "imagenet"
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["steps"] == 2 and 0.0 <= summary["knn_top1"] <= 100.0


def test_paper_settings_of_the_imagenet_configs():
    c60 = load_config(REPO / "configs/imagenet/byol_directpred_60ep.yaml", ["data.path=/"])
    c300 = load_config(REPO / "configs/imagenet/byol_mlp_300ep.yaml", ["data.path=/"])
    assert (c60.backbone.name, c60.projector.out_dim, c60.method.symmetric_loss, c60.optim.name) == (
        "resnet50",
        256,
        False,
        "sgd",
    )
    assert c60.train.batch_size * 8 == 256 and c60.predictor.name == "directpred" and c60.predictor.freq == 1
    assert (c300.method.symmetric_loss, c300.optim.name, c300.optim.schedule) == (True, "lars", "warmup_cosine")
    assert c300.train.batch_size * 32 == 4096 and c300.predictor.hidden_dim == 4096
    v1, v2 = recipe(c60.data.augment, c60.data.image_size)
    assert (v1.size, v1.brightness, v1.contrast, v1.saturation, v1.hue, v1.jitter_p, v1.gray_p) == (
        224,
        0.4,
        0.4,
        0.2,
        0.1,
        0.8,
        0.2,
    )
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p, v1.crop_scale) == (1.0, 0.1, 0.0, 0.2, (0.08, 1.0))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def _same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def in_memory_overrides(tiny_overrides: list[str], jpegs: Path) -> list[str]:
    """The JPEG folder decoded into memory at 24 px, ImageNet-style views, batch 8, 2 epochs (the streamed runs'
    counterpart with ``data.stream=true``)."""
    return tiny_overrides + [
        f"data.path={jpegs}",
        "data.image_size=24",
        "data.augment=imagenet",
        "train.batch_size=8",
        "train.epochs=2",
    ]


def test_streamed_training_equals_in_memory_training(tiny_overrides, jpegs, tmp_path):
    """Same pixels, same order, same draws: the streamed run ends bit-identical to the in-memory one."""
    common = in_memory_overrides(tiny_overrides, jpegs)
    mem = Trainer(load_config(None, common), tmp_path / "mem").fit()
    lazy = Trainer(load_config(None, common + ["data.stream=true", "data.workers=1"]), tmp_path / "lazy").fit()
    assert mem["steps"] == lazy["steps"] == 6
    _same(tmp_path / "mem", tmp_path / "lazy")
    assert lazy["knn_top1"] == pytest.approx(mem["knn_top1"], abs=1e-9)


def test_shards_train_as_the_folder_and_mid_epoch_resume_is_exact(tiny_overrides, jpegs, tmp_path):
    shards = tmp_path / "shards"
    assert main(["shards", str(jpegs), "--out", str(shards), "--shard-size", "7", "--splits", "train", "test"]) == 0
    base = stream_overrides(tiny_overrides, jpegs) + ["train.epochs=2"]  # 30 images, batch 8: 3 steps an epoch
    Trainer(load_config(None, base), tmp_path / "folder").fit()
    on_shards = base + [f"data.path={shards}", "data.workers=2"]
    Trainer(load_config(None, on_shards + ["train.max_steps=4"]), tmp_path / "part").fit()  # stops mid-epoch 2
    assert main(["train", "--resume", str(tmp_path / "part"), "--set", "train.max_steps=0"]) == 0
    _same(tmp_path / "folder", tmp_path / "part")


def test_a_streamed_resume_on_other_data_is_refused_and_on_a_moved_copy_is_exact(
    tiny_overrides, jpegs, tmp_path, capsys
):
    """Streamed data records the same as in-memory data in the checkpoint: a resume reading other files (16 images in
    4 classes instead of 30 in 3) is refused before a step, naming the change; a moved copy resumes exactly."""
    base = stream_overrides(tiny_overrides, jpegs) + ["train.epochs=2"]  # 30 images, batch 8: 3 steps an epoch
    Trainer(load_config(None, base), tmp_path / "full").fit()
    run = tmp_path / "part"
    Trainer(load_config(None, base + ["train.max_steps=4"]), run).fit()  # stops mid-epoch 2
    other = write_mixed_folder(tmp_path / "other", n_per_class=4, classes=4)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=0", "--set", f"data.path={other}"]) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(
            f"directpred: error: {run / 'checkpoints' / 'last.pt'} was trained on other data than data.path={other} "
            "holds (training images 30 -> 16; steps per epoch 3 -> 2; classes 3 -> 4); resume with the run's own data"
        )
    )
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    shutil.copytree(jpegs, tmp_path / "moved")
    args = ["--set", "train.max_steps=0", "--set", f"data.path={tmp_path / 'moved'}"]
    assert main(["train", "--resume", str(run), *args]) == 0
    _same(tmp_path / "full", run)


def test_knn_stream_equals_the_in_memory_classifier():
    g = torch.Generator().manual_seed(0)
    f_train, y_train = torch.randn(300, 16, generator=g), torch.randint(0, 5, (300,), generator=g)
    f_test, y_test = torch.randn(70, 16, generator=g), torch.randint(0, 5, (70,), generator=g)
    for k in (7, 200, 400):  # 400 > N: fewer neighbours than k
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = KNNClassifier(k=k, temperature=0.1).fit(f_train, y_train).score(f_test, y_test)
        assert [str(w.message) for w in caught] == (
            ["kNN: k=400 is more than the 300 labelled training images; k=300 is used (eval.knn_k)"] if k > 300 else []
        )
        chunks = ((f_train[s : s + 32], y_train[s : s + 32]) for s in range(0, 300, 32))
        with warnings.catch_warnings(record=True) as streamed:  # the same warning as the in-memory classifier's
            warnings.simplefilter("always")
            assert knn_stream(f_test, y_test, chunks, num_classes=5, k=k, temperature=0.1) == pytest.approx(ref)
        assert [str(w.message) for w in streamed] == [str(w.message) for w in caught]


class CountingReader:
    """A reader that counts the images read (the probe must read batches, never the whole set at once)."""

    def __init__(self, reader: FolderReader) -> None:
        self.inner, self.labels, self.classes, self.reads = reader, reader.labels, reader.classes, 0

    def __len__(self) -> int:
        return len(self.inner)

    def name(self, i: int) -> str:
        return self.inner.name(i)

    def read(self, i: int) -> bytes:
        self.reads += 1
        return self.inner.read(i)


def test_byol_linear_evaluation_streams_and_scores_top1_top5(jpegs):
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    train, test = (
        CountingReader(FolderReader(jpegs, "train")),
        CountingReader(FolderReader(jpegs, "test", classes=FolderReader(jpegs, "train").classes)),
    )
    r = recipe("imagenet", 24)[1]
    ev = ByolLinearEval(epochs=3, lr=0.5, batch_size=6, seed=1).fit(
        backbone, train, test, r, decode_size=28, num_classes=3, feature_dim=8
    )
    steps = len(train) // 6
    assert train.reads == 3 * steps * 6 and test.reads == 3 * len(test)  # batch by batch, every epoch afresh
    # The reported scores against an independent computation on all (centre-crop) test features.
    feats, labels = zip(*stream_features(backbone, test.inner, r, decode_size=28, batch_size=4))
    logits = ev.linear_(torch.cat(feats))
    y = torch.cat(labels)
    top1 = float((logits.argmax(1) == y).float().mean())
    top2 = float((logits.topk(2, 1).indices == y[:, None]).any(1).float().mean())
    assert ev.top1_ == pytest.approx(top1) and math.isnan(ev.top5_)  # 3 classes: no top-5 (it would be 100 %)
    assert ev.history_[-1][0] == pytest.approx(top1) and top2 >= top1
    assert ev.best_top1_ == max(h[0] for h in ev.history_)
    # The test crops are the centre image_size crop of the decode_size image (resize 256 / centre crop 224).
    ((crop, _),) = list(iterate_split(test.inner, 28, crop=24, batch_size=len(test)))
    ((full, _),) = list(iterate_split(test.inner, 28, batch_size=len(test)))
    assert torch.equal(crop, full[:, :, 2:26, 2:26])


def test_byol_linear_evaluation_top5_is_the_top5_with_more_than_five_classes(tmp_path):
    """Top-5 against an independent count on 7 classes; with 5 classes or fewer it was a trivial 100 % (every label
    is in the top 5) printed as a result: now NaN in the estimator and no figure in the evaluation's output. The
    accuracies are exact shares (float32 division put 66.66666865 % into summary.json)."""
    data = write_mixed_folder(tmp_path / "data", n_per_class=3, classes=7)
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    train = FolderReader(data, "train")
    test = FolderReader(data, "test", classes=train.classes)
    r = recipe("imagenet", 24)[1]
    ev = ByolLinearEval(epochs=1, lr=0.5, batch_size=6, seed=1).fit(
        backbone, train, test, r, decode_size=28, num_classes=7, feature_dim=8
    )
    feats, labels = zip(*stream_features(backbone, test, r, decode_size=28, batch_size=4))
    logits, y = ev.linear_(torch.cat(feats)), torch.cat(labels)
    hits1 = int((logits.argmax(1) == y).sum())
    hits5 = int((logits.topk(5, 1).indices == y[:, None]).any(1).sum())
    assert 0 < hits5 < len(y)  # a non-trivial top-5
    assert ev.history_[-1] == (hits1 / len(y), hits5 / len(y))  # exact shares, not float32 divisions


def test_byol_linear_evaluation_scales_its_base_rate_by_the_global_batch_as_byol_does(jpegs, monkeypatch):
    """BYOL's code applies base_learning_rate x global batch / 256 (utils/schedules.py), then a cosine decay to 0;
    the rate was applied unscaled (0.2 at 1024 images a step, a quarter of BYOL's 0.8)."""
    rates: list[float] = []
    step = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    train = FolderReader(jpegs, "train")
    test = FolderReader(jpegs, "test", classes=train.classes)
    ev = ByolLinearEval(epochs=2, lr=0.4, batch_size=6, seed=1).fit(
        backbone, train, test, recipe("imagenet", 24)[1], decode_size=28, num_classes=3, feature_dim=8
    )
    total = 2 * (len(train) // 6)
    assert ev.peak_lr_ == pytest.approx(0.4 * 6 / 256)
    assert rates == pytest.approx([0.4 * 6 / 256 * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)])


class _NaNFirstRow(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x[:1], float("nan")), x[1:]])


def test_byol_linear_evaluation_of_nonfinite_features_is_nan(jpegs):
    """NaN features made the classifier's weights NaN and its argmax arbitrary: a chance-level top-1 that looked
    real. It is NaN now, with a warning."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), _NaNFirstRow()
    )
    train = FolderReader(jpegs, "train")
    test = FolderReader(jpegs, "test", classes=train.classes)
    with pytest.warns(RuntimeWarning, match=r"linear evaluation: the classifier's weights are non-finite"):
        ev = ByolLinearEval(epochs=2, lr=0.5, batch_size=6, seed=1).fit(
            backbone, train, test, recipe("imagenet", 24)[1], decode_size=28, num_classes=3, feature_dim=8
        )
    assert all(math.isnan(a) for h in ev.history_ for a in h) and math.isnan(ev.top1_) and math.isnan(ev.best_top1_)


class _FailsAtCall(torch.nn.Module):
    """A backbone (conv + pooling, 8 features) whose forward pass number ``n`` raises, as an out-of-memory would."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("out of memory (simulated)")
        return self.net(x)


def test_a_failed_feature_pass_gives_the_backbone_back_in_the_callers_mode(jpegs):
    """extract_features and ByolLinearEval.fit switched the backbone to eval mode and back only on success: after an
    exception (a CUDA out-of-memory caught by the caller, an interrupt) a training caller went on with frozen
    BatchNorm statistics. stream_features already restored it; all three do now."""
    from directpred.eval.features import extract_features

    train = FolderReader(jpegs, "train")
    test = FolderReader(jpegs, "test", classes=train.classes)
    images = torch.randint(0, 256, (10, 24, 24, 3), dtype=torch.uint8)
    passes = [
        lambda net: extract_features(net, images, recipe("imagenet", 24)[1], batch_size=4),  # fails in batch 2
        lambda net: list(stream_features(net, train, recipe("imagenet", 24)[1], decode_size=28, batch_size=4)),
        lambda net: ByolLinearEval(epochs=1, batch_size=4).fit(
            net, train, test, recipe("imagenet", 24)[1], decode_size=28, num_classes=3, feature_dim=8
        ),
    ]
    for run in passes:
        for mode in (True, False):
            net = _FailsAtCall(2).train(mode)
            with pytest.raises(RuntimeError, match="out of memory"):
                run(net)
            assert net.calls == 2 and net.training is mode and net.net[0].training is mode


def test_a_byol_evaluation_batch_larger_than_the_training_set_names_the_key_and_the_fix(jpegs):
    train = FolderReader(jpegs, "train")
    test = FolderReader(jpegs, "test", classes=train.classes)
    n = len(train)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ConfigError) as info:
        ByolLinearEval(epochs=1, batch_size=n + 1).fit(
            net, train, test, recipe("imagenet", 24)[1], decode_size=28, num_classes=3, feature_dim=8
        )
    assert str(info.value) == (
        f"eval.linear_batch_size={n + 1} is not allowed: BYOL's linear evaluation takes {n + 1} images per process x "
        f"1 process(es) per step, more than the {n} training images, so an epoch would have no step; set it to at "
        f"most {n} (e.g. --set eval.linear_batch_size={n})"
    )
    assert isinstance(info.value, ValueError)
    ev = ByolLinearEval(epochs=1, batch_size=n).fit(  # the suggested value: one step per epoch
        net, train, test, recipe("imagenet", 24)[1], decode_size=28, num_classes=3, feature_dim=8
    )
    assert len(ev.history_) == 1


def test_the_batch_error_counts_the_processes(jpegs, monkeypatch):
    """Under N processes the per-process batch may be at most images // N; with more processes than images no batch
    fits. (The check runs before any collective, so a faked world size reaches it.)"""
    from directpred import distributed

    train = FolderReader(jpegs, "train")
    n = len(train)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    for world, batch, fix in (
        (2, n, f"set it to at most {n // 2} (e.g. --set eval.linear_batch_size={n // 2})"),
        (n + 1, 1, "run the evaluation with fewer processes"),
    ):
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        with pytest.raises(ConfigError, match=rf"x {world} process\(es\) per step, .*no step; {re.escape(fix)}$"):
            ByolLinearEval(epochs=1, batch_size=batch).fit(
                net, train, train, recipe("imagenet", 24)[1], decode_size=28, num_classes=3, feature_dim=8
            )


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.stream=true"], "data.image_size=0 is not allowed: a streamed data set"),
        (
            ["data.stream=true", "data.image_size=32", "data.decode_size=24"],
            "data.decode_size=24 is not allowed: must be >= data.image_size=32",
        ),
        (
            ["data.stream=true", "data.image_size=32", "data.train_subset=10"],
            "data.train_subset=10 is not allowed: subsets",
        ),
        (["eval.linear_protocol=byol"], "eval.linear_protocol='byol' is not allowed: the byol protocol streams"),
    ],
)
def test_stream_config_errors_name_the_key(overrides, needle, jpegs):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, ["data.dataset=folder", f"data.path={jpegs}", *overrides])


def test_streamed_data_errors_name_the_fix(tmp_path, tiny_overrides, jpegs):
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    cfg = load_config(None, stream_overrides(tiny_overrides, root))
    with pytest.raises(DataError, match=r"train/a: empty class folder; remove it or add images"):
        Trainer(cfg, tmp_path / "run1").setup()
    shutil.copy(next((jpegs / "train").rglob("*.JPEG")), root / "train" / "a" / "x.JPEG")
    with pytest.raises(
        DataError, match=r"no val/ or test/ folder of class folders; a streamed data set is laid out as"
    ):
        Trainer(cfg, tmp_path / "run2").setup()


def test_corrupt_count_survives_a_resume(tiny_overrides, jpegs, tmp_path):
    """summary.json's skipped_corrupt counts the streamed replacements of the whole run, before and after a stop."""
    from directpred.train import Callback, TrainingInterrupted

    root = tmp_path / "bad"
    shutil.copytree(jpegs, root)
    victim = sorted((root / "train" / "n00000001").glob("*.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    over = stream_overrides(tiny_overrides, root) + ["data.skip_corrupt=true", "train.epochs=2"]
    with pytest.warns(RuntimeWarning, match="corrupt"):
        reference = Trainer(load_config(None, over), tmp_path / "ref").fit()
    assert reference["skipped_corrupt"] == 2  # met once an epoch

    class StopAfterEpoch1(Callback):
        def on_step_end(self, trainer, result) -> None:
            if trainer.step == trainer.steps_per_epoch:
                trainer.request_stop()

    with pytest.warns(RuntimeWarning, match="corrupt"), pytest.raises(TrainingInterrupted):
        Trainer(load_config(None, over), tmp_path / "run", callbacks=[StopAfterEpoch1()]).fit()
    with pytest.warns(RuntimeWarning, match="corrupt"):
        resumed = Trainer(load_config(None, over), tmp_path / "run", resume=True).fit()
    assert resumed["skipped_corrupt"] == 2


def test_a_streamed_run_resumes_from_its_folder_onto_its_shards_but_not_onto_reencoded_images(
    tiny_overrides, jpegs, tmp_path
):
    """The shards `directpred shards` writes hold the folder's files unchanged, so a run stopped on the folder
    resumes on its shards (data.path moved) and ends as the uninterrupted run; the same images encoded again (same
    count, classes and sizes, other bytes) are refused by the data check's digest of 32 files."""
    from PIL import Image

    from directpred.train import TrainingError

    base = stream_overrides(tiny_overrides, jpegs) + ["train.epochs=2"]  # 30 images, batch 8: 3 steps an epoch
    Trainer(load_config(None, base), tmp_path / "full").fit()
    run = tmp_path / "part"
    Trainer(load_config(None, base + ["train.max_steps=4"]), run).fit()  # stops mid-epoch 2
    reencoded = tmp_path / "reencoded"
    shutil.copytree(jpegs, reencoded)
    for f in sorted((reencoded / "train").rglob("*.JPEG")):
        with Image.open(f) as im:
            im.load()
        im.save(f, quality=60)
    with pytest.raises(TrainingError, match=re.escape("(other images: the same count, classes and size, but a")):
        Trainer(load_config(None, base + [f"data.path={reencoded}"]), run, resume=True).fit()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    shards = tmp_path / "shards"
    assert main(["shards", str(jpegs), "--out", str(shards), "--shard-size", "7", "--splits", "train", "test"]) == 0
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=0", "--set", f"data.path={shards}"]) == 0
    _same(tmp_path / "full", run)


def test_a_run_resumes_from_memory_onto_the_stream_of_the_same_folder(tiny_overrides, jpegs, tmp_path):
    """In memory and streamed, the same folder gives the same pixels and order (the runs are bit-identical), but the
    data check's digests differ in kind (decoded pixels, file bytes): they are not compared, so a --force resume
    that switches to streaming goes on, and ends as the uninterrupted in-memory run."""
    common = in_memory_overrides(tiny_overrides, jpegs)
    Trainer(load_config(None, common), tmp_path / "full").fit()
    run = tmp_path / "part"
    Trainer(load_config(None, common + ["train.max_steps=4"]), run).fit()
    switch = ["--force", "--set", "data.stream=true", "--set", "data.workers=0", "--set", "train.max_steps=0"]
    assert main(["train", "--resume", str(run), *switch]) == 0
    _same(tmp_path / "full", run)


def test_an_unreadable_sampled_file_fails_the_digest_or_is_hashed_as_replaced(jpegs):
    """content_fingerprint reads 32 files of a streamed split: one that cannot be read is named (before any step:
    the trainer takes the digest in setup) unless data.skip_corrupt replaces it, as the stream does."""
    from directpred.data.stream import StreamSplit, content_fingerprint

    reader = FolderReader(jpegs)
    ref = content_fingerprint(StreamSplit(reader))
    assert ref.startswith("bytes:") and content_fingerprint(StreamSplit(reader), skip_corrupt=True) == ref

    class Unreadable(FolderReader):
        def read(self, i: int) -> bytes:
            if i == 0:
                raise PermissionError(13, "Permission denied")
            return super().read(i)

    broken = StreamSplit(Unreadable(jpegs))
    with pytest.raises(DataError, match=re.escape(f"{reader.name(0)}: cannot read it (Permission denied); fix its")):
        content_fingerprint(broken)
    assert content_fingerprint(broken, skip_corrupt=True) not in (ref, None)
