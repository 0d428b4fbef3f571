"""The training loop: epochs, evaluation and checkpoint cadence over one step function.

``trainer: energy`` (IS2RE) and ``trainer: forces`` (S2EF) differ only in their parts (targets
and loss, see :class:`~catforge.training.step.LossSettings`); the loop reads no config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from catforge.data.graph import AtomicGraph
from catforge.data.samplers import ShardedBatchSampler, epoch_seed
from catforge.errors import DataError
from catforge.potential.evaluate import evaluate
from catforge.potential.metrics import format_metrics_table, is_better
from catforge.runtime.distributed import all_reduce_max, barrier, broadcast_object, gather_objects
from catforge.runtime.loggers import RunLogger
from catforge.runtime.preemption import Preempted, StopRequest, signal_name
from catforge.runtime.progress import Heartbeat, progress_bar, progress_enabled
from catforge.training.checkpointer import Checkpointer, TrainState
from catforge.training.loaders import worker_error_message
from catforge.training.step import TrainParts, train_step
from catforge.training.window import MetricsWindow, timed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """The loop's cadence, all in optimizer steps: ``total_steps`` to train, an evaluation
    every ``eval_every``, ``checkpoint.pt`` every ``checkpoint_every`` (and at each epoch end),
    a log line every ``print_every``. ``primary`` is the metric that picks the best checkpoint;
    ``seed`` the base of every epoch's shuffle."""

    total_steps: int
    steps_per_epoch: int
    eval_every: int
    checkpoint_every: int
    primary: str
    task: str
    print_every: int = 10
    seed: int = 0


