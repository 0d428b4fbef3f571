"""The whole run configuration as frozen dataclasses, with OCP's defaults, and its parser.

:func:`parse_config` turns a merged raw config (see :mod:`catforge.config.load`) into a
:class:`Config`; :meth:`Config.to_dict` turns it back into plain YAML-able data, and
``parse_config(config.to_dict())`` gives an equal Config. OCP spellings are mapped first by
:mod:`catforge.config.ocp`.

Paths: every path value (``dataset.*.src``, ``task.element_references``, ``task.relax_dataset``,
``task.relax_opt.traj_dir``, ``optim.init_from``) is kept as written; relative ones are relative
to the current working directory at run time, as in OCP. Only ``includes:`` are resolved against
the including file.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from catforge.errors import ConfigError
from catforge.registry import (
    DATASETS,
    FORCE_ONLY_LOSSES,
    LOGGERS,
    LOSSES,
    TASK_METRICS,
    unknown_name,
)

from . import ocp, parameters
from .checks import check_mode_requirements, check_optim, check_tag_weights, check_task
from .fields import coerce, field_paths, parse_section, to_plain, unknown_key_error

Mode = Literal["train", "predict", "validate", "run-relaxations"]


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset entry: an LMDB file or a folder of ``*.lmdb`` shards, and its label stats.

    The stats are in eV (energy) and eV/A (forces); None means "compute from the training set".
    ``skip_bad_entries`` reads every entry once at the start and leaves out (with a warning and
    a count) those that fail validation, instead of stopping at the first one.
    """

    src: Path
    normalize_labels: bool = False
    target_mean: float | None = None
    target_std: float | None = None
    grad_target_mean: float | None = None
    grad_target_std: float | None = None
    skip_bad_entries: bool = False


@dataclass(frozen=True)
class DatasetSplits:
    """The ``dataset:`` block: a list ``[train, val, test]`` or a dict; absent splits are None."""

    train: DatasetConfig | None = None
    val: DatasetConfig | None = None
    test: DatasetConfig | None = None

    def split(self, name: str) -> DatasetConfig:
        """Split ``name`` (train, val or test), or a ConfigError saying how to add it."""
        entry = getattr(self, name, None) if name in ocp.SPLITS else None
        if entry is None:
            position = {"train": "1st", "val": "2nd", "test": "3rd"}.get(name, "?")
            raise ConfigError(
                f"the config has no dataset.{name}; add it under dataset: {{{name}: {{src: ...}}}} "
                f"or as the {position} entry of the dataset list"
            )
        return entry


@dataclass(frozen=True)
class RelaxOptConfig:
    """``task.relax_opt``: batched LBFGS settings (OCP tutorial values; maxstep in A).

    ``optimizer`` names the relaxation optimizer as OCP (fairchem) configs do; LBFGS is the only
    one (as in fairchem's ``ml_relax``).
    """

    maxstep: float = 0.04
    memory: int = 50
    damping: float = 1.0
    alpha: float = 70.0
    traj_dir: Path | None = None
    optimizer: str = "LBFGS"


@dataclass(frozen=True)
class TaskConfig:
    """``task:``. ``description``/``type``/``metric``/``labels``/``grad_input`` are informational.

    ``element_references``: None, ``"fit"`` (least squares on the training set) or a YAML/JSON
    file of ``{Z or symbol: eV}``. ``relaxation_steps`` and ``relaxation_fmax`` (eV/A) default to
    OCP's 200 and 0.0 (0.0 never converges: every structure takes all the steps; ASE's usual
    threshold is 0.05). ``strict_load: False`` loads checkpoints whose keys do not all match (OCP's
    flag). ``tag_specific_weights`` ``[w0, w1, w2]`` weigh the force loss per atom tag (OCP's
    ForceNet setting, see :mod:`catforge.training.losses`).
    """

    dataset: str = "lmdb"
    description: str | None = None
    type: str | None = None
    metric: str | None = None
    labels: tuple[str, ...] = ()
    grad_input: str | None = None
    train_on_free_atoms: bool = False
    eval_on_free_atoms: bool = True
    primary_metric: str | None = None
    element_references: Literal["fit"] | Path | None = None
    prediction_dtype: Literal["float32", "float16"] = "float32"
    relax_dataset: DatasetConfig | None = None
    write_pos: bool = False
    relaxation_steps: int = 200
    relaxation_fmax: float = 0.0
    save_full_traj: bool = True
    num_relaxation_batches: int | None = None
    relax_opt: RelaxOptConfig = field(default_factory=RelaxOptConfig)
    strict_load: bool = True
    tag_specific_weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """``model:``: the registry ``name`` and the other keys, checked against the factory."""

    name: str
    attributes: Mapping[str, Any] = field(default_factory=_empty)

    @property
    def regress_forces(self) -> bool:
        """Whether the model predicts forces (OCP's default: True)."""
        return bool(self.attributes.get("regress_forces", True))


