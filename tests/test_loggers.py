"""Run loggers: TensorBoard and W&B backends (W&B offline, read back from its run files)."""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catforge.errors import ConfigError
from catforge.registry import LOGGERS
from catforge.runtime.loggers import RunLogger, open_run_logger

RUN_ID = "2024-05-01-12-00-00-demo"
MISSING = "logger: wandb needs the wandb package: pip install 'catforge[wandb]'"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B in offline mode, every file of its own under tmp_path; returns the logs folder."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    return tmp_path / "logs" / "wandb" / RUN_ID


def _open(logs_dir: Path, name: str = "wandb", **kwargs: Any) -> RunLogger:
    return open_run_logger(
        name,
        logs_dir=logs_dir,
        metrics_path=logs_dir.parent.parent.parent / "results" / "metrics.jsonl",
        run_id=kwargs.pop("run_id", RUN_ID),
        **kwargs,
    )


def _wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if position + 7 + length > len(data):  # still being written
            return
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(pending)
            pending = b""
            yield record


def _finished_records(path: Path, timeout: float = 30.0) -> list[Any]:
    """The records of a finished run's ``.wandb`` file, waiting for its ``exit`` record:
    offline, ``run.finish()`` can return before W&B's service has written the file out."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(path))
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, f"{path} holds no exit record after {timeout} s"
        time.sleep(0.05)


def _offline_runs(logs_dir: Path) -> list[dict[str, Any]]:
    """One dict per offline W&B run in ``logs_dir``, oldest first: its run record's fields,
    the history rows by step (``_``-prefixed keys left out) and the exit code."""
    runs = []
    for path in logs_dir.glob("wandb/offline-run-*/run-*.wandb"):
        run: dict[str, Any] = {"history": {}, "dir": path.parent}
        for record in _finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, name=record.run.display_name)
                run.update(project=record.run.project, start=record.run.start_time.ToNanoseconds())
            elif kind == "history":
                row = {"/".join(item.nested_key) or item.key: item for item in record.history.item}
                values = {k: json.loads(v.value_json) for k, v in row.items() if k[0] != "_"}
                run["history"][record.history.step.num] = values
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        assert "id" in run, f"{path} holds no run record"
        runs.append(run)
    return sorted(runs, key=lambda run: run["start"])


def _train(logger: RunLogger, steps: range) -> dict[int, float]:
    losses = {step: 1.0 / step for step in steps}
    for step, loss in losses.items():
        logger.log({"loss": loss, "lr": 0.01}, step=step, split="train", epoch=step / 4)
    return losses


def test_wandb_run_holds_the_scalars_under_the_tensorboard_tags(offline: Path) -> None:
    with _open(offline, project="ocp-demo") as logger:
        losses = _train(logger, range(1, 4))
        logger.log({"energy_mae": 0.25}, step=3, split="val", epoch=0.75)
    (run,) = _offline_runs(offline)
    assert (run["id"], run["name"], run["project"]) == (RUN_ID, RUN_ID, "ocp-demo")
    assert RUN_ID in run["dir"].name and run["dir"].parent == offline / "wandb"
    assert sorted(run["history"]) == [1, 2, 3]
    for step, loss in losses.items():
        assert run["history"][step]["train/loss"] == pytest.approx(loss)
        assert run["history"][step]["train/lr"] == pytest.approx(0.01)
    assert run["history"][3]["val/energy_mae"] == pytest.approx(0.25)
    assert run["exit_code"] == 0
    jsonl = offline.parents[2] / "results" / "metrics.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    expected = [("train", 1), ("train", 2), ("train", 3), ("val", 3)]
    assert [(r["split"], r["step"]) for r in records] == expected


def test_resumed_run_continues_the_same_wandb_run_after_the_checkpoint(offline: Path) -> None:
    with _open(offline) as logger:
        _train(logger, range(1, 6))  # the checkpoint was at step 3; steps 4 and 5 are lost
    with _open(offline, resume_step=3) as logger:
        logger.log({"loss": 9.0}, step=3, split="train", epoch=0.75)  # already logged
        losses = _train(logger, range(4, 7))
    first, resumed = _offline_runs(offline)
    assert first["id"] == resumed["id"] == RUN_ID
    assert first["project"] == resumed["project"] == "catforge"
    assert sorted(resumed["history"]) == [4, 5, 6]
    assert {s: row["train/loss"] for s, row in resumed["history"].items()} == pytest.approx(losses)
    jsonl = offline.parents[2] / "results" / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in jsonl.read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4, 5, 6]  # records past 3 dropped; a step again is kept


def test_run_id_is_sanitised_for_wandb(offline: Path) -> None:
    with _open(offline, run_id="2024-05-01 12:00:00/a#b") as logger:
        _train(logger, range(1, 2))
    (run,) = _offline_runs(offline)
    assert run["id"] == run["name"] == "2024-05-01-12-00-00-a-b"


def test_an_exception_marks_the_wandb_run_failed(offline: Path) -> None:
    with pytest.raises(RuntimeError), _open(offline) as logger:
        _train(logger, range(1, 2))
        raise RuntimeError("diverged")
    (run,) = _offline_runs(offline)
    assert run["exit_code"] == 1


def test_nothing_is_written_before_the_first_record(offline: Path) -> None:
    with _open(offline):
        pass
    assert not offline.parents[1].exists() and not (offline.parents[2] / "results").exists()


def test_wandb_start_failure_is_one_line_config_error(
    offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    def refuse(**kwargs: Any) -> None:
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    with _open(offline) as logger, pytest.raises(ConfigError) as error:
        _train(logger, range(1, 2))
    message = str(error.value)
    assert "\n" not in message
    assert f"could not start run {RUN_ID} in project catforge: No API key" in message
    assert "WANDB_MODE=offline" in message


def test_missing_wandb_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: not installed
    with pytest.raises(ConfigError) as error:
        _open(tmp_path / "logs" / "wandb" / RUN_ID)
    assert str(error.value) == MISSING
    with pytest.raises(ConfigError) as early:
        LOGGERS.lookup("wandb").check_installed()  # the config-time check, no import
    assert str(early.value) == MISSING
    LOGGERS.lookup("tensorboard").check_installed()
    assert not (tmp_path / "logs").exists()


def test_tensorboard_backend_writes_the_same_tags(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs_dir = tmp_path / "logs" / "tensorboard" / RUN_ID
    with _open(logs_dir, "tensorboard") as logger:
        losses = _train(logger, range(1, 4))
    events = EventAccumulator(str(logs_dir))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]
    read = {event.step: event.value for event in events.Scalars("train/loss")}
    assert read == pytest.approx(losses)


def test_unknown_logger_lists_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Did you mean 'wandb'.*tensorboard, wandb"):
        _open(tmp_path, "wanddb")


def test_training_with_logger_wandb_logs_and_resumes_one_run(
    demo: Path, tmp_path: Path, offline: Path
) -> None:
    from catforge.cli.modes import run
    from catforge.config import RunOptions, load_config
    from tests.factories import SMALL_MODEL, data_overrides

    config = Path(__file__).resolve().parents[1] / "configs" / "demo" / "s2ef_schnet.yml"
    base = [*data_overrides(demo, "s2ef"), *SMALL_MODEL, "--logger=wandb"]
    base.append("--logger_project=ocp-s2ef")

    def train(steps: int, **options: Any) -> None:
        opts = RunOptions(mode="train", run_dir=tmp_path, print_every=2, cpu=True, **options)
        run(load_config(config, [*base, f"--optim.max_steps={steps}"], opts))

    train(4)
    (logs_dir,) = (tmp_path / "logs" / "wandb").iterdir()
    checkpoint = tmp_path / "checkpoints" / logs_dir.name / "checkpoint.pt"
    train(6, checkpoint=checkpoint)
    first, resumed = _offline_runs(logs_dir)
    assert first["id"] == resumed["id"] == logs_dir.name
    assert first["project"] == resumed["project"] == "ocp-s2ef"
    assert (sorted(first["history"]), sorted(resumed["history"])) == ([2, 4], [6])
    jsonl = (tmp_path / "results" / logs_dir.name / "metrics.jsonl").read_text().splitlines()
    history = {**first["history"], **resumed["history"]}
    for record in map(json.loads, jsonl):
        split, step, _epoch = record.pop("split"), record.pop("step"), record.pop("epoch")
        logged = {tag: value for tag, value in history[step].items() if tag.startswith(split)}
        assert logged == pytest.approx({f"{split}/{k}": v for k, v in record.items()}, rel=1e-6)
    assert "val/forces_mae" in history[6] and "train/lr" in history[2]
    assert not (tmp_path / "logs" / "tensorboard").exists()
