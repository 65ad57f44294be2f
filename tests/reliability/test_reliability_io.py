"""Bad data named or skipped end to end, output problems failing clearly with the previous checkpoint intact, and
resume from a mid-epoch checkpoint equal to an uninterrupted run."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import tarfile

import pytest
import torch
from conftest import png_bytes, synthetic_images, write_folder

from directpred.cli import main
from directpred.config import load_config
from directpred.data.datasets import DataError, load_folder
from directpred.train.checkpoint import CheckpointError, atomic_write_text, load_checkpoint
from directpred.train.loop import Trainer, TrainingError

# ----------------------------------------------------------------------------------------------------------------
# Bad data


def _bad_files() -> dict[str, bytes]:
    """Seven kinds of undecodable 'images'."""
    good = png_bytes(synthetic_images(1, 1, 16)[0][0])
    jpeg = io.BytesIO()
    from PIL import Image

    Image.fromarray(synthetic_images(1, 1, 16)[0][0]).save(jpeg, format="JPEG")
    return {
        "truncated.png": good[: len(good) // 2],
        "truncated.jpg": jpeg.getvalue()[:40],
        "empty.png": b"",
        "text.jpg": b"this is not an image\n",
        "garbled.png": good[:16] + bytes(b ^ 0xFF for b in good[16:]),
        "html.webp": b"<html>404 not found</html>",
        "zeros.bmp": bytes(64),
    }


def test_many_corrupt_files_are_counted_and_the_first_five_named(tmp_path):
    root = write_folder(tmp_path / "d", n_train=4, n_test=2, size=16)
    bad = _bad_files()
    for name, blob in bad.items():
        (root / "train" / "class2" / name).write_bytes(blob)
    with pytest.raises(DataError) as info:
        load_folder(root, cache_dir=tmp_path / "c")
    msg = str(info.value)
    assert "7 image(s) cannot be decoded" in msg and "skip_corrupt" in msg
    named = [n for n in bad if n in msg]
    assert len(named) == 5, named  # a few named, the rest counted
    with pytest.warns(UserWarning, match="skipped 7 corrupt"):
        train, test = load_folder(root, cache_dir=tmp_path / "c", skip_corrupt=True)
    assert len(train) == 16 and train.skipped == 7 and test.skipped == 0


def test_non_image_files_are_ignored_with_a_warning_naming_them(tmp_path):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1, size=16)
    (root / "train" / "class0" / "README.txt").write_text("notes")
    (root / "test" / "class1" / ".DS_Store").write_bytes(b"\x00\x00")
    with pytest.warns(UserWarning, match=r"ignored 2 non-image file\(s\).*README\.txt"):
        train, test = load_folder(root, cache_dir=tmp_path / "c")
    assert len(train) == 8 and len(test) == 4


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


@pytest.mark.parametrize(
    "layout,needle",
    [
        ({"images/a.png", "images/b.png"}, "no '(images/)?train/<class>/' folders"),
        ({"train/cat/a.png", "train/dog/b.png"}, "no 'test/<class>/' folders"),
        (
            {"train/cat/a.png", "train/dog/b.png", "test/cat/c.png", "test/bird/d.png"},
            r"different classes \(only in train: \['dog'\], only in test: \['bird'\]\)",
        ),
        ({"train/cat/a.png", "train/dog/notes.txt", "test/cat/c.png", "test/dog/d.png"}, "empty class folder.*dog"),
        (
            {"train/cat/a.png", "train/dog/broken.png", "test/cat/c.png", "test/dog/d.png"},
            r"1 image\(s\) cannot be decoded: train/dog/broken\.png",
        ),
    ],
)
def test_bad_archives_name_the_problem(layout, needle, tmp_path):
    good = png_bytes(synthetic_images(1, 1, 16)[0][0])
    members = {n: (b"broken" if "broken" in n else b"text" if n.endswith(".txt") else good) for n in layout}
    archive = _tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DataError, match=needle) as info:
        load_folder(archive, cache_dir=tmp_path / "c")
    assert "bad.tar.gz" in str(info.value)


def test_skip_corrupt_end_to_end_reaches_summary_and_training_continues(tiny_overrides, tmp_path, capsys):
    root = write_folder(tmp_path / "d", n_train=8, n_test=2, size=16)
    bad = _bad_files()
    (root / "train" / "class1" / "truncated.png").write_bytes(bad["truncated.png"])
    (root / "train" / "class3" / "text.jpg").write_bytes(bad["text.jpg"])
    (root / "test" / "class0" / "empty.png").write_bytes(b"")
    over = [o for o in tiny_overrides if not o.startswith("data.path")] + [f"data.path={root}", "train.max_steps=2"]
    args = ["train", "--out", str(tmp_path / "strict")]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    for o in over:
        args += ["--set", o]
    assert main([args[0], str(cfg_file), *args[1:]]) == 1
    err = capsys.readouterr().err
    assert "directpred: error:" in err and "truncated.png" in err and "data.skip_corrupt=true" in err
    assert not (tmp_path / "strict" / "checkpoints" / "last.pt").exists()

    cfg = load_config(None, over + ["data.skip_corrupt=true"])
    with pytest.warns(UserWarning, match="skipped 2 corrupt"):
        summary = Trainer(cfg, tmp_path / "lenient").fit()
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "lenient" / "summary.json").read_text())["skipped_corrupt"] == 3


# ----------------------------------------------------------------------------------------------------------------
# Output problems


def test_output_path_that_cannot_be_a_directory_fails_before_training(tiny_overrides, tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the run directory should go")
    with pytest.raises(TrainingError, match="cannot write to the run directory.*writable --out"):
        Trainer(load_config(None, tiny_overrides + ["train.max_steps=1"]), blocker / "run").setup()
    assert blocker.read_text().startswith("a file")


def test_disk_full_at_checkpoint_keeps_previous_checkpoint(tiny_overrides, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides + ["train.epochs=1"]), run).fit()
    good = (run / "checkpoints" / "last.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # half a checkpoint reaches the disk, then ENOSPC
        if hasattr(f, "write"):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 1
    err = capsys.readouterr().err
    assert "directpred: error: cannot write" in err and "No space left on device" in err
    assert "previous file is kept" in err
    assert (run / "checkpoints" / "last.pt").read_bytes() == good  # intact, byte for byte
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 8
    assert not list((run / "checkpoints").glob(".*.tmp"))  # the partial temporary was removed
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0  # space is back: it resumes
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 16


def test_disk_full_at_the_first_checkpoint_says_to_rerun_not_resume(tiny_overrides, tmp_path, monkeypatch, capsys):
    """With no checkpoint yet there is no previous file and nothing to resume: the message says to run the same
    command again, and that command (space back) then trains the run from the start."""
    run = tmp_path / "run"
    command = ["train", "configs/cpu/quickstart.yaml", "--out", str(run)]
    for override in tiny_overrides + ["train.max_steps=2"]:
        command += ["--set", override]
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(command) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"directpred: error: cannot write {run / 'checkpoints' / 'last.pt'}: No space left on device; nothing was "
        "written (there is no previous file, so nothing to resume). Free disk space or fix permissions, then run the "
        "same command again."
    )
    assert not (run / "checkpoints" / "last.pt").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert main(command) == 0  # the same command, as the message says
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2


def test_checkpoint_into_a_vanished_directory_is_a_checkpoint_error(tiny_overrides, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides + ["train.max_steps=1"]), tmp_path / "run").setup()
    trainer.ckpt_dir = tmp_path / "run" / "config.yaml" / "checkpoints"  # a file stands where a folder should
    with pytest.raises(CheckpointError, match="cannot write .*last.pt"):
        trainer.save()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomically_written_files_get_the_mode_open_gives_under_the_umask(umask, tiny_overrides, tmp_path):
    """config.yaml, summary.json and the checkpoints are readable by whom the umask allows, like metrics.jsonl (a
    plain open()), not 0600 (mkstemp's mode); a file an older version wrote 0600 gets that mode when replaced."""
    old = os.umask(umask)
    try:
        (tmp_path / "plain").write_text("x")
        expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
        (tmp_path / "old.yaml").write_text("a: 1\n")
        os.chmod(tmp_path / "old.yaml", 0o600)
        atomic_write_text(tmp_path / "old.yaml", "a: 2\n")
        run = tmp_path / "run"
        Trainer(load_config(None, tiny_overrides + ["train.max_steps=1"]), run).fit()
    finally:
        os.umask(old)
    assert expected == 0o666 & ~umask
    files = ["config.yaml", "summary.json", "metrics.jsonl", "checkpoints/last.pt"]
    modes = {f: stat.S_IMODE((run / f).stat().st_mode) for f in files}
    modes["old.yaml"] = stat.S_IMODE((tmp_path / "old.yaml").stat().st_mode)
    assert modes == dict.fromkeys([*files, "old.yaml"], expected)
    assert (tmp_path / "old.yaml").read_text() == "a: 2\n"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_the_umask_is_read_also_where_proc_does_not_show_it(tmp_path, monkeypatch):
    """Without /proc (macOS, a container hiding it) the umask is read through os.umask and left as it was."""
    import builtins

    from directpred.train import checkpoint

    real_open = builtins.open

    def no_proc(file, *args, **kwargs):
        if str(file).startswith("/proc/"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    old = os.umask(0o007)
    try:
        monkeypatch.setattr(builtins, "open", no_proc)
        assert checkpoint._umask() == 0o007
        atomic_write_text(tmp_path / "a.yaml", "a: 1\n")
        monkeypatch.undo()
        assert os.umask(0o007) == 0o007
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.yaml").stat().st_mode) == 0o660


# ----------------------------------------------------------------------------------------------------------------
# Resume from a mid-epoch checkpoint


@pytest.mark.parametrize("method,predictor", [("byol", "directpred"), ("simsiam", "directcopy")])
def test_resume_from_mid_epoch_checkpoint_equals_uninterrupted(method, predictor, tiny_overrides, tmp_path):
    common = tiny_overrides + [
        f"method.name={method}",
        f"predictor.name={predictor}",
        "predictor.freq=3",
        "optim.schedule=warmup_cosine",
        "optim.warmup_epochs=0.5",
        "train.epochs=2",
    ]
    full = Trainer(load_config(None, common), tmp_path / "full").fit()
    Trainer(load_config(None, common + ["train.max_steps=5"]), tmp_path / "part").fit()  # 8 steps per epoch
    assert load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["step"] == 5
    assert main(["train", "--resume", str(tmp_path / "part"), "--set", "train.max_steps=0"]) == 0
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a mid-epoch resume"
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["knn_top1"] == full["knn_top1"]
