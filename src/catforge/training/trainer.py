"""The one trainer: ``trainer: energy`` (IS2RE) and ``trainer: forces`` (S2EF) differ in targets."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.parallel import DistributedDataParallel

from catforge.checkpoint import save_checkpoint
from catforge.config import Config
from catforge.data.graph import AtomicGraph
from catforge.data.samplers import ShardedBatchSampler, balance_weights, epoch_seed
from catforge.distributed import (
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
    get_rank,
    get_world_size,
    is_main,
)
from catforge.errors import ConfigError, DataError
from catforge.evaluate import evaluate, output_totals
from catforge.loggers import RunLogger
from catforge.metrics import (
    MetricTotals,
    format_metrics_table,
    is_better,
    metric_direction,
    primary_metric,
)
from catforge.models.forces import ForceModel
from catforge.potential import energy_field, with_forces
from catforge.preemption import Preempted, StopRequest, signal_name
from catforge.progress import Heartbeat, progress_enabled
from catforge.runs import RunPaths
from catforge.targets import TargetTransform
from catforge.training.build import (
    build_eval_loader,
    build_loader,
    build_transform,
    worker_error_message,
)
from catforge.training.losses import LossResult, energy_loss, s2ef_loss
from catforge.training.optim import (
    ExponentialMovingAverage,
    LRSchedule,
    build_optimizer,
    build_scheduler,
    clip_gradients,
)
from catforge.training.resume import (
    better_of,
    rng_state,
    set_rng_state,
    stored_best,
)
from catforge.training.window import MetricsWindow, timed

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters of a run: optimizer steps taken, finished epochs, best primary metric, and
    batches of the current epoch already consumed (where a resumed epoch continues)."""

    step: int = 0
    epoch: int = 0
    best_metric: float | None = None
    batch: int = 0


