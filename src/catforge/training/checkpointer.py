"""Checkpoints of a training run: ``checkpoint.pt`` (to resume), ``best_checkpoint.pt`` (to use).

:class:`Checkpointer` writes both (rank 0 only, atomically, at most once per step) and restores a
run's parts and counters from a ``checkpoint.pt`` dict. The keys are OCP's (``state_dict``,
``optimizer``, ``scheduler``, ``normalizers``, ``config``, ``epoch``, ``step``, ``amp``, ``ema``)
plus catforge's (``batch_in_epoch``, ``steps_per_epoch``, ``rng``, ``run_id``,
``best_val_metric``, ``primary_metric``, ``val_metrics``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catforge.potential.checkpoint import save_checkpoint
from catforge.runtime.distributed import is_main
from catforge.training.resume import better_of, rng_state, set_rng_state, stored_best
from catforge.training.step import TrainParts

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters of a run: optimizer steps taken, finished epochs, best primary metric, and
    batches of the current epoch already consumed (where a resumed epoch continues)."""

    step: int = 0
    epoch: int = 0
    best_metric: float | None = None
    batch: int = 0


class Checkpointer:
    """Writes a run's checkpoints into ``directory`` (None: write nothing, ``--debug``).

    ``config`` is the resolved config as plain data, stored in every checkpoint so that a
    checkpoint alone rebuilds its model; ``primary`` names the metric ``best_checkpoint.pt``
    is chosen by.
    """

    def __init__(
        self, directory: Path | None, *, run_id: str, config: Mapping[str, Any], primary: str
    ) -> None:
        self.directory = directory
        self.run_id = run_id
        self.config = dict(config)
        self.primary = primary
        self._saved_step: int | None = None

    @property
    def path(self) -> Path | None:
        """Where ``checkpoint.pt`` goes (None with ``--debug``)."""
        return None if self.directory is None else self.directory / "checkpoint.pt"

    def save(
        self, parts: TrainParts, state: TrainState, steps_per_epoch: int, val: dict[str, float]
    ) -> Path | None:
        """``checkpoint.pt``: the full training state (at most once per step; rank 0 writes).

        Returns the file written, or None when nothing was written here.
        """
        if self.directory is None or self._saved_step == state.step:
            return None
        self._saved_step = state.step
        if not is_main():
            return None
        full = {
            **self._model_state(parts, state, steps_per_epoch, val),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.schedule.state_dict(),
            "ema": None if parts.ema is None else parts.ema.state_dict(),
            "rng": rng_state(),
        }
        return save_checkpoint(full, self.directory / "checkpoint.pt")

    def save_best(
        self, parts: TrainParts, state: TrainState, steps_per_epoch: int, val: dict[str, float]
    ) -> Path | None:
        """``best_checkpoint.pt``: the current (EMA, when on) weights for inference."""
        if self.directory is None or not is_main():
            return None
        with parts.averaged():
            best = self._model_state(parts, state, steps_per_epoch, val)
        return save_checkpoint(best, self.directory / "best_checkpoint.pt")

    def restore(
        self, parts: TrainParts, checkpoint: Mapping[str, Any], steps_per_epoch: int
    ) -> TrainState:
        """Load a ``checkpoint.pt``'s optimizer, schedule, EMA, scaler and RNG states into
        ``parts`` (weights and normalisers are loaded when the parts are built); its counters."""
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scheduler"):
            parts.schedule.load_state_dict(checkpoint["scheduler"])
        if parts.ema is not None and checkpoint.get("ema"):
            parts.ema.load_state_dict(checkpoint["ema"])
        if parts.amp and checkpoint.get("amp"):
            parts.scaler.load_state_dict(checkpoint["amp"])
        step = int(checkpoint.get("step", 0))
        if "batch_in_epoch" in checkpoint:
            epoch, batch = int(checkpoint["epoch"]), int(checkpoint["batch_in_epoch"])
            saved_steps = int(checkpoint.get("steps_per_epoch") or steps_per_epoch)
            if saved_steps != steps_per_epoch:  # another global batch size (e.g. more ranks)
                batch = round(batch * steps_per_epoch / saved_steps)
        else:  # OCP checkpoints: a (possibly fractional) epoch only
            epoch, batch = divmod(step, steps_per_epoch)
        same_metric = checkpoint.get("primary_metric", self.primary) == self.primary
        best = checkpoint.get("best_val_metric") if same_metric else None
        best_file = None
        if self.directory is not None:
            best_file = stored_best(self.directory / "best_checkpoint.pt", self.primary)
        state = TrainState(step, epoch, better_of(self.primary, best, best_file), batch)
        self._saved_step = step
        set_rng_state(checkpoint.get("rng"))
        log.info(
            "resumed at step %d (epoch %d, batch %d of %d), best %s %s",
            step,
            epoch,
            batch,
            steps_per_epoch,
            self.primary,
            state.best_metric,
        )
        return state

    def _model_state(
        self, parts: TrainParts, state: TrainState, steps_per_epoch: int, val: dict[str, float]
    ) -> dict[str, Any]:
        """What any checkpoint holds: weights, normalisers, config, counters, metrics."""
        return {
            "run_id": self.run_id,
            "epoch": state.epoch,
            "step": state.step,
            "batch_in_epoch": state.batch,
            "steps_per_epoch": steps_per_epoch,
            "state_dict": parts.model.state_dict(),
            "normalizers": parts.transform.state_dict(),
            "config": self.config,
            "val_metrics": val,
            "amp": parts.scaler.state_dict() if parts.amp else None,
            "best_val_metric": state.best_metric,
            "primary_metric": self.primary,
        }
