"""Stop requests: Ctrl-C like a cluster's stop signal, a second Ctrl-C aborts, exit statuses."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from catforge.cli import main as cli
from catforge.runtime.preemption import (
    INTERRUPT_EXIT_CODE,
    RESUME_EXIT_CODE,
    Preempted,
    exit_status,
    stop_requests,
)
from tests.factories import SMALL_MODEL, data_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_first_ctrl_c_is_a_request_and_the_second_aborts() -> None:
    with stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_number == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_repeated_cluster_signal_is_ignored() -> None:
    with stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signal_number == signal.SIGTERM


def test_exit_statuses() -> None:
    assert exit_status(signal.SIGINT) == INTERRUPT_EXIT_CODE == 130
    assert exit_status(signal.SIGTERM) == exit_status(None) == RESUME_EXIT_CODE == 75
    assert Preempted("stopped", "resume", signal.SIGINT).exit_status == 130


def test_ctrl_c_before_training_starts_exits_130_and_leaves_no_folders(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("catforge.cli.modes.training_run", interrupted)
    argv = [
        "--mode", "train", "--config-yml", str(ROOT / "configs" / "demo" / "s2ef_schnet.yml"),
        *data_overrides(demo, "s2ef"), *SMALL_MODEL, "--optim.max_steps=2", "--cpu",
        "--run-dir", str(tmp_path),
    ]  # fmt: skip
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("catforge: interrupted")
    assert list(tmp_path.iterdir()) == []
