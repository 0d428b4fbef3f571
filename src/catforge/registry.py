"""Every pluggable name of catforge, one table per kind, with one lookup and one suggestion rule.

Nothing here imports torch, numpy or a model: an entry names its implementation by import path
(``"catforge.models.schnet:SchNet"``) and is imported only by :meth:`Entry.load`, so a config is
parsed and checked against these tables without loading any of them. Adding a model is its module
plus one line in :data:`MODELS`; the parameters a ``model:`` block may set are the keyword
arguments of the class's ``__init__`` (read from its source by :mod:`catforge.config.parameters`).
Optimizers and schedulers are torch's; their entries declare the keyword arguments a config may
set (a test checks them against torch's signatures).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from catforge.errors import ConfigError


def suggest(name: str, valid: Iterable[str]) -> str | None:
    """The closest of ``valid`` to ``name``: equal ignoring case, else difflib's best, or None."""
    valid = list(valid)
    for candidate in valid:
        if candidate.lower() == name.lower():
            return candidate
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_name(name: str, valid: Iterable[str], what: str) -> ConfigError:
    """``unknown <what> 'name'. Did you mean 'x'? Valid names: a, b, c``."""
    valid = sorted(valid)
    close = suggest(name, valid)
    hint = f" Did you mean '{close}'?" if close else ""
    return ConfigError(f"unknown {what} '{name}'.{hint} Valid names: {', '.join(valid)}")


@dataclass(frozen=True)
class Entry:
    """One pluggable name: its implementation's import path and what a config may pass it.

    ``parameters``: the keyword arguments a config may set (None: those of the target's
    ``__init__``, read from its source). An empty ``target`` is one of catforge's own
    schedules, built by :func:`catforge.training.optim.build_scheduler`. ``package``:
    an optional dependency the entry needs, installed with ``pip install 'catforge[<extra>]'``.
    """

    target: str
    summary: str = ""
    parameters: tuple[str, ...] | None = None
    package: str | None = None
    extra: str | None = None

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    def load(self) -> Any:
        """The implementation (imported now); a missing optional package is a ConfigError."""
        self.check_installed()
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def check_installed(self, what: str = "") -> None:
        """Raise a ConfigError naming the extra when the optional package is not installed."""
        if self.package is None or importlib.util.find_spec(self.package) is not None:
            return
        extra = self.extra or self.package
        raise ConfigError(
            f"{what or self.summary} needs the {self.package} package: "
            f"pip install 'catforge[{extra}]'"
        )


class Table(Mapping[str, Entry]):
    """Entries of one kind by name; ``what`` names the kind and its config key in errors."""

    def __init__(self, what: str, entries: Mapping[str, Entry]) -> None:
        self.what = what
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, name: str) -> Entry:
        """The entry ``name``, or a ConfigError listing the valid names and the closest one."""
        if name in self._entries:
            return self._entries[name]
        raise unknown_name(name, self._entries, self.what)

    def load(self, name: str) -> Any:
        """The implementation of ``name`` (see :meth:`Entry.load`)."""
        return self.lookup(name).load()


_LMDB = "catforge.data.lmdb:LmdbDataset"

MODELS = Table(
    "model (model.name)",
    {
        "schnet": Entry("catforge.models.schnet:SchNet", "SchNet (Schuett et al. 2018)"),
        "morse": Entry("catforge.models.pairwise:Morse", "pairwise Morse potential (baseline)"),
    },
)
"""Energy models by ``model.name``; every model block may also set ``regress_forces``."""

DATASETS = Table(
    "dataset (task.dataset)",
    {
        "lmdb": Entry(_LMDB, "catforge / OCP LMDB"),
        "single_point_lmdb": Entry(_LMDB, "OCP IS2RE/IS2RS LMDB"),
        "trajectory_lmdb": Entry(_LMDB, "OCP S2EF LMDB"),
        "oc22_lmdb": Entry(_LMDB, "OC22 LMDB (total energies, used as stored)"),
    },
)
"""Dataset readers by ``task.dataset``. ``oc22_lmdb`` is the same reader: what OCP's
``OC22LmdbDataset`` does differently is either the data itself (OC22 entries hold total
energies, used as stored) or a flag catforge names elsewhere (``lin_ref`` is
``task.element_references: FILE``) or refuses by name (``train_on_oc20_total_energies``,
``data2train``, ``subsample``: :func:`catforge.config.ocp.dataset_splits`)."""

