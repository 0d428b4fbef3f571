"""Run logging: scalars to TensorBoard or W&B, and the same metrics as JSON lines, on the main
process only.

:func:`open_run_logger` opens the logger a config names (``logger:``, see
:data:`catforge.registry.LOGGERS`). Files are created by the first record, so a run that fails
before logging anything leaves no empty event file behind. A resumed run (``resume_step``) continues
the same logs without duplicates: JSONL records past the checkpoint's step (written after it, then
lost with the interrupted run) are dropped from ``metrics.jsonl`` when the file is opened,
TensorBoard hides its events from that step on (``SummaryWriter(purge_step=...)``) and W&B continues
the same run (:mod:`catforge.runtime.wandb_logger`). Each record carries its ``step``, so readers
can also tell the steps apart themselves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

from catforge.registry import LOGGERS
from catforge.runtime.atomic import write_bytes


class ScalarBackend(Protocol):
    """Where ``split/name`` scalars go: created lazily by the first :meth:`add_scalars`."""

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None: ...

    def close(self, *, failed: bool = False) -> None: ...


class TensorBoardBackend:
    """TensorBoard event files in ``logs_dir``; a resumed run hides events after ``resume_step``.

    ``run_id`` and ``project`` are accepted for the common backend signature and not used.
    """

    def __init__(
        self,
        logs_dir: Path,
        *,
        run_id: str = "",
        project: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        self._logs_dir = logs_dir
        self._resume_step = resume_step
        self._writer: Any = None

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._logs_dir.mkdir(parents=True, exist_ok=True)
            purge = None if self._resume_step is None else self._resume_step + 1
            self._writer = SummaryWriter(str(self._logs_dir), purge_step=purge)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self, *, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def open_run_logger(
    name: str,
    *,
    logs_dir: Path,
    metrics_path: Path,
    run_id: str,
    project: str | None = None,
    resume_step: int | None = None,
) -> RunLogger:
    """The :class:`RunLogger` of backend ``name`` (``tensorboard``, ``wandb``) for one run.

    ``logs_dir``: the run's ``logs/<name>/<run_id>`` folder; ``metrics_path``: its
    ``metrics.jsonl``; ``resume_step``: the checkpoint step a resumed run continues from. An
    unknown name, or a backend whose optional package is missing, is a ConfigError.
    """
    backend_class = LOGGERS.load(name)
    backend = backend_class(logs_dir, run_id=run_id, project=project, resume_step=resume_step)
    return RunLogger(backend, metrics_path, resume_step=resume_step)


class RunLogger:
    """Write ``split/name`` scalars to a backend and one JSON object per call to a JSONL file.

    ``scalars``: a :class:`ScalarBackend`, or a folder for TensorBoard. A disabled logger
    (non-main ranks, ``--debug``) accepts every call and writes nothing. ``resume_step``: the
    step of the checkpoint a resumed run continues from.
    """

    def __init__(
        self,
        scalars: ScalarBackend | Path | None,
        jsonl_path: Path | None,
        *,
        resume_step: int | None = None,
    ) -> None:
        if isinstance(scalars, Path):
            scalars = TensorBoardBackend(scalars, resume_step=resume_step)
        self._backend = scalars
        self._jsonl_path = jsonl_path
        self._resume_step = resume_step
        self._jsonl: IO[str] | None = None

    @classmethod
    def disabled(cls) -> RunLogger:
        return cls(None, None)

    def log(self, metrics: Mapping[str, float], *, step: int, split: str, epoch: float) -> None:
        """Record ``metrics`` of ``split`` ("train", "val", ...) at the global ``step``."""
        if self._backend is not None:
            self._backend.add_scalars({f"{split}/{k}": v for k, v in metrics.items()}, step)
        jsonl = self._jsonl_file()
        if jsonl is not None:
            record = {"split": split, "step": step, "epoch": round(epoch, 6)}
            record.update({name: _json_number(value) for name, value in metrics.items()})
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()

    def _jsonl_file(self) -> IO[str] | None:
        if self._jsonl is None and self._jsonl_path is not None:
            if self._resume_step is not None:
                drop_records_after(self._jsonl_path, self._resume_step)
            self._jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = self._jsonl_path.open("a", encoding="utf-8")
        return self._jsonl

    def close(self, *, failed: bool = False) -> None:
        """Flush and close the files; ``failed``: the run ended by an exception."""
        if self._backend is not None:
            self._backend.close(failed=failed)
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)


def drop_records_after(path: Path, step: int) -> int:
    """Remove the JSONL records of ``path`` whose ``step`` is above ``step`` (atomically).

    Lines that are not JSON records (a torn last line of a killed run) are dropped too. Returns
    how many lines were removed.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            record_step = None
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_bytes(path, "".join(kept).encode("utf-8"))
    return dropped


def _json_number(value: float) -> float | None:
    """JSON has no NaN/inf: write them as null."""
    value = float(value)
    return value if math.isfinite(value) else None
