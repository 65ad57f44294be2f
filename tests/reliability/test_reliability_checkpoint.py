"""Checkpoints are read with torch.load(weights_only=True): a crafted pickle is refused before it runs anything,
and everything directpred writes (with diagnostics, skipped steps, kNN history) loads that way."""

from __future__ import annotations

import os
import shutil
import struct
import zipfile

import pytest
import torch

from directpred.cli import main
from directpred.config import load_config
from directpred.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from directpred.train.loop import Trainer


class _WritesAFile:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil(path, marker) -> None:
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "payload": _WritesAFile(str(marker))}, path)


def test_the_evil_file_really_runs_code_without_weights_only(tmp_path):
    """The control: the file would do harm if unpickled the unsafe way, so the refusal below means something."""
    marker = tmp_path / "pwned"
    _evil(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_malicious_checkpoint_is_refused_and_does_nothing(tmp_path):
    marker = tmp_path / "pwned"
    _evil(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    msg = str(info.value)
    assert msg.startswith(
        f"refusing to load {tmp_path / 'evil.pt'}: it holds objects other than tensors and plain "
        "data (Trying to load unsupported GLOBAL "
    )
    assert "system" in msg and "Nothing in it was executed" in msg
    assert not marker.exists()


class _Plain:
    """A harmless class of the test's own: torch's refusal of it suggests allowlisting it, which we do not pass on."""

    def __init__(self) -> None:
        self.x = 1


def test_refusal_gives_only_our_advice_not_torchs_allowlist_hint(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "extra": _Plain()}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "plain.pt")
    assert str(info.value) == (
        f"refusing to load {tmp_path / 'plain.pt'}: it holds objects other than tensors and plain data (Unsupported "
        f"global: GLOBAL {_Plain.__module__}.{_Plain.__qualname__} was not an allowed global by default), which "
        "directpred never writes; it may have been crafted to run code. Nothing in it was executed. Load only "
        "checkpoints you trust"
    )


def test_cli_refuses_a_malicious_checkpoint_in_eval_resume_and_export(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(
        load_config(
            None, tiny_overrides + ["train.max_steps=2", "diag.every=1", "eval.knn_every=1", "train.skip_nonfinite=3"]
        ),
        run,
    ).fit()
    state = load_checkpoint(run / "checkpoints" / "last.pt")  # what we write is plain data
    assert state["step"] == 2 and state["diagnostics"] is not None
    marker = tmp_path / "pwned"
    _evil(tmp_path / "evil.pt", marker)
    assert main(["eval", str(run), "--checkpoint", str(tmp_path / "evil.pt"), "--no-linear"]) == 1
    assert main(["export", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "b.pt")]) == 1
    shutil.copy(tmp_path / "evil.pt", run / "checkpoints" / "last.pt")
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=4"]) == 1
    assert main(["train", "--resume", str(run)]) == 1  # unchanged: the finished-run check reads it first
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("directpred: error: refusing to load ") for line in err), err
    assert not marker.exists()


def test_non_dict_file_is_not_a_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", {"model": {"w": torch.ones(1)}, "step": 3, "history": [{"a": 1.0}]})
    assert load_checkpoint(tmp_path / "ok.pt")["history"] == [{"a": 1.0}]
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="is not a directpred checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


