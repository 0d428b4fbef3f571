"""OCP's config spellings mapped onto catforge's schema (raw dict -> raw dict, before typing).

Each function takes one raw section and returns a new dict in the canonical form the dataclasses
of :mod:`catforge.config.schema` read; the input is never modified. The rules:

* ``relax_dataset``, ``write_pos``, ``relaxation_steps``, ``relaxation_fmax`` and ``relax_opt``
  at the top level (as OCP's tutorial shows them) move under ``task:`` with a warning.
* ``dataset:`` is a list ``[train, val, test]`` (1-3 entries), a dict ``{train, val, test}``, or
  one entry with ``src`` (train only); OCP's separate ``val_dataset``/``test_dataset`` also work.
  The flags of OCP's OC22 dataset (``lin_ref``, ``oc20_ref``, ...) are dropped when off and
  refused, with what to do instead, when on (see :data:`OC22_FLAGS`).
* ``optim.eval_every``: T0's ``-1`` means once per epoch (None); other negative values (T0's
  ``-10000``) mean every ``|n|`` steps, as Python's ``iters % -10000 == 0`` did.
* ``optim.warmup_epochs`` (T0) implies ``schedule_unit: epochs``; a negative ``warmup_steps``
  (OC22 configs' ``-1``) means no warmup, as OCP's ``warmup_lr_lambda`` reads it.
* ``optim.loss_force: atomwisel2`` without ``force_coefficient`` gets OCP V10's 1 for it.
* ``optim.scheduler: "Null"`` (OCP: no scheduler) is kept as ``"Null"``: a constant LR;
  ``"LambdaLR"`` (OCP's default, spelled out) becomes None: warmup + milestones. The
  kwargs of a named torch scheduler may sit in ``scheduler_params:`` or, as OCP wrote them, at the
  ``optim`` level; they are moved into ``scheduler_params``.
* ``optim.optimizer_params.weight_decay`` stays there: as in OCP it applies to all parameters
  (``optim.weight_decay`` > 0 exempts biases and embeddings); giving both is an error. T0's
  ``optim.num_gpus`` (in-process DataParallel) is dropped with a warning (use ``--num-gpus``).
* ``logger:`` is a name or ``{name, project}``; OCP's top-level ``logger_project`` is the project.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from catforge.errors import ConfigError

from .fields import type_error, unknown_key_error

log = logging.getLogger(__name__)

RELAX_KEYS = ("relax_dataset", "write_pos", "relaxation_steps", "relaxation_fmax", "relax_opt")
"""IS2RS keys OCP reads from ``task:`` but its tutorial shows at the top level."""
SPLITS = ("train", "val", "test")


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def _section(
    value: object, path: str, source: str, expected: str = "a mapping (a section of keys)"
) -> dict[str, Any]:
    """A config section as a new dict (None is empty); anything but a mapping is an error."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise type_error(path, expected, value, source)
    return dict(value)