@dataclass(frozen=True)
class OptimConfig:
    """``optim:``. See the module docs of :mod:`catforge.config.ocp` for OCP spellings.

    ``eval_batch_size`` 0 means ``batch_size`` (resolved on construction). ``weight_decay``
    None (not in the config) is OCP's: the optimizer's own default (AdamW's 0.01) on all
    parameters; see :func:`catforge.training.optim.build_optimizer`. ``scheduler``: None =
    OCP's warmup + milestones LambdaLR (``lr_gamma ** bisect(lr_milestones, x)`` after a linear
    warmup from ``warmup_factor``), ``"Null"`` = constant LR, else a torch ``lr_scheduler`` class
    name with kwargs in ``scheduler_params``. ``lr_milestones`` and the warmup length
    (``warmup_steps`` or T0's ``warmup_epochs``) are in ``schedule_unit`` units: steps, epochs or
    fractions of the total steps. ``eval_every``/``checkpoint_every`` in steps (None: once per
    epoch / at each eval).
    """

    batch_size: int = 32
    eval_batch_size: int = 0
    num_workers: int = 0
    lr_initial: float = 1e-3
    optimizer: str = "AdamW"
    optimizer_params: Mapping[str, Any] = field(default_factory=_empty)
    weight_decay: float | None = None
    scheduler: str | None = None
    scheduler_params: Mapping[str, Any] = field(default_factory=_empty)
    lr_gamma: float = 0.1
    lr_milestones: tuple[float, ...] = ()
    warmup_steps: float | None = None
    warmup_epochs: float | None = None
    warmup_factor: float = 0.2
    schedule_unit: Literal["steps", "epochs", "fraction"] = "steps"
    max_epochs: int | None = None
    max_steps: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    energy_coefficient: float = 1.0
    force_coefficient: float = 30.0
    loss_energy: str = "mae"
    loss_force: str = "mae"
    clip_grad_norm: float | None = None
    ema_decay: float | None = None
    load_balancing: Literal["atoms", "neighbors"] | None = None
    init_from: Path | None = None

    def __post_init__(self) -> None:
        if self.eval_batch_size == 0:
            object.__setattr__(self, "eval_batch_size", self.batch_size)

    @property
    def warmup(self) -> float:
        """Warmup length in ``schedule_unit`` units (0.0: none)."""
        value = self.warmup_epochs if self.warmup_epochs is not None else self.warmup_steps
        return 0.0 if value is None else value


@dataclass(frozen=True)
class LoggerConfig:
    """``logger:`` (a name, or ``{name, project}``); ``project`` is OCP's ``logger_project``."""

    name: str = "tensorboard"
    project: str | None = None


@dataclass(frozen=True)
class SlurmConfig:
    """``slurm:``: extra sbatch parameters passed to submitit as they are."""

    params: Mapping[str, Any] = field(default_factory=_empty)


