"""Optimizer by name, OCP's warmup + milestone LR schedule, torch schedulers by name, EMA, clipping.

LR schedule semantics (OCP V3 ``LRScheduler`` with ``warmup_lr_lambda``): a ``LambdaLR`` whose
factor for step ``x`` (the number of optimizer steps done) is
``warmup_factor * (1 - x / warmup) + x / warmup`` while ``x <= warmup``, then
``gamma ** bisect(milestones, x)``. Python's ``bisect.bisect`` *is* ``bisect_right``, so the
decay at milestone ``m`` already applies at ``x == m`` (``bisect_left`` would apply it one step
later). Schedules are stepped after every optimizer step; milestones and warmup may be given in
steps, epochs or fractions of training and are converted to steps at run time
(:func:`resolve_schedule_steps`), so they no longer need rewriting when the global batch changes.
T0 counted epochs with one ``scheduler.step()`` per epoch; given in epochs here, milestones fall
on the same epoch boundaries, while the warmup ramps per step instead of per epoch.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer, lr_scheduler

from catforge.errors import CheckpointError, ConfigError
from catforge.registry import OPTIMIZERS, SCHEDULERS, lookup_name

log = logging.getLogger(__name__)

__all__ = [
    "NO_DECAY_KEYS",
    "ExponentialMovingAverage",
    "LRSchedule",
    "build_optimizer",
    "build_scheduler",
    "clip_gradients",
    "resolve_schedule_steps",
    "warmup_milestone_factor",
]

NO_DECAY_KEYS = ("embedding", "frequencies", "bias")


def _checked_kwargs(
    cls: type, kwargs: Mapping[str, Any], what: str, reserved: Sequence[str]
) -> dict[str, Any]:
    """``kwargs`` checked against ``cls.__init__``: unknown, reserved or missing names raise."""
    params = inspect.signature(cls).parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = {n: p for n, p in params.items() if n != "self" and p.kind in named}
    for key in kwargs:
        if key in reserved:
            raise ConfigError(f"{what}: '{key}' is set by catforge; remove it from the parameters")
        allowed = {n: p for n, p in valid.items() if n not in reserved}
        lookup_name(allowed, key, f"argument of {what}")
    missing = [
        n
        for n, p in valid.items()
        if p.default is inspect.Parameter.empty and n not in reserved and n not in kwargs
    ]
    if missing:
        raise ConfigError(f"{what} needs argument(s) {missing}; add them to the optim block")
    return dict(kwargs)


def build_optimizer(
    model: nn.Module,
    name: str = "AdamW",
    *,
    lr: float,
    weight_decay: float | None = None,
    optimizer_params: Mapping[str, Any] | None = None,
) -> Optimizer:
    """Any ``torch.optim`` optimizer by name over the trainable parameters of ``model``.

    Weight decay follows OCP's ``base_trainer.load_optimizer``:

    - ``weight_decay > 0``: parameters whose names contain "embedding", "frequencies" or "bias"
      get none, the others ``weight_decay``;
    - ``None`` (``optim.weight_decay`` not in the config): one group of all parameters with the
      optimizer's own default (AdamW: 0.01, logged) or ``optimizer_params["weight_decay"]``;
    - ``0``: no weight decay (OCP fell back to the optimizer's default here as well).

    ``optimizer_params`` go to the constructor, checked against its signature.
    """
    cls = OPTIMIZERS.load(name)
    params = dict(optimizer_params or {})
    signature = inspect.signature(cls).parameters
    accepts_decay = "weight_decay" in signature
    if "weight_decay" in params and weight_decay is not None:
        raise ConfigError(
            f"optimizer {name}: weight_decay is given both in optim and optim.optimizer_params; "
            "keep one"
        )
    kwargs = _checked_kwargs(cls, params, f"optimizer {name}", ("params", "lr"))
    if weight_decay is not None and (weight_decay < 0 or (weight_decay > 0 and not accepts_decay)):
        raise ConfigError(f"optimizer {name}: weight_decay {weight_decay} is not allowed")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups: list[dict[str, Any]]
    if weight_decay is not None and weight_decay > 0:
        no_decay = [p for n, p in named if any(key in n for key in NO_DECAY_KEYS)]
        decay = [p for n, p in named if not any(key in n for key in NO_DECAY_KEYS)]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [group for group in groups if group["params"]]
    elif weight_decay is not None and accepts_decay:
        groups = [{"params": [p for _, p in named], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in named]}]
        if accepts_decay and "weight_decay" not in kwargs:
            log.info(
                "optim.weight_decay not set: using %g on all parameters, the %s default OCP "
                "used; set optim.weight_decay to choose (> 0 exempts biases and embeddings)",
                signature["weight_decay"].default,
                name,
            )
    optimizer: Optimizer = cls(groups, lr=lr, **kwargs)  # type: ignore[call-arg]
    return optimizer


def warmup_milestone_factor(
    step: int, warmup_steps: int, warmup_factor: float, milestones: Sequence[int], gamma: float
) -> float:
    """OCP's ``warmup_lr_lambda``: the LR multiplier after ``step`` optimizer steps.

    ``step <= warmup_steps``: linear from ``warmup_factor`` to 1; after: ``gamma ** k`` with
    ``k = bisect_right(milestones, step)`` (Python's ``bisect``). ``warmup_steps == 0`` means no
    warmup (OCP divided by zero there).
    """
    if warmup_steps > 0 and step <= warmup_steps:
        alpha = step / float(warmup_steps)
        return warmup_factor * (1.0 - alpha) + alpha
    return float(gamma ** bisect.bisect_right(milestones, step))


def resolve_schedule_steps(
    values: float | Sequence[float],
    unit: Literal["steps", "epochs", "fraction"],
    steps_per_epoch: int,
    total_steps: int,
) -> tuple[int, ...]:
    """Milestones or warmup given in ``unit`` -> optimizer steps (rounded to the nearest step).

    ``epochs``: ``value * steps_per_epoch``; ``fraction``: ``value * total_steps`` (0..1).
    """
    items = [values] if isinstance(values, int | float) else list(values)
    scale = {"steps": 1, "epochs": steps_per_epoch, "fraction": total_steps}.get(unit)
    if scale is None:
        raise ConfigError(f"schedule unit must be 'steps', 'epochs' or 'fraction', got '{unit}'")
    steps = []
    for value in items:
        if not math.isfinite(value) or value < 0 or (unit == "fraction" and value > 1):
            raise ConfigError(f"schedule value {value!r} is out of range for unit '{unit}'")
        if unit == "steps" and value != int(value):
            raise ConfigError(f"schedule value {value!r} in steps must be a whole number")
        steps.append(round(value * scale))
    return tuple(steps)


class LRSchedule:
    """A scheduler with one stepping rule: :meth:`step_batch` after every optimizer step,
    :meth:`step_eval` after every evaluation (only ``ReduceLROnPlateau`` acts on it)."""

    def __init__(self, optimizer: Optimizer, scheduler: Any | None, name: str) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.name = name
        self.on_plateau = isinstance(scheduler, lr_scheduler.ReduceLROnPlateau)

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def step_batch(self) -> None:
        if self.scheduler is not None and not self.on_plateau:
            self.scheduler.step()

    def step_eval(self, metric_value: float) -> None:
        if self.on_plateau and self.scheduler is not None:
            self.scheduler.step(metric_value)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scheduler is None else dict(self.scheduler.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(dict(state))


def build_scheduler(
    optimizer: Optimizer,
    name: str | None = None,
    *,
    steps_per_epoch: int,
    total_steps: int,
    warmup: float = 0.0,
    warmup_factor: float = 0.2,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    unit: Literal["steps", "epochs", "fraction"] = "steps",
    params: Mapping[str, Any] | None = None,
    metric: tuple[str, Literal["min", "max"]] | None = None,
) -> LRSchedule:
    """The LR schedule ``name`` (OCP's ``optim.scheduler``).

    - None or ``"LambdaLR"`` (OCP's default): warmup + milestones (``warmup``/``milestones`` in
      ``unit``), or a constant LR when neither is set.
    - ``"Null"``: constant LR (OCP: no scheduler); warmup/milestones are ignored with a warning.
    - any ``torch.optim.lr_scheduler`` class: built with ``params`` (checked against its
      signature), stepped per batch (step counts in its arguments are optimizer steps);
      ``CosineAnnealingLR.T_max`` and ``OneCycleLR.total_steps`` default to ``total_steps``.
    - ``"ReduceLROnPlateau"``: stepped at each eval with the primary val metric, ``metric`` =
      (its name, its direction). As OCP's trainers (``scheduler.step(val_metrics[primary])``,
      kwargs passed to torch as given), ``mode`` is the config's, else torch's default
      ``"min"``; a warning says so when it is not the metric's direction (OCP's S2EF configs
      with ``mode: min`` step on ``energy_force_within_threshold``, higher is better).
    """
    label = name or "LambdaLR"
    entry = SCHEDULERS.lookup(label)
    cls = entry.load() if entry.target else None  # no target: OCP's LambdaLR or Null
    has_ocp_schedule = bool(warmup) or bool(milestones)
    if cls is None:
        if params:
            raise ConfigError(f"scheduler {label} takes no parameters, got {sorted(params)}")
        if label == "Null" or not has_ocp_schedule:
            if has_ocp_schedule:
                log.warning("scheduler 'Null': warmup and lr_milestones are ignored")
            return LRSchedule(optimizer, None, "constant")
        (warmup_steps,) = resolve_schedule_steps(warmup, unit, steps_per_epoch, total_steps)
        steps = resolve_schedule_steps(milestones, unit, steps_per_epoch, total_steps)
        scheduler = _ocp_lambda(optimizer, warmup_steps, warmup_factor, steps, gamma, unit)
        return LRSchedule(optimizer, scheduler, "LambdaLR")
    if has_ocp_schedule:
        log.warning("scheduler %s: warmup and lr_milestones are ignored", label)
    kwargs = dict(params or {})
    if label == "ReduceLROnPlateau":
        _check_plateau_mode(kwargs.get("mode", "min"), metric)
    elif label == "CosineAnnealingLR":
        kwargs.setdefault("T_max", total_steps)
    elif label == "OneCycleLR" and "epochs" not in kwargs:
        kwargs.setdefault("total_steps", total_steps)
    kwargs = _checked_kwargs(cls, kwargs, f"scheduler {label}", ("optimizer", "last_epoch"))
    return LRSchedule(optimizer, cls(optimizer, **kwargs), label)


def _check_plateau_mode(mode: object, metric: tuple[str, str] | None) -> None:
    """Warn when ReduceLROnPlateau's ``mode`` is not the direction of the metric it steps on."""
    if metric is None or mode == metric[1]:
        return
    name, direction = metric
    better = "higher" if direction == "max" else "lower"
    log.warning(
        "scheduler ReduceLROnPlateau steps on the primary metric %s (%s is better) with mode "
        "'%s', as OCP's trainer does: the LR drops when %s stops %s. Set optim.mode: %s (or "
        "another task.primary_metric) to drop it when the metric stops improving",
        name,
        better,
        mode,
        name,
        "decreasing" if mode == "min" else "increasing",
        direction,
    )


def _ocp_lambda(
    optimizer: Optimizer,
    warmup_steps: int,
    warmup_factor: float,
    steps: tuple[int, ...],
    gamma: float,
    unit: str,
) -> lr_scheduler.LambdaLR:
    """OCP's warmup + milestones LambdaLR (all counts in optimizer steps)."""
    if list(steps) != sorted(steps):
        raise ConfigError(f"lr_milestones must increase, got {list(steps)} (steps)")
    if unit == "steps" and steps and max(steps) < 100:
        log.warning("lr_milestones %s look like epochs; set the schedule unit to 'epochs'?", steps)
    log.info(
        "LR schedule: warmup %d steps, milestones %s (steps), gamma %g", warmup_steps, steps, gamma
    )
    factor = functools.partial(
        warmup_milestone_factor,
        warmup_steps=warmup_steps,
        warmup_factor=warmup_factor,
        milestones=steps,
        gamma=gamma,
    )
    return lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)