def move_relax_keys(raw: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """Top-level IS2RS keys moved under ``task:`` (with a warning); a key in both is an error."""
    moved = [key for key in RELAX_KEYS if key in raw]
    out = dict(raw)
    if not moved:
        return out
    task = _section(out.get("task"), "task", source)
    for key in moved:
        if key in task:
            raise ConfigError(
                f"{_where(source)}'{key}' is given both at the top level and under task:; "
                f"keep only task.{key}"
            )
        task[key] = out.pop(key)
    log.warning(
        "%smoved top-level %s under task: (OCP reads IS2RS keys there); indent them under "
        "task: to silence this warning",
        _where(source),
        ", ".join(moved),
    )
    out["task"] = task
    return out


def dataset_splits(raw: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """``{train, val, test}`` from ``dataset`` (and OCP's ``val_dataset``/``test_dataset``)."""
    dataset = raw.get("dataset")
    if dataset is None:
        splits: dict[str, Any] = {}
    elif isinstance(dataset, list | tuple):
        if not 1 <= len(dataset) <= 3:
            raise ConfigError(
                f"{_where(source)}'dataset' as a list must have 1 to 3 entries [train, val, test], "
                f"got {len(dataset)}"
            )
        splits = dict(zip(SPLITS, dataset, strict=False))
    elif isinstance(dataset, Mapping):
        if "src" in dataset:  # one entry: the training set, as in OCP
            splits = {"train": dataset}
        else:
            for key in dataset:
                if key not in SPLITS:
                    raise unknown_key_error(str(key), "dataset", SPLITS, source)
            splits = dict(dataset)
    else:
        raise type_error("dataset", "a list [train, val, test] or a mapping", dataset, source)
    for split in ("val", "test"):
        separate = raw.get(f"{split}_dataset")
        if separate is not None:
            if splits.get(split) is not None:
                raise ConfigError(
                    f"{_where(source)}both dataset.{split} and {split}_dataset are given; keep one"
                )
            splits[split] = separate
    return {
        split: _without_oc22_flags(entry, f"dataset.{split}", source)
        for split, entry in splits.items()
    }


OC22_FLAGS = {
    "lin_ref": "give the references as task.element_references: FILE (a list indexed by atomic "
    "number, or {Z or symbol: eV})",
    "train_on_oc20_total_energies": "joint OC20+OC22 training on total energies is not "
    "supported; train on one dataset",
    "oc20_ref": "joint OC20+OC22 training on total energies is not supported; train on one dataset",
    "data2train": "write the subset (adslabs or slabs) to its own LMDB",
    "subsample": "write the subset to its own LMDB",
}
"""Dataset keys of OCP's OC22LmdbDataset that catforge's reader has not, with what to do."""


def _without_oc22_flags(entry: object, path: str, source: str) -> object:
    """``entry`` without OC22 dataset flags that are off (``False``, ``data2train: all``); a flag
    that is on is a ConfigError saying what to do instead."""
    if not isinstance(entry, Mapping):
        return entry
    out = dict(entry)
    for key, fix in OC22_FLAGS.items():
        if key not in out:
            continue
        value = out.pop(key)
        if value and not (key == "data2train" and value == "all"):
            raise ConfigError(
                f"{_where(source)}{path}.{key} (a flag of OCP's OC22 dataset) is not supported: "
                f"{fix}"
            )
    return out


def normalize_eval_every(value: object, source: str = "") -> object:
    """OCP T0's negative ``eval_every``: -1 -> None (each epoch), -n -> n (every n steps)."""
    if isinstance(value, bool) or not isinstance(value, int) or value >= 0:
        return value
    if value == -1:
        return None
    log.info(
        "%soptim.eval_every %d read as every %d steps (OCP T0's negative spelling)",
        _where(source),
        value,
        -value,
    )
    return -value


def normalize_optim(
    raw: object,
    fields: Iterable[str],
    scheduler_parameters: Callable[[str], frozenset[str]],
    source: str = "",
) -> dict[str, Any]:
    """The ``optim`` section in canonical form; ``fields`` are OptimConfig's field names."""
    optim = _section(raw, "optim", source)
    if "num_gpus" in optim:
        log.warning(
            "%soptim.num_gpus (OCP T0's in-process DataParallel) is ignored; use --num-gpus",
            _where(source),
        )
        del optim["num_gpus"]
    if "eval_every" in optim:
        optim["eval_every"] = normalize_eval_every(optim["eval_every"], source)
    if optim.get("warmup_epochs") is not None and "schedule_unit" not in optim:
        optim["schedule_unit"] = "epochs"
    warmup = optim.get("warmup_steps")
    if isinstance(warmup, int | float) and not isinstance(warmup, bool) and warmup < 0:
        log.info("%soptim.warmup_steps %s read as no warmup (as OCP)", _where(source), warmup)
        optim["warmup_steps"] = 0
    if optim.get("loss_force") == "atomwisel2" and "force_coefficient" not in optim:
        log.info("%soptim.force_coefficient not set: using 1, OCP's for atomwisel2", _where(source))
        optim["force_coefficient"] = 1.0
    _check_weight_decay(optim, source)
    _move_scheduler_kwargs(optim, set(fields), scheduler_parameters, source)
    return optim


def _check_weight_decay(optim: dict[str, Any], source: str) -> None:
    params = optim.get("optimizer_params")
    if not isinstance(params, Mapping) or "weight_decay" not in params:
        return
    if optim.get("weight_decay") is not None:
        raise ConfigError(
            f"{_where(source)}weight_decay is given both in optim and optim.optimizer_params; "
            "keep optim.weight_decay (biases and embeddings get none) or "
            "optim.optimizer_params.weight_decay (all parameters, as OCP)"
        )


def _move_scheduler_kwargs(
    optim: dict[str, Any],
    fields: set[str],
    scheduler_parameters: Callable[[str], frozenset[str]],
    source: str,
) -> None:
    """Move OCP-style scheduler kwargs (at the optim level) into ``scheduler_params``."""
    name = optim.get("scheduler")
    if isinstance(name, str) and name.lower() == "null":
        optim["scheduler"] = name = "Null"
    if name == "LambdaLR":  # OCP's default schedule spelled out: warmup + milestones
        optim["scheduler"] = name = None
    params = _section(optim.get("scheduler_params"), "optim.scheduler_params", source, "a mapping")
    if not isinstance(name, str) or name == "Null":
        if params:
            raise ConfigError(
                f"{_where(source)}optim.scheduler_params needs optim.scheduler to name a torch "
                "LR scheduler (such as StepLR or ReduceLROnPlateau)"
            )
        return
    accepted = scheduler_parameters(name)
    for key in list(optim):
        if key not in fields and key in accepted:
            if key in params:
                raise ConfigError(
                    f"{_where(source)}'{key}' is given both in optim and optim.scheduler_params"
                )
            params[key] = optim.pop(key)
    for key in params:
        if key not in accepted:
            raise unknown_key_error(str(key), "optim.scheduler_params", accepted, source)
    optim["scheduler_params"] = params


def normalize_logger(raw: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """``{name, project}`` from ``logger`` (a name or a mapping) and ``logger_project``."""
    logger = raw.get("logger")
    if logger is None:
        out: dict[str, Any] = {}
    elif isinstance(logger, str):
        out = {"name": logger}
    elif isinstance(logger, Mapping):
        out = dict(logger)
    else:
        raise type_error("logger", "a logger name or a mapping {name, project}", logger, source)
    if raw.get("logger_project") is not None:
        if out.get("project") is not None:
            raise ConfigError(
                f"{_where(source)}both logger.project and logger_project are given; keep one"
            )
        out["project"] = raw["logger_project"]
    return out


def normalize_mode(value: object) -> object:
    """``run_relaxations`` (the tutorial's spelling) -> ``run-relaxations``."""
    return "run-relaxations" if value == "run_relaxations" else value