_LOSSES = "catforge.training.losses"
LOSSES = Table(
    "loss (optim.loss_energy / optim.loss_force)",
    {
        "mae": Entry(f"{_LOSSES}:abs_error", "mean absolute error"),
        "l1": Entry(f"{_LOSSES}:abs_error", "mean absolute error"),
        "mse": Entry(f"{_LOSSES}:squared_error", "mean squared error"),
        "l2mae": Entry(f"{_LOSSES}:row_l2_error", "mean per-atom L2 norm of the error"),
        "atomwisel2": Entry(f"{_LOSSES}:atomwise_l2_term", "natoms-weighted per-atom L2 (forces)"),
    },
)
"""Loss functions by name; ``atomwisel2`` (OCP's ``AtomwiseL2Loss``) applies to forces only."""

FORCE_ONLY_LOSSES = ("atomwisel2",)

_ADAM = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable")
_GENERIC = ("foreach", "maximize", "capturable", "differentiable")


def _optimizer(name: str, *parameters: str) -> Entry:
    return Entry(f"torch.optim:{name}", f"torch.optim.{name}", parameters)


OPTIMIZERS = Table(
    "optimizer (optim.optimizer)",
    {
        "Adam": _optimizer("Adam", *_ADAM, "differentiable", "fused", "decoupled_weight_decay"),
        "AdamW": _optimizer("AdamW", *_ADAM, "differentiable", "fused"),
        "Adamax": _optimizer("Adamax", "betas", "eps", "weight_decay", *_GENERIC),
        "NAdam": _optimizer(
            "NAdam",
            "betas",
            "eps",
            "weight_decay",
            "momentum_decay",
            "decoupled_weight_decay",
            *_GENERIC,
        ),
        "RAdam": _optimizer(
            "RAdam", "betas", "eps", "weight_decay", "decoupled_weight_decay", *_GENERIC
        ),
        "SGD": _optimizer(
            "SGD",
            "momentum",
            "dampening",
            "weight_decay",
            "nesterov",
            "maximize",
            "foreach",
            "differentiable",
            "fused",
        ),
        "RMSprop": _optimizer(
            "RMSprop", "alpha", "eps", "weight_decay", "momentum", "centered", *_GENERIC
        ),
        "Adagrad": _optimizer(
            "Adagrad",
            "lr_decay",
            "weight_decay",
            "initial_accumulator_value",
            "eps",
            "foreach",
            "maximize",
            "differentiable",
            "fused",
        ),
        "Adadelta": _optimizer("Adadelta", "rho", "eps", "weight_decay", *_GENERIC),
        "ASGD": _optimizer("ASGD", "lambd", "alpha", "t0", "weight_decay", *_GENERIC),
        "Rprop": _optimizer("Rprop", "etas", "step_sizes", *_GENERIC),
    },
)
"""``torch.optim`` optimizers a config can name (those without closures or sparse gradients),
with the keyword arguments ``optim.optimizer_params`` may set (``lr`` is ``optim.lr_initial``)."""


def _scheduler(name: str, *parameters: str) -> Entry:
    return Entry(f"torch.optim.lr_scheduler:{name}", f"torch.optim.lr_scheduler.{name}", parameters)


