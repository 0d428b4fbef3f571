"""Atomic writes when the disk is full: one clear error, the previous file intact, no debris."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from catforge.cli import main as cli
from catforge.errors import OutputError
from catforge.potential.checkpoint import load_checkpoint, save_checkpoint
from catforge.runtime import atomic
from catforge.runtime.atomic import write_bytes, write_json
from tests.factories import SMALL_MODEL, data_overrides

ROOT = Path(__file__).resolve().parents[1]


def _free_bytes(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    real = shutil.disk_usage

    def usage(path: Any) -> Any:
        return real(path)._replace(free=free)

    monkeypatch.setattr(atomic.shutil, "disk_usage", usage)


def test_too_little_space_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_json(tmp_path / "metrics.json", {"a": 1})
    _free_bytes(monkeypatch, 10)
    with pytest.raises(OutputError) as raised:
        write_bytes(path, b"x" * 2_500_000)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path}: no space left to write metrics.json")
    assert "2.5 MB needed, 10 bytes free" in message
    assert "the previous metrics.json is unchanged" in message and "\n" not in message
    assert path.read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_disk_filling_up_during_the_write_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OutputError, match=r"no space left to write checkpoint\.pt") as raised:
        save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "step": 2}, path)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_other_write_failures_name_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(fd: int) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.os, "fsync", denied)
    with pytest.raises(OutputError, match=r"predictions\.json: cannot write: Permission denied"):
        write_json(tmp_path / "predictions.json", [])


def test_training_on_a_full_disk_keeps_the_last_checkpoint(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills after the first checkpoint: one line on stderr, exit 2, first kept."""
    real = atomic.write_bytes
    written: list[str] = []

    def fill_after_first_checkpoint(path: Path, data: Any) -> Path:
        if path.name == "checkpoint.pt" and written:
            _free_bytes(monkeypatch, 1000)
        result = real(path, data)
        written.append(path.name)
        return result

    monkeypatch.setattr(atomic, "write_bytes", fill_after_first_checkpoint)
    argv = [
        "--mode", "train", "--config-yml", str(ROOT / "configs" / "demo" / "s2ef_schnet.yml"),
        *data_overrides(demo, "s2ef"), *SMALL_MODEL, "--optim.max_steps=4",
        "--optim.checkpoint_every=2", "--cpu", "--run-dir", str(tmp_path), "--timestamp-id=full",
    ]  # fmt: skip
    assert cli.main(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1].startswith(f"catforge: error: {tmp_path / 'checkpoints' / 'full'}: no space")
    assert "Traceback" not in "\n".join(stderr)
    assert load_checkpoint(tmp_path / "checkpoints" / "full" / "checkpoint.pt")["step"] == 2