@dataclass(frozen=True)
class RunOptions:
    """The command-line values (OCP's flags, defaults as OCP's ``flags.py``)."""

    mode: Mode = "train"
    identifier: str = ""
    seed: int = 0
    run_dir: Path = Path(".")
    print_every: int = 10
    amp: bool = False
    cpu: bool = False
    debug: bool = False
    timestamp_id: str | None = None
    checkpoint: Path | None = None
    logdir: Path = Path("logs")
    submit: bool = False
    num_nodes: int = 1
    num_gpus: int = 1
    distributed: bool = False
    distributed_port: int = 13356
    distributed_backend: str = "auto"
    local_rank: int | None = None
    slurm_partition: str = "ocp"
    slurm_mem: int = 80
    slurm_timeout: int = 72
    num_workers: int = 0
    sweep_yml: Path | None = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], prefix: str = "options") -> RunOptions:
        """Typed options from a mapping of field names (``run_relaxations`` is accepted)."""
        raw = dict(raw)
        if "mode" in raw:
            raw["mode"] = ocp.normalize_mode(raw["mode"])
        return parse_section(cls, raw, prefix)

    @classmethod
    def from_namespace(cls, namespace: object) -> RunOptions:
        """Options from an argparse namespace: its attributes named like fields (others ignored).

        A bad value is a ConfigError naming the flag (``'--mode' must be one of 'train', ...``).
        """
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in vars(namespace).items():
            if key in hints and value is not None:
                value = ocp.normalize_mode(value) if key == "mode" else value
                values[key] = coerce(value, hints[key], flag_name(key))
        return cls(**values)