class Trainer:
    """Trains a ForceModel on ``dataset.train``, evaluating on ``dataset.val``.

    ``resume`` (a ``checkpoint.pt`` dict) continues that run exactly: counters, position in
    the epoch, optimizer, schedule, EMA, normalisers, AMP scaler, best metric and RNG states.

    Under DDP (an initialised process group) every rank trains its share of each global batch of
    ``world_size * batch_size`` structures, losses are normalised by the global counts (so the
    result equals one process with the global batch), and only rank 0 writes checkpoints.
    A stop request (:meth:`train`'s ``stop``) ends training after the current step with a
    checkpoint (:mod:`catforge.preemption`); so does a bad data entry, before its error is
    raised, so that the run can resume once the entry is fixed or skipped.
    """

    def __init__(
        self,
        config: Config,
        model: ForceModel,
        train_set: Any,
        val_set: Any | None,
        paths: RunPaths,
        device: torch.device,
        logger: RunLogger,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        self.config, self.paths, self.device, self.logger = config, paths, device, logger
        self.stop = StopRequest()
        optim = config.optim
        self.model = model.to(device)
        self.world_size = get_world_size()
        self.train_model: torch.nn.Module = self.model
        if self.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.transform = self._build_transform(train_set, resume)
        seed = config.options.seed
        self.batch_sampler = ShardedBatchSampler(
            len(train_set), optim.batch_size, seed, rank=get_rank(), world_size=self.world_size,
            weights=balance_weights(train_set, optim.load_balancing),
        )  # fmt: skip
        self.train_loader = build_loader(
            train_set, num_workers=optim.num_workers, seed=seed, batch_sampler=self.batch_sampler
        )
        self.val_loader = None if val_set is None else build_eval_loader(config, val_set)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set has {len(train_set)} structures, too few for one step of "
                f"{self.world_size} processes; use more data or fewer processes"
            )
        self.total_steps = optim.max_steps or (optim.max_epochs or 1) * self.steps_per_epoch
        self.eval_every = optim.eval_every or self.steps_per_epoch
        self.checkpoint_every = optim.checkpoint_every or self.eval_every
        self.task = "s2ef" if with_forces(config) else "is2re"
        self.primary = config.task.primary_metric or primary_metric(self.task)
        self.optimizer = build_optimizer(
            self.model, optim.optimizer, lr=optim.lr_initial,
            weight_decay=optim.weight_decay, optimizer_params=optim.optimizer_params,
        )  # fmt: skip
        self.schedule = self._build_schedule()
        self.ema = (
            ExponentialMovingAverage(self.model.parameters(), optim.ema_decay)
            if optim.ema_decay
            else None
        )
        self.amp = config.options.amp and device.type == "cuda"
        if config.options.amp and not self.amp:
            log.warning("--amp is ignored on %s: mixed precision runs on CUDA only", device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.state = TrainState()
        self._saved_step: int | None = None
        self._last_val: dict[str, float] = {}
        if resume is not None:
            self._restore(resume)

    def _build_transform(self, train_set: Any, resume: Mapping[str, Any] | None) -> TargetTransform:
        """The checkpoint's normalisers when resuming, else those of the config/training set."""
        if resume is None or not resume.get("normalizers"):
            return build_transform(self.config, train_set)
        transform = TargetTransform(field=energy_field(self.config))
        transform.load_state_dict(resume["normalizers"])
        return transform

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Load the training state of a ``checkpoint.pt``; RNG states last."""
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            self.schedule.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if self.amp and state.get("amp"):
            self.scaler.load_state_dict(state["amp"])
        step = int(state.get("step", 0))
        if "batch_in_epoch" in state:
            epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
            saved_steps = int(state.get("steps_per_epoch") or self.steps_per_epoch)
            if saved_steps != self.steps_per_epoch:  # another global batch size (e.g. more ranks)
                batch = round(batch * self.steps_per_epoch / saved_steps)
        else:  # OCP checkpoints: a (possibly fractional) epoch only
            epoch, batch = divmod(step, self.steps_per_epoch)
        same_metric = state.get("primary_metric", self.primary) == self.primary
        best = state.get("best_val_metric") if same_metric else None
        best_file = stored_best(self.paths.checkpoint_dir / "best_checkpoint.pt", self.primary)
        self.state = TrainState(step, epoch, better_of(self.primary, best, best_file), batch)
        self._saved_step = step
        set_rng_state(state.get("rng"))
        log.info(
            "resumed at step %d (epoch %d, batch %d of %d), best %s %s",
            step, epoch, batch, self.steps_per_epoch, self.primary, self.state.best_metric,
        )  # fmt: skip

    def _build_schedule(self) -> LRSchedule:
        """The LR schedule; ReduceLROnPlateau steps on the primary val metric (as OCP)."""
        optim = self.config.optim
        direction: Literal["min", "max"] = (
            "max" if metric_direction(self.primary) == "max" else "min"
        )
        return build_scheduler(
            self.optimizer, optim.scheduler, steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps, warmup=optim.warmup, warmup_factor=optim.warmup_factor,
            milestones=optim.lr_milestones, gamma=optim.lr_gamma, unit=optim.schedule_unit,
            params=optim.scheduler_params, metric=(self.primary, direction),
        )  # fmt: skip

    # --- training -------------------------------------------------------------------------------

    def train(self, stop: StopRequest | None = None) -> dict[str, float]:
        """Run to ``max_steps``/``max_epochs``; return the last validation metrics.

        ``stop`` (from :func:`catforge.preemption.stop_requests`) ends the run after the
        current step with a checkpoint, raising :class:`~catforge.preemption.Preempted`.
        """
        self.stop = stop or self.stop
        if self.state.step >= self.total_steps:
            log.warning(
                "nothing to train: the run is already at step %d of %d; raise optim.max_steps "
                "or optim.max_epochs to train further",
                self.state.step, self.total_steps,
            )  # fmt: skip
            return {}
        log.info(
            "training %s: %d structures, %d steps per epoch, %d steps, device %s",
            self.task, len(self.train_loader.dataset), self.steps_per_epoch,  # type: ignore[arg-type]
            self.total_steps, self.device,
        )  # fmt: skip
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
                result, grad_norm, totals = self._train_step(batch)
                state.step += 1
                state.batch += 1
                epoch_end = state.batch >= self.steps_per_epoch
                if epoch_end:
                    state.epoch, state.batch = state.epoch + 1, 0
                window.add(result, grad_norm, totals, batch.n_graphs, waited)
                bar.update(1)
                bar.set_postfix(loss=f"{float(result.total.detach()):.4f}", refresh=False)
                if state.step % self.config.options.print_every == 0:
                    self._log_train(window.flush())
                    heartbeat.reset()
                elif bar.disable and heartbeat.due():
                    log.info(
                        "step %d of %d (epoch %.2f), %.3g steps/s", state.step, self.total_steps,
                        state.step / self.steps_per_epoch, heartbeat.rate(state.step - first_step),
                    )  # fmt: skip
                done = state.step >= self.total_steps
                if state.step % self.eval_every == 0 or done:
                    self._last_val = self._validate() or self._last_val
                if epoch_end or done or state.step % self.checkpoint_every == 0:
                    self._save_training(self._last_val)
                if self._stop_requested():
                    bar.close()
                    raise self._preempted(self._last_val)
                if done:
                    break
        bar.close()
        if window.count:
            self._log_train(window.flush())

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
            written = written or self._checkpoint_path
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
        seed = epoch_seed(self.config.options.seed, self.state.epoch)
        self.batch_sampler.set_epoch(self.state.epoch, self.state.batch)
        if self.train_loader.generator is not None:  # worker seeds, away from the global RNG
            self.train_loader.generator.manual_seed(seed * 1_000_003 + self.state.batch)
        try:
            yield from self.train_loader
        except DataError as error:
            yield error

    def _train_step(self, batch: AtomicGraph) -> tuple[LossResult, float, MetricTotals]:
        batch = batch.to(self.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else _null()
        with autocast:
            output = self.train_model(batch, training=True)
            result = self._loss(output.energy, output.forces, batch)
        self.scaler.scale(result.total).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.model.parameters(), self.config.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        self.schedule.step_batch()
        with torch.no_grad():
            totals = output_totals(
                output.energy, output.forces, batch, self.transform,
                with_forces=with_forces(self.config),
                eval_on_free_atoms=self.config.task.eval_on_free_atoms,
            )  # fmt: skip
        return result, float(grad_norm), totals

    def _loss(
        self, energy: torch.Tensor, forces: torch.Tensor | None, batch: AtomicGraph
    ) -> LossResult:
        optim = self.config.optim
        energy_target, forces_target = self.transform.normalize_batch(batch)
        # Under DDP: local sums over global counts (see training/losses.py).
        reduce = all_reduce_sum if self.world_size > 1 else None
        if not with_forces(self.config):
            return energy_loss(
                energy.float(), energy_target, loss_energy=optim.loss_energy,
                energy_coefficient=optim.energy_coefficient,
                reduce_count=reduce, world_size=self.world_size,
            )  # fmt: skip
        task = self.config.task
        return s2ef_loss(
            energy.float(), energy_target, None if forces is None else forces.float(),
            forces_target, fixed=batch.fixed, loss_energy=optim.loss_energy,
            loss_force=optim.loss_force, energy_coefficient=optim.energy_coefficient,
            force_coefficient=optim.force_coefficient,
            train_on_free_atoms=task.train_on_free_atoms,
            tag_weights=task.tag_specific_weights or None, tags=batch.tags, natoms=batch.natoms,
            reduce_count=reduce, world_size=self.world_size,
        )  # fmt: skip

    # --- evaluation, logging, checkpoints -------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Metrics on the validation set (EMA weights when EMA is on)."""
        if self.val_loader is None:
            return {}
        with self.ema.average_parameters() if self.ema is not None else _null():
            totals = evaluate(
                self.model, self.val_loader, self.transform, self.device,
                with_forces=with_forces(self.config),
                eval_on_free_atoms=self.config.task.eval_on_free_atoms,
            )  # fmt: skip
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
        self.schedule.step_eval(value)
        if is_better(self.primary, value, self.state.best_metric):
            self.state.best_metric = value
            with self.ema.average_parameters() if self.ema is not None else _null():
                self._save_best(metrics)
        return metrics

    def _log_train(self, metrics: dict[str, float]) -> None:
        metrics["lr"] = self.schedule.lr
        epoch = self.state.step / self.steps_per_epoch
        self.logger.log(metrics, step=self.state.step, split="train", epoch=epoch)
        if not progress_enabled():
            shown = ", ".join(f"{name}: {value:.4g}" for name, value in metrics.items())
            log.info("step %d epoch %.2f: %s", self.state.step, epoch, shown)

    def _model_state(self, val_metrics: dict[str, float]) -> dict[str, Any]:
        """What any checkpoint holds: weights, normalisers, config, counters, metrics."""
        return {
            "run_id": self.paths.timestamp_id,
            "epoch": self.state.epoch,
            "step": self.state.step,
            "batch_in_epoch": self.state.batch,
            "steps_per_epoch": self.steps_per_epoch,
            "state_dict": self.model.state_dict(),
            "normalizers": self.transform.state_dict(),
            "config": self.config.to_dict(),
            "val_metrics": val_metrics,
            "amp": self.scaler.state_dict() if self.amp else None,
            "best_val_metric": self.state.best_metric,
            "primary_metric": self.primary,
        }

    def _preempted(self, val_metrics: dict[str, float]) -> Preempted:
        """Write the checkpoint of this step (rank 0) and wait until it is on disk."""
        log.warning("stop requested: writing a checkpoint at step %d", self.state.step)
        saved = self._save_training(val_metrics) or self._checkpoint_path
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

    @property
    def _checkpoint_path(self) -> Path | None:
        return None if self.config.options.debug else self.paths.checkpoint_dir / "checkpoint.pt"

    def _save_training(self, val_metrics: dict[str, float]) -> Path | None:
        """``checkpoint.pt``: the full training state (at most once per step; rank 0 writes)."""
        if self.config.options.debug or self._saved_step == self.state.step:
            return None
        self._saved_step = self.state.step
        if not is_main():
            return None
        state = {
            **self._model_state(val_metrics),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "rng": rng_state(),
        }
        return save_checkpoint(state, self.paths.checkpoint_dir / "checkpoint.pt")

    def _save_best(self, val_metrics: dict[str, float]) -> Path | None:
        """``best_checkpoint.pt``: the current (EMA, when on) weights for inference."""
        if self.config.options.debug or not is_main():
            return None
        state = self._model_state(val_metrics)
        return save_checkpoint(state, self.paths.checkpoint_dir / "best_checkpoint.pt")

    def _progress_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps, initial=self.state.step, desc="train", unit="step",
            disable=not progress_enabled(), dynamic_ncols=True,
        )  # fmt: skip


def _null() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()
