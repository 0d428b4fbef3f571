"""Value checks across fields of a parsed config: optimisation settings and what a mode needs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from catforge.errors import ConfigError

if TYPE_CHECKING:
    from .schema import Config, OptimConfig

log = logging.getLogger(__name__)


def check_optim(optim: OptimConfig, where: str) -> None:
    """Raise a ConfigError for out-of-range optim values or an inconsistent LR schedule."""
    _check_optim_values(optim, where)
    _check_schedule(optim, where)


def _check_optim_values(optim: OptimConfig, where: str) -> None:
    positive = ("batch_size", "eval_batch_size", "max_epochs", "max_steps", "eval_every")
    for name in (*positive, "checkpoint_every", "lr_initial", "clip_grad_norm"):
        value = getattr(optim, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{where}: optim.{name} must be > 0, got {value}")
    for name in ("num_workers", "weight_decay", "energy_coefficient", "force_coefficient"):
        if getattr(optim, name) < 0:
            raise ConfigError(f"{where}: optim.{name} must be >= 0, got {getattr(optim, name)}")
    if optim.ema_decay is not None and not 0.0 < optim.ema_decay < 1.0:
        raise ConfigError(f"{where}: optim.ema_decay must be in (0, 1), got {optim.ema_decay}")


def _check_schedule(optim: OptimConfig, where: str) -> None:
    if optim.warmup_steps is not None and optim.warmup_epochs is not None:
        raise ConfigError(f"{where}: give optim.warmup_steps or optim.warmup_epochs, not both")
    if optim.warmup_epochs is not None and optim.schedule_unit != "epochs":
        raise ConfigError(
            f"{where}: optim.warmup_epochs needs schedule_unit: epochs (got "
            f"'{optim.schedule_unit}'); use warmup_steps for the length in {optim.schedule_unit}"
        )
    milestones = optim.lr_milestones
    if list(milestones) != sorted(milestones) or any(m <= 0 for m in milestones):
        raise ConfigError(f"{where}: optim.lr_milestones must be positive and ascending")
    if optim.warmup < 0:
        raise ConfigError(f"{where}: the warmup length must be >= 0, got {optim.warmup}")
    if optim.schedule_unit == "fraction" and (max(milestones, default=0) > 1 or optim.warmup > 1):
        raise ConfigError(
            f"{where}: with schedule_unit: fraction, optim.lr_milestones and the warmup are "
            "fractions of the total steps, in [0, 1]"
        )
    if optim.schedule_unit == "steps" and milestones and max(milestones) < 100:
        log.warning(
            "%s: optim.lr_milestones %s are in steps but look like epochs; set "
            "schedule_unit: epochs if they are",
            where,
            list(milestones),
        )
    if optim.scheduler is not None and (milestones or optim.warmup):
        log.warning(
            "%s: optim.lr_milestones and warmup are used only without optim.scheduler "
            "(got scheduler %r); they are ignored",
            where,
            optim.scheduler,
        )


def check_mode_requirements(config: Config, where: str = "") -> None:
    """Raise a ConfigError when ``config.options.mode`` needs a section the config lacks."""
    try:
        _check_mode(config)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from error


def _check_mode(config: Config) -> None:
    mode = config.options.mode
    if mode == "train":
        config.dataset.split("train")
        if config.optim.max_epochs is None and config.optim.max_steps is None:
            raise ConfigError("training needs optim.max_epochs or optim.max_steps")
    elif mode == "validate":
        config.dataset.split("val")
    elif mode == "predict":
        config.dataset.split("test")
    elif mode == "run-relaxations":
        if config.trainer != "forces":
            raise ConfigError("run-relaxations needs trainer: forces")
        if config.task.relax_dataset is None:
            raise ConfigError("run-relaxations needs task.relax_dataset: {src: ...}")