def test_a_damaged_last_pt_names_the_kept_checkpoints_that_exist_or_the_command_to_start_again(tmp_path):
    """The message pointed at checkpoints/epoch_XXXX.pt whether or not the run kept any, and not how to use one."""
    run = tmp_path / "run"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    save_checkpoint(folder / "last.pt", {"model": {"w": torch.zeros(2)}, "step": 1})
    (folder / "last.pt").write_bytes((folder / "last.pt").read_bytes()[:300])  # cut short
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder / "last.pt")
    message = str(info.value)
    assert "\n" not in message and "epoch_XXXX" not in message
    assert message.endswith(
        "; the run keeps no earlier checkpoint (checkpoints/epoch_*.pt), so it must start again: "
        f"`rm {folder / 'last.pt'} && directpred train {run / 'config.yaml'} --out {run}`"
    )
    (run / "summary.json").write_text("{}")  # a finished run: a new run is refused while its summary is there
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder / "last.pt")
    assert str(info.value).endswith(
        f"so it must start again: `rm {folder / 'last.pt'} {run / 'summary.json'} && directpred train "
        f"{run / 'config.yaml'} --out {run}`"
    )
    for epoch in (10, 20):
        save_checkpoint(folder / f"epoch_{epoch:04d}.pt", {"model": {"w": torch.zeros(2)}, "step": epoch})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder / "last.pt")
    assert str(info.value).endswith(
        "; the run keeps earlier checkpoints (epoch_0010.pt, epoch_0020.pt); copy the latest to checkpoints/last.pt "
        f"and resume: `cp {folder / 'epoch_0020.pt'} {folder / 'last.pt'} && directpred train --resume {run}`"
    )
    (folder / "last.pt").write_bytes(b"")  # empty: the same advice
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\), not a checkpoint; the run keeps earlier"):
        load_checkpoint(folder / "last.pt")
    # What the message says works: the kept checkpoint copied over last.pt loads.
    shutil.copy(folder / "epoch_0020.pt", folder / "last.pt")
    assert load_checkpoint(folder / "last.pt")["step"] == 20


def _flip_tensor_bytes(path, count: int = 200) -> str:
    """XOR ``count`` bytes in the middle of the largest tensor's data in the torch.save zip ``path``; returns the
    member's name. The archive's structure (headers, central directory, data.pkl) stays intact."""
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    middle = member.header_offset + 30 + name_len + extra_len + member.file_size // 2 - count // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))
    return member.filename


def test_changed_bytes_inside_a_tensor_are_detected_by_the_zip_crc(tiny_overrides, tmp_path, capsys):
    """torch.load never checks the zip members' CRC-32: a checkpoint whose tensor bytes changed loaded silently,
    with a changed weight, in train --resume, eval and diagnose."""
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides + ["train.max_steps=2"]), run).fit()
    last = run / "checkpoints" / "last.pt"
    intact = load_checkpoint(last)
    shutil.copy(last, tmp_path / "intact.pt")
    member = _flip_tensor_bytes(last)
    # The control: torch itself loads the damaged file, with a weight changed.
    loaded = torch.load(last, weights_only=True)
    assert any(not torch.equal(intact["model"][k], loaded["model"][k]) for k in intact["model"])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(last)
    assert str(info.value) == (
        f"{last} is a damaged checkpoint, cut short or with changed bytes (the bytes of {member} do not match the "
        "CRC-32 recorded when it was written); the run keeps no earlier checkpoint (checkpoints/epoch_*.pt), so it "
        f"must start again: `rm {last} {run / 'summary.json'} && directpred train {run / 'config.yaml'} --out {run}`"
    )
    capsys.readouterr()
    assert main(["eval", str(run), "--no-linear"]) == 1
    assert main(["diagnose", str(run), "--no-data"]) == 1
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=4"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(f"{last} is a damaged checkpoint" in line for line in err), err
    # The intact file still loads, and equals what was written.
    state = load_checkpoint(tmp_path / "intact.pt")
    assert all(torch.equal(intact["model"][k], state["model"][k]) for k in intact["model"])
    # A file written without checksums (CRC-32 0 in every member) has nothing to check: it loads.
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(intact, tmp_path / "no_crc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    import zipfile

    assert {i.CRC for i in zipfile.ZipFile(tmp_path / "no_crc.pt").infolist() if i.file_size} == {0}
    state = load_checkpoint(tmp_path / "no_crc.pt")
    assert all(torch.equal(intact["model"][k], state["model"][k]) for k in intact["model"])