class Trainer:
    """Trains ``parts`` on ``train_loader`` (batches from ``batch_sampler``), evaluating on
    ``val_loader``.

    ``resume`` (a ``checkpoint.pt`` dict) continues that run exactly: counters, position in
    the epoch, optimizer, schedule, EMA, AMP scaler, best metric and RNG states (weights and
    normalisers are already in ``parts``).

    Under DDP (``parts.world_size > 1``) every rank trains its share of each global batch;
    losses are normalised by the global counts (so the result equals one process with the global
    batch), and only rank 0 writes checkpoints. A stop request (:meth:`train`'s ``stop``) ends
    training after the current step with a checkpoint (:mod:`catforge.runtime.preemption`); so
    does a bad data entry, before its error is raised, so that the run can resume once the entry
    is fixed or skipped.
    """

    def __init__(
        self,
        parts: TrainParts,
        settings: TrainSettings,
        *,
        train_loader: DataLoader[AtomicGraph],
        batch_sampler: ShardedBatchSampler,
        val_loader: DataLoader[AtomicGraph] | None,
        checkpointer: Checkpointer,
        logger: RunLogger,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        self.parts, self.settings = parts, settings
        self.train_loader, self.batch_sampler, self.val_loader = (
            train_loader,
            batch_sampler,
            val_loader,
        )
        self.checkpointer, self.logger = checkpointer, logger
        self.world_size = parts.world_size
        self.primary = settings.primary
        self.steps_per_epoch = settings.steps_per_epoch
        self.total_steps = settings.total_steps
        self.stop = StopRequest()
        self.state = TrainState()
        self._last_val: dict[str, float] = {}
        if resume is not None:
            self.state = checkpointer.restore(parts, resume, self.steps_per_epoch)

    # --- training -------------------------------------------------------------------------------

    def train(self, stop: StopRequest | None = None) -> dict[str, float]:
        """Run to ``max_steps``/``max_epochs``; return the last validation metrics.

        ``stop`` (from :func:`catforge.runtime.preemption.stop_requests`) ends the run after the
        current step with a checkpoint, raising :class:`~catforge.runtime.preemption.Preempted`.
        """
        self.stop = stop or self.stop
        if self.state.step >= self.total_steps:
            log.warning(
                "nothing to train: the run is already at step %d of %d; raise optim.max_steps "
                "or optim.max_epochs to train further",
                self.state.step,
                self.total_steps,
            )
            return {}
        log.info(
            "training %s: %d structures, %d steps per epoch, %d steps, device %s",
            self.settings.task,
            len(self.train_loader.dataset),  # type: ignore[arg-type]
            self.steps_per_epoch,
            self.total_steps,
            self.parts.device,
        )
        self._last_val = {}
        try:
            self._train_loop()
        except DataError as error:  # from validation: this rank alone
            message = worker_error_message(str(error))
            raise self._stopped_by_data(message, all_ranks=self.world_size == 1) from None
        return self._last_val

    def _train_loop(self) -> None:
        window = MetricsWindow()
        bar = self._progress_bar()
        heartbeat = Heartbeat()
        state = self.state
        first_step = state.step
        while state.step < self.total_steps:
            for batch, waited in timed(self._epoch_batches()):
                if self._bad_batch(batch):
                    raise self._stopped_by_data(self._agreed_problem(batch), all_ranks=True)
                assert isinstance(batch, AtomicGraph)
                step = train_step(self.parts, batch)
                state.step += 1
                state.batch += 1
                epoch_end = state.batch >= self.steps_per_epoch
                if epoch_end:
                    state.epoch, state.batch = state.epoch + 1, 0
                window.add(step.loss, step.grad_norm, step.totals, batch.n_graphs, waited)
                bar.update(1)
                bar.set_postfix(loss=f"{float(step.loss.total.detach()):.4f}", refresh=False)
                if state.step % self.settings.print_every == 0:
                    self._log_train(window.flush())
                    heartbeat.reset()
                elif bar.disable and heartbeat.due():
                    self._log_progress(heartbeat.rate(state.step - first_step))
                done = state.step >= self.total_steps
                if state.step % self.settings.eval_every == 0 or done:
                    self._last_val = self._validate() or self._last_val
                if epoch_end or done or state.step % self.settings.checkpoint_every == 0:
                    self._save_training(self._last_val)
                if self._stop_requested():
                    bar.close()
                    raise self._preempted(self._last_val)
                if done:
                    break
        bar.close()
        if window.count:
            self._log_train(window.flush())

    def _log_progress(self, steps_per_second: float) -> None:
        """The heartbeat line off a terminal (no progress bar)."""
        step = self.state.step
        epoch = step / self.steps_per_epoch
        rate = steps_per_second
        log.info("step %d of %d (epoch %.2f), %.3g steps/s", step, self.total_steps, epoch, rate)

    def _bad_batch(self, batch: AtomicGraph | DataError) -> bool:
        """Whether this batch failed to load on any rank (all ranks agree, before the step)."""
        failed = 1.0 if isinstance(batch, DataError) else 0.0
        return (all_reduce_max(failed) if self.world_size > 1 else failed) > 0

    def _agreed_problem(self, batch: AtomicGraph | DataError) -> str:
        """The first failing rank's message, on every rank."""
        mine = worker_error_message(str(batch)) if isinstance(batch, DataError) else None
        if self.world_size == 1:
            return str(mine)
        gathered = gather_objects(mine)
        first = None if gathered is None else next(m for m in gathered if m is not None)
        return str(broadcast_object(first))

    def _stopped_by_data(self, problem: str, *, all_ranks: bool) -> DataError:
        """Checkpoint the steps done before bad data stopped training; the error to raise.

        ``all_ranks``: every rank stops here together (a bad training batch: rank 0 writes the
        checkpoint); else only this rank does (a bad validation batch under DDP), and it names
        a checkpoint only if it wrote one itself.
        """
        written = self._save_training(self._last_val)
        if all_ranks:
            barrier()
            written = written or self.checkpointer.path
        where = f"; training stopped at step {self.state.step}"
        if written is None:
            return DataError(f"{problem}{where}")
        fix = ""
        if " entry " in problem:
            fix = " fix or remove the entry (or set dataset.<split>.skip_bad_entries: true), then"
        return DataError(
            f"{problem}{where} and saved {written}:{fix} resume with --checkpoint {written}"
        )

    def _epoch_batches(self) -> Iterator[AtomicGraph | DataError]:
        """This epoch's remaining batches of its (seed, epoch) permutation; consumed ones are
        skipped by index, never loaded. A batch that cannot be loaded ends the epoch as its
        DataError (the loop stops on it with a checkpoint, all ranks together)."""
        if self.state.batch >= self.steps_per_epoch:  # resumed with a larger batch size
            self.state.epoch, self.state.batch = self.state.epoch + 1, 0
        seed = epoch_seed(self.settings.seed, self.state.epoch)
        self.batch_sampler.set_epoch(self.state.epoch, self.state.batch)
        if self.train_loader.generator is not None:  # worker seeds, away from the global RNG
            self.train_loader.generator.manual_seed(seed * 1_000_003 + self.state.batch)
        try:
            yield from self.train_loader
        except DataError as error:
            yield error

    # --- evaluation, logging, checkpoints -------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Metrics on the validation set (EMA weights when EMA is on)."""
        if self.val_loader is None:
            return {}
        parts = self.parts
        with parts.averaged():
            totals = evaluate(
                parts.model,
                self.val_loader,
                parts.transform,
                parts.device,
                with_forces=parts.loss.with_forces,
                eval_on_free_atoms=parts.eval_on_free_atoms,
            )
        return totals.compute()

    def _validate(self) -> dict[str, float]:
        metrics = self.validate()
        if not metrics:
            return metrics
        epoch = self.state.step / self.steps_per_epoch
        self.logger.log(metrics, step=self.state.step, split="val", epoch=epoch)
        log.info(
            "val step %d epoch %.2f\n%s", self.state.step, epoch, format_metrics_table(metrics)
        )
        value = metrics.get(self.primary, math.nan)
        self.parts.schedule.step_eval(value)
        if is_better(self.primary, value, self.state.best_metric):
            self.state.best_metric = value
            self.checkpointer.save_best(self.parts, self.state, self.steps_per_epoch, metrics)
        return metrics

    def _log_train(self, metrics: dict[str, float]) -> None:
        metrics["lr"] = self.parts.schedule.lr
        epoch = self.state.step / self.steps_per_epoch
        self.logger.log(metrics, step=self.state.step, split="train", epoch=epoch)
        if not progress_enabled():
            shown = ", ".join(f"{name}: {value:.4g}" for name, value in metrics.items())
            log.info("step %d epoch %.2f: %s", self.state.step, epoch, shown)

    def _save_training(self, val_metrics: dict[str, float]) -> Path | None:
        """``checkpoint.pt`` of this step (see :meth:`Checkpointer.save`)."""
        return self.checkpointer.save(self.parts, self.state, self.steps_per_epoch, val_metrics)

    def _preempted(self, val_metrics: dict[str, float]) -> Preempted:
        """Write the checkpoint of this step (rank 0) and wait until it is on disk."""
        log.warning("stop requested: writing a checkpoint at step %d", self.state.step)
        saved = self._save_training(val_metrics) or self.checkpointer.path
        barrier()  # no rank exits (and makes a launcher kill rank 0) before the file is written
        number = self.stop.signal_number
        where = f"checkpoint {saved}" if saved is not None else "no checkpoint (--debug)"
        message = f"training stopped by {signal_name(number)} at step {self.state.step}; {where}"
        resume = "" if saved is None else f"resume with --checkpoint {saved}"
        return Preempted(message, resume, number)

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal (all ranks agree)."""
        flag = 1.0 if self.stop.requested else 0.0
        return (all_reduce_max(flag) if self.world_size > 1 else flag) > 0

    def _progress_bar(self) -> Any:
        return progress_bar(
            self.total_steps, desc="train", unit="step", initial=self.state.step, leave=True
        )