_CYCLE = ("cycle_momentum", "base_momentum", "max_momentum")
SCHEDULERS = Table(
    "LR scheduler (optim.scheduler)",
    {
        "LambdaLR": Entry("", "OCP's warmup + milestones schedule", ()),
        "Null": Entry("", "constant learning rate", ()),
        "StepLR": _scheduler("StepLR", "gamma", "step_size"),
        "MultiStepLR": _scheduler("MultiStepLR", "gamma", "milestones"),
        "ExponentialLR": _scheduler("ExponentialLR", "gamma"),
        "ConstantLR": _scheduler("ConstantLR", "factor", "total_iters"),
        "LinearLR": _scheduler("LinearLR", "start_factor", "end_factor", "total_iters"),
        "PolynomialLR": _scheduler("PolynomialLR", "total_iters", "power"),
        "CosineAnnealingLR": _scheduler("CosineAnnealingLR", "eta_min", "T_max"),
        "CosineAnnealingWarmRestarts": _scheduler(
            "CosineAnnealingWarmRestarts", "T_mult", "eta_min", "T_0"
        ),
        "CyclicLR": _scheduler(
            "CyclicLR",
            "step_size_up",
            "step_size_down",
            "mode",
            "gamma",
            "scale_mode",
            *_CYCLE,
            "base_lr",
            "max_lr",
        ),
        "OneCycleLR": _scheduler(
            "OneCycleLR",
            "total_steps",
            "epochs",
            "steps_per_epoch",
            "pct_start",
            "anneal_strategy",
            *_CYCLE,
            "div_factor",
            "final_div_factor",
            "three_phase",
            "max_lr",
        ),
        "ReduceLROnPlateau": _scheduler(
            "ReduceLROnPlateau",
            "mode",
            "factor",
            "patience",
            "threshold",
            "threshold_mode",
            "cooldown",
            "min_lr",
            "eps",
        ),
    },
)
"""``optim.scheduler`` names: OCP's ``LambdaLR`` (warmup + milestones, the default) and
``Null``, and torch schedulers whose arguments a config can hold (not ``LambdaLR``'s function
or ``SequentialLR``'s schedulers), with the keyword arguments ``optim.scheduler_params`` may set."""

UNSUPPORTED_SCHEDULERS = ("MultiplicativeLR", "ChainedScheduler", "SequentialLR")
"""torch schedulers that need Python objects (functions, other schedulers) as arguments."""

LOGGERS = Table(
    "logger (logger)",
    {
        "tensorboard": Entry("catforge.runtime.loggers:TensorBoardBackend", "TensorBoard"),
        "wandb": Entry(
            "catforge.runtime.wandb_logger:WandbBackend",
            "logger: wandb",
            package="wandb",
            extra="wandb",
        ),
    },
)
"""Where training scalars go besides ``metrics.jsonl``."""

MODES = Table(
    "mode (--mode)",
    {
        "train": Entry("catforge.cli.modes:train", "train a model"),
        "validate": Entry("catforge.cli.modes:validate", "metrics of a checkpoint on dataset.val"),
        "predict": Entry("catforge.cli.modes:predict", "predictions for dataset.test"),
        "run-relaxations": Entry("catforge.cli.modes:relax", "batched ML relaxations (IS2RS)"),
    },
)
"""The run modes of ``main.py --mode`` (``run_relaxations`` is accepted as the tutorial's
spelling)."""

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "s2ef": (
        "forcesx_mae",
        "forcesy_mae",
        "forcesz_mae",
        "forces_mae",
        "forces_cos",
        "forces_magnitude",
        "energy_mae",
        "energy_force_within_threshold",
    ),
    "is2re": ("energy_mae", "energy_mse", "energy_within_threshold"),
    "is2rs": ("average_distance_within_threshold", "positions_mae", "positions_mse"),
}
"""Metric names reported per OCP task (V3 lists; training adds ``loss``)."""

PRIMARY_METRICS: dict[str, str] = {
    "s2ef": "energy_force_within_threshold",
    "is2re": "energy_mae",
    "is2rs": "average_distance_within_threshold",
}
"""Default ``task.primary_metric`` per task (selects ``best_checkpoint.pt``)."""

METRIC_DIRECTIONS: dict[str, str] = {
    **{name: "min" for name in ("energy_mae", "energy_mse", "positions_mae", "positions_mse")},
    **{f"forces{axis}_mae": "min" for axis in ("", "x", "y", "z")},
    **{f"forces{axis}_mse": "min" for axis in ("", "x", "y", "z")},
    "forces_magnitude": "min",
    "loss": "min",
    "forces_cos": "max",
    "energy_within_threshold": "max",
    "energy_force_within_threshold": "max",
    "average_distance_within_threshold": "max",
}
"""``"min"`` where lower is better, ``"max"`` where higher is better."""


def lookup_name(table: Mapping[str, Any], name: str, what: str) -> Any:
    """``table[name]`` of a plain name table, or the same error as :meth:`Table.lookup`."""
    if name in table:
        return table[name]
    raise unknown_name(name, table, what)
