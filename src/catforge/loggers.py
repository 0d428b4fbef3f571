"""Run logging: TensorBoard scalars and the same metrics as JSON lines, on the main process only."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any


class RunLogger:
    """Write ``split/name`` scalars to TensorBoard and one JSON object per call to a JSONL file.

    A disabled logger (non-main ranks, ``--debug``) accepts every call and writes nothing.
    """

    def __init__(self, tensorboard_dir: Path | None, jsonl_path: Path | None) -> None:
        self._writer: Any = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            tensorboard_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(tensorboard_dir))
        self._jsonl = None
        if jsonl_path is not None:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = jsonl_path.open("a", encoding="utf-8")

    @classmethod
    def disabled(cls) -> RunLogger:
        return cls(None, None)

    def log(self, metrics: Mapping[str, float], *, step: int, split: str, epoch: float) -> None:
        """Record ``metrics`` of ``split`` ("train", "val", ...) at the global ``step``."""
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(f"{split}/{name}", value, global_step=step)
        if self._jsonl is not None:
            record = {"split": split, "step": step, "epoch": round(epoch, 6)}
            record.update({name: _json_number(value) for name, value in metrics.items()})
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
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
        self.close()


def _json_number(value: float) -> float | None:
    """JSON has no NaN/inf: write them as null."""
    value = float(value)
    return value if math.isfinite(value) else None
