"""``--mode train``: the trainer, its parts and its logger from the config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn.parallel import DistributedDataParallel

from catforge.assemble.data import evaluation_loader, open_split
from catforge.assemble.models import (
    build_model,
    checkpoint_transform,
    fitted_transform,
    with_forces,
)
from catforge.config import Config
from catforge.data.samplers import ShardedBatchSampler, balance_weights
from catforge.errors import ConfigError
from catforge.models.forces import ForceModel
from catforge.potential.checkpoint import load_checkpoint, load_weights
from catforge.potential.metrics import metric_direction, primary_metric
from catforge.registry import LOGGERS
from catforge.runtime.distributed import get_rank, get_world_size, is_main
from catforge.runtime.loggers import RunLogger, open_run_logger
from catforge.runtime.runs import RunPaths
from catforge.training.checkpointer import Checkpointer
from catforge.training.loaders import build_loader
from catforge.training.optim import (
    ExponentialMovingAverage,
    LRSchedule,
    build_optimizer,
    build_scheduler,
)
from catforge.training.step import LossSettings, TrainParts
from catforge.training.trainer import Trainer, TrainSettings

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What ``--mode train`` runs: the trainer and the logger it writes to."""

    trainer: Trainer
    logger: RunLogger


def loss_settings(config: Config) -> LossSettings:
    """The loss of ``optim`` and ``task`` for the config's trainer."""
    optim, task = config.optim, config.task
    return LossSettings(
        with_forces=with_forces(config),
        loss_energy=optim.loss_energy,
        loss_force=optim.loss_force,
        energy_coefficient=optim.energy_coefficient,
        force_coefficient=optim.force_coefficient,
        train_on_free_atoms=task.train_on_free_atoms,
        tag_weights=task.tag_specific_weights,
    )


def primary_of(config: Config) -> str:
    """The metric that picks ``best_checkpoint.pt`` and steps ReduceLROnPlateau:
    ``task.primary_metric``, else the task's default."""
    return config.task.primary_metric or primary_metric(config.task_name)


def schedule(
    config: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int
) -> LRSchedule:
    """The LR schedule of ``optim``; ReduceLROnPlateau steps on the primary val metric (OCP)."""
    optim = config.optim
    primary = primary_of(config)
    direction: Literal["min", "max"] = "max" if metric_direction(primary) == "max" else "min"
    return build_scheduler(
        optimizer,
        optim.scheduler,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup=optim.warmup,
        warmup_factor=optim.warmup_factor,
        milestones=optim.lr_milestones,
        gamma=optim.lr_gamma,
        unit=optim.schedule_unit,
        params=optim.scheduler_params,
        metric=(primary, direction),
    )


def _optimizer(config: Config, model: ForceModel) -> torch.optim.Optimizer:
    optim = config.optim
    return build_optimizer(
        model,
        optim.optimizer,
        lr=optim.lr_initial,
        weight_decay=optim.weight_decay,
        optimizer_params=optim.optimizer_params,
    )


def _check_schedule(config: Config) -> None:
    """Build the schedule once over a throwaway parameter, before any data: its settings fail
    here rather than after the label-statistics pass."""
    optim = config.optim
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.lr_initial)
    schedule_log = logging.getLogger(build_scheduler.__module__)
    level = schedule_log.level
    schedule_log.setLevel(logging.ERROR)  # its warnings come once, from the real schedule
    try:
        schedule(config, probe, steps_per_epoch=1, total_steps=optim.max_steps or 1)
    finally:
        schedule_log.setLevel(level)


def _starting_weights(config: Config, model: ForceModel, resume: dict[str, Any] | None) -> None:
    """A resumed run's weights, or ``optim.init_from``'s (fine-tuning), into ``model``."""
    if resume is not None:
        load_weights(model, resume["state_dict"], str(config.options.checkpoint))
    elif config.optim.init_from is not None:
        init = load_checkpoint(config.optim.init_from)
        strict = config.task.strict_load
        load_weights(model, init["state_dict"], str(config.optim.init_from), strict=strict)
        log.info("fine-tuning from the weights of %s", config.optim.init_from)


