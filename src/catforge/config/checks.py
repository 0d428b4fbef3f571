"""Value checks across fields of a parsed config: optimisation settings and what a mode needs."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from catforge.errors import ConfigError

if TYPE_CHECKING:
    from .schema import Config, OptimConfig, TaskConfig

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
        value = getattr(optim, name)
        if value is not None and value < 0:
            raise ConfigError(f"{where}: optim.{name} must be >= 0, got {value}")
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
    if optim.schedule_unit == "steps":
        named = [("optim.warmup_steps", optim.warmup)]
        named += [("optim.lr_milestones", value) for value in milestones]
        for name, value in named:
            if not math.isfinite(value) or value != int(value):
                raise ConfigError(
                    f"{where}: {name} {value!r} is in steps (schedule_unit: steps) and must be a "
                    "whole number; set schedule_unit: epochs or fraction for fractional values"
                )
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


def check_task(task: TaskConfig, raw: Mapping[str, Any]) -> None:
    """Raise a ConfigError for task values catforge cannot run; log the OCP defaults an IS2RS
    config relies on (``raw``: the task section as written)."""
    optimizer = task.relax_opt.optimizer
    if optimizer != "LBFGS":
        hint = " (the name is case-sensitive)" if optimizer.upper() == "LBFGS" else ""
        raise ConfigError(
            f"task.relax_opt.optimizer '{optimizer}' is not available{hint}: relaxations use "
            "LBFGS, the only optimizer (as in OCP); set it to LBFGS or remove the key"
        )
    weights = task.tag_specific_weights
    if weights and (len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights)):
        raise ConfigError(
            f"task.tag_specific_weights must be three weights >= 0 [w0, w1, w2] for tags 0 "
            f"(subsurface), 1 (surface) and 2 (adsorbate), got {list(weights)}"
        )
    if weights and sum(weights) == 0:
        raise ConfigError("task.tag_specific_weights are all 0: no atom would be trained on")
    if task.relax_dataset is None:
        return
    for key, value in (("relaxation_steps", "200"), ("relaxation_fmax", "0.0 eV/A")):
        if key not in raw:
            log.info("task.%s not set: using %s, OCP's default", key, value)


def check_tag_weights(config: Config, where: str) -> None:
    """Log what ``task.tag_specific_weights`` replace (OCP's rule; see
    :mod:`catforge.training.losses`)."""
    weights = list(config.task.tag_specific_weights)
    if not weights:
        return
    if config.trainer != "forces":
        log.warning(
            "%s: task.tag_specific_weights weigh forces; trainer: energy ignores them", where
        )
        return
    optim, task = config.optim, config.task
    unused = []
    if optim.force_coefficient != type(optim)().force_coefficient:
        unused.append(f"optim.force_coefficient {optim.force_coefficient:g}")
    if optim.loss_force not in ("mae", "l1"):
        unused.append(f"optim.loss_force {optim.loss_force}")
    if task.train_on_free_atoms:
        unused.append("task.train_on_free_atoms")
    message = (
        "%s: task.tag_specific_weights %s: the force loss is the tag-weighted mean absolute "
        "error over all atoms, with weight 1 (as OCP's forces_trainer)"
    )
    if unused:
        log.warning(message + "; not applied: %s", where, weights, ", ".join(unused))
    else:
        log.info(message, where, weights)


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