def flag_name(field_name: str) -> str:
    """The command-line flag of a RunOptions field: ``run_dir`` -> ``--run-dir``."""
    return "--local_rank" if field_name == "local_rank" else "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class Config:
    """One fully resolved run configuration. ``trainer`` picks the targets: ``energy`` (IS2RE,
    ``y_relaxed``) or ``forces`` (S2EF, ``y`` and ``force``)."""

    trainer: Literal["energy", "forces"]
    model: ModelConfig
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dataset: DatasetSplits = field(default_factory=DatasetSplits)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    options: RunOptions = field(default_factory=RunOptions)

    @property
    def task_name(self) -> Literal["is2re", "s2ef"]:
        """The OC20 task whose metrics apply: ``is2re`` (energy trainer) or ``s2ef`` (forces)."""
        return "is2re" if self.trainer == "energy" else "s2ef"

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data; ``parse_config`` reads it back."""
        out = to_plain(self)
        out["model"] = {"name": self.model.name, **to_plain(self.model.attributes)}
        out["slurm"] = to_plain(self.slurm.params)
        return out


TOP_KEYS = (
    *(f.name for f in dataclasses.fields(Config)),
    "val_dataset",
    "test_dataset",
    "logger_project",
)


def parse_config(
    raw: Mapping[str, Any], source: Path | str = "", options: RunOptions | None = None
) -> Config:
    """Typed, validated Config from a merged raw config (``includes`` already resolved).

    ``source`` names the file in error messages. ``options`` (the CLI's) replace a stored
    ``options:`` section and enable the checks of what the mode needs (for example
    ``dataset.train`` and ``max_epochs``/``max_steps`` to train).
    """
    where = str(source) or "<config>"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: a config must be a mapping of keys, got {type(raw).__name__}")
    raw = ocp.move_relax_keys(raw, where)
    for key in raw:
        if key not in TOP_KEYS:
            elsewhere = field_paths(Config)
            raise unknown_key_error(str(key), "", TOP_KEYS, where, elsewhere)
    if raw.get("trainer") is None:
        raise ConfigError(
            f"{where}: missing required key 'trainer' (energy for IS2RE, forces for S2EF)"
        )
    config = parse_section(
        Config,
        {"trainer": raw["trainer"]},
        "",
        where,
        model=_parse_model(raw.get("model"), raw["trainer"] == "forces", where),
        task=_parse_task(raw.get("task"), raw["trainer"], where),
        optim=_parse_optim(raw.get("optim"), where),
        dataset=parse_section(DatasetSplits, ocp.dataset_splits(raw, where), "dataset", where),
        logger=_parse_logger(raw, where),
        slurm=SlurmConfig(params=_parse_slurm(raw.get("slurm"), where)),
        options=options or _parse_options(raw.get("options"), where),
    )
    check_tag_weights(config, where)
    if options is not None:
        check_mode_requirements(config, where)
    return config


@contextmanager
def _in_file(where: str) -> Iterator[None]:
    """Prefix ConfigErrors raised inside with the config file name (where they lack it)."""
    try:
        yield
    except ConfigError as error:
        if not where or str(error).startswith(f"{where}:"):
            raise
        raise ConfigError(f"{where}: {error}") from error


def _parse_model(raw: object, regress_forces: bool, where: str) -> ModelConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{where}: missing required section 'model' (with model.name, e.g. schnet)"
            if raw is None
            else f"{where}: 'model' must be a mapping with a 'name', got {type(raw).__name__}"
        )
    if not isinstance(raw.get("name"), str):
        raise ConfigError(f"{where}: missing required key 'model.name' (a string, e.g. schnet)")
    attributes = {key: value for key, value in raw.items() if key != "name"}
    name = raw["name"]
    with _in_file(where):
        parsed = parameters.parse_model_attributes(name, attributes, regress_forces, where)
    return ModelConfig(name, parsed)


def _parse_logger(raw: Mapping[str, Any], where: str) -> LoggerConfig:
    logger = parse_section(LoggerConfig, ocp.normalize_logger(raw, where), "logger", where)
    with _in_file(where):
        LOGGERS.lookup(logger.name).check_installed()
    return logger


def _parse_slurm(raw: object, where: str) -> Mapping[str, Any]:
    if raw is None:
        return _empty()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: 'slurm' must be a mapping of sbatch parameters")
    return parse_section(SlurmConfig, {"params": raw}, "slurm", where).params


def _parse_options(raw: object, where: str) -> RunOptions:
    if isinstance(raw, Mapping) and "mode" in raw:
        raw = {**raw, "mode": ocp.normalize_mode(raw["mode"])}
    return parse_section(RunOptions, raw, "options", where)


def _parse_task(raw: object, trainer: object, where: str) -> TaskConfig:
    if isinstance(raw, Mapping) and "num_relaxations" in raw:  # V3's name
        raw = {key: value for key, value in raw.items() if key != "num_relaxations"} | {
            "num_relaxation_batches": raw["num_relaxations"]
        }
    task = parse_section(TaskConfig, raw, "task", where)
    with _in_file(where):
        DATASETS.lookup(task.dataset)
        check_task(task, raw if isinstance(raw, Mapping) else {})
    if task.primary_metric is not None:
        tasks = ("is2re",) if trainer == "energy" else ("s2ef", "is2re", "is2rs")
        valid = {"loss", *(name for t in tasks for name in TASK_METRICS[t])}
        if task.primary_metric not in valid:
            raise ConfigError(
                f"{where}: {unknown_name(task.primary_metric, valid, 'task.primary_metric')}"
            )
    return task


def _parse_optim(raw: object, where: str) -> OptimConfig:
    names = [f.name for f in dataclasses.fields(OptimConfig)]
    with _in_file(where):
        optim_raw = ocp.normalize_optim(raw, names, parameters.scheduler_parameters, where)
    if optim_raw.get("eval_batch_size") is None:
        optim_raw.pop("eval_batch_size", None)
    optim = parse_section(OptimConfig, optim_raw, "optim", where)
    with _in_file(where):
        accepted = parameters.optimizer_parameters(optim.optimizer)
        if optim.loss_force not in LOSSES:
            raise unknown_name(optim.loss_force, LOSSES, "force loss (optim.loss_force)")
        if optim.loss_energy in FORCE_ONLY_LOSSES or optim.loss_energy not in LOSSES:
            energy_losses = {n: e for n, e in LOSSES.items() if n not in FORCE_ONLY_LOSSES}
            raise unknown_name(optim.loss_energy, energy_losses, "energy loss (optim.loss_energy)")
    for key in optim.optimizer_params:
        if key not in accepted:
            raise unknown_key_error(key, "optim.optimizer_params", accepted, where)
    check_optim(optim, where)
    return optim