def training_run(
    config: Config, paths: RunPaths, device: torch.device, resume: dict[str, Any] | None = None
) -> TrainingRun:
    """Everything ``--mode train`` needs, checked in the order that fails fastest.

    ``resume`` (a ``checkpoint.pt`` dict) continues that run; its normalisers win over the
    config's and nothing is fitted again.
    """
    options, optim = config.options, config.optim
    model = build_model(config)
    _starting_weights(config, model, resume)
    optimizer = _optimizer(config, model)  # moving the model keeps its parameter objects
    _check_schedule(config)
    LOGGERS.lookup(config.logger.name).check_installed()
    train_set = open_split(config, "train", labelled=True)
    val_set = None if config.dataset.val is None else open_split(config, "val", labelled=True)
    if resume is not None and resume.get("normalizers"):
        transform = checkpoint_transform(config, resume)
    else:
        transform = fitted_transform(config, train_set)
    world_size = get_world_size()
    sampler = ShardedBatchSampler(
        len(train_set),  # type: ignore[arg-type]
        optim.batch_size,
        options.seed,
        rank=get_rank(),
        world_size=world_size,
        weights=balance_weights(train_set, optim.load_balancing),
    )
    loader = build_loader(
        train_set, num_workers=optim.num_workers, seed=options.seed, batch_sampler=sampler
    )
    settings = train_settings(config, len(loader), len(train_set))  # type: ignore[arg-type]
    model = model.to(device)
    parts = TrainParts(
        model=model,
        optimizer=optimizer,
        schedule=schedule(config, optimizer, settings.steps_per_epoch, settings.total_steps),
        transform=transform,
        loss=loss_settings(config),
        device=device,
        ema=ExponentialMovingAverage(model.parameters(), optim.ema_decay)
        if optim.ema_decay
        else None,
        amp=_amp(options.amp, device),
        clip_grad_norm=optim.clip_grad_norm,
        eval_on_free_atoms=config.task.eval_on_free_atoms,
        world_size=world_size,
        train_model=_ddp(model, device) if world_size > 1 else None,
    )
    writes = not options.debug
    checkpointer = Checkpointer(
        paths.checkpoint_dir if writes else None,
        run_id=paths.timestamp_id,
        config=config.to_dict(),
        primary=settings.primary,
    )
    logger = _logger(config, paths, resume) if writes and is_main() else RunLogger.disabled()
    trainer = Trainer(
        parts,
        settings,
        train_loader=loader,
        batch_sampler=sampler,
        val_loader=None if val_set is None else evaluation_loader(config, val_set),
        checkpointer=checkpointer,
        logger=logger,
        resume=resume,
    )
    return TrainingRun(trainer, logger)


def train_settings(config: Config, steps_per_epoch: int, n_structures: int) -> TrainSettings:
    """The loop's cadence in optimizer steps (``optim.max_*``, ``eval_every``, ...)."""
    optim = config.optim
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training set has {n_structures} structures, too few for one step of "
            f"{get_world_size()} processes; use more data or fewer processes"
        )
    total_steps = optim.max_steps or (optim.max_epochs or 1) * steps_per_epoch
    eval_every = optim.eval_every or steps_per_epoch
    return TrainSettings(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        eval_every=eval_every,
        checkpoint_every=optim.checkpoint_every or eval_every,
        primary=primary_of(config),
        task=config.task_name,
        print_every=config.options.print_every,
        seed=config.options.seed,
    )


def _amp(requested: bool, device: torch.device) -> bool:
    if requested and device.type != "cuda":
        log.warning("--amp is ignored on %s: mixed precision runs on CUDA only", device)
    return requested and device.type == "cuda"


def _ddp(model: ForceModel, device: torch.device) -> DistributedDataParallel:
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _logger(config: Config, paths: RunPaths, resume: dict[str, Any] | None) -> RunLogger:
    return open_run_logger(
        config.logger.name,
        logs_dir=paths.logs_dir,
        metrics_path=paths.results_dir / "metrics.jsonl",
        run_id=paths.timestamp_id,
        project=config.logger.project,
        resume_step=None if resume is None else int(resume.get("step", 0)),
    )