class ExponentialMovingAverage:
    """EMA of parameters (OCP V3 / torch_ema): ``shadow += (1 - decay) * (p - shadow)``.

    Call :meth:`update` after every optimizer step; swap the averages in for evaluation with
    :meth:`average_parameters` (or :meth:`store`, :meth:`copy_to`, :meth:`restore`). With
    ``use_num_updates`` the decay is ``min(decay, (1 + n) / (10 + n))`` (torch_ema; off as in OCP).
    """

    def __init__(
        self, parameters: Iterable[Tensor], decay: float, use_num_updates: bool = False
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"ema_decay must be between 0 and 1, got {decay}")
        self.parameters = [p for p in parameters if p.requires_grad]
        self.decay = decay
        self.num_updates: int | None = 0 if use_num_updates else None
        self.shadow_params = [p.detach().clone() for p in self.parameters]
        self.collected_params: list[Tensor] = []

    @torch.no_grad()
    def update(self) -> None:
        decay = self.decay
        if self.num_updates is not None:
            self.num_updates += 1
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        for shadow, param in zip(self.shadow_params, self.parameters, strict=True):
            shadow.lerp_(param.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the averages into the parameters."""
        for shadow, param in zip(self.shadow_params, self.parameters, strict=True):
            param.copy_(shadow)

    @torch.no_grad()
    def store(self) -> None:
        """Keep a copy of the current parameters for :meth:`restore`."""
        self.collected_params = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the parameters saved by :meth:`store`."""
        if not self.collected_params:
            raise RuntimeError("EMA restore() without a preceding store()")
        for saved, param in zip(self.collected_params, self.parameters, strict=True):
            param.copy_(saved)
        self.collected_params = []

    @contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Within the block the parameters hold the averages; afterwards the trained values."""
        self.store()
        self.copy_to()
        try:
            yield
        finally:
            self.restore()

    def state_dict(self) -> dict[str, Any]:
        """torch_ema/OCP layout: decay, num_updates, shadow_params, collected_params."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow_params": [s.clone() for s in self.shadow_params],
            "collected_params": [c.clone() for c in self.collected_params],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadows = list(state["shadow_params"])
        shapes = [tuple(s.shape) for s in shadows]
        if shapes != [tuple(p.shape) for p in self.parameters]:
            raise CheckpointError(
                "EMA state does not match the model's parameters; wrong checkpoint?"
            )
        self.decay = float(state["decay"])
        self.num_updates = state.get("num_updates")
        self.shadow_params = [s.to(p) for s, p in zip(shadows, self.parameters, strict=True)]
        collected = state.get("collected_params") or []
        self.collected_params = [c.to(p) for c, p in zip(collected, self.parameters, strict=False)]


def clip_gradients(parameters: Iterable[Tensor], max_norm: float | None) -> Tensor:
    """Total L2 norm of the gradients before clipping; clip it to ``max_norm`` when given."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm is None:
        norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms))
    if not max_norm > 0:
        raise ConfigError(f"clip_grad_norm must be > 0, got {max_norm}")
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
