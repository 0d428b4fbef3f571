"""OCP-format YAML configs parsed once into frozen dataclasses.

``load_config(path, overrides, options)`` reads the file and its ``includes:``
(:mod:`~catforge.config.load`), applies the dotted command-line overrides last, and parses the
result into a :class:`~catforge.config.schema.Config`. Nothing outside this package reads a raw
config dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from catforge.errors import ConfigError

from .checks import check_mode_requirements
from .load import load_yaml_config, merge_overrides, parse_overrides
from .ocp import RELAX_KEYS, dataset_splits
from .schema import (
    Config,
    DatasetConfig,
    DatasetSplits,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    RelaxOptConfig,
    RunOptions,
    SlurmConfig,
    TaskConfig,
    parse_config,
)

__all__ = [
    "Config",
    "DatasetConfig",
    "DatasetSplits",
    "LoggerConfig",
    "ModelConfig",
    "OptimConfig",
    "RelaxOptConfig",
    "RunOptions",
    "SlurmConfig",
    "TaskConfig",
    "check_mode_requirements",
    "load_config",
    "load_yaml_config",
    "parse_config",
    "parse_overrides",
]


def load_config(
    path: Path, overrides: Sequence[str] = (), options: RunOptions | None = None
) -> Config:
    """The typed config of YAML file ``path`` with dotted ``overrides`` applied last.

    ``overrides`` are OCP's ``--optim.lr_initial=0.001`` arguments; ``dataset`` entries are
    overridden by name (``--dataset.val.src=...``) whether the file lists them or not.
    ``options`` are the CLI's values; given, they also check what the mode needs.
    """
    raw = load_yaml_config(Path(path))
    if not overrides:
        return parse_config(raw, Path(path), options)
    extra = parse_overrides(list(overrides))
    if "dataset" in extra and isinstance(extra["dataset"], Mapping) and "dataset" in raw:
        raw = _dataset_as_dict(raw, str(path))
    try:
        return parse_config(merge_overrides(raw, extra), Path(path), options)
    except ConfigError as error:
        raise _blame_override(error, str(path), override_keys(overrides)) from error


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys of ``--a.b=VALUE`` / ``--a.b VALUE`` arguments, as typed."""
    return [arg[2:].split("=", 1)[0] for arg in overrides if arg.startswith("--")]


_SUBJECT = re.compile(r"'([^']+)'|([A-Za-z_]\w*(?:\.\w+)+)")
"""The first quoted name or dotted key in an error message: the key the error is about."""


def _blame_override(error: ConfigError, source: str, keys: Sequence[str]) -> ConfigError:
    """``error`` said to come from the command line when the key it is about was overridden
    there (the overrides are merged into the file's config, so the parser names the file)."""
    detail = str(error).removeprefix(f"{source}: ")
    match = _SUBJECT.search(detail)
    if match is None:
        return error
    subject = match.group(1) or match.group(2)
    for key in keys:
        names = [key, *([f"task.{key}"] if key.split(".")[0] in RELAX_KEYS else [])]
        if any(subject == name or subject.startswith(f"{name}.") for name in names):
            return ConfigError(f"command-line override --{key}: {detail}")
    return error


def _dataset_as_dict(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``raw`` with ``dataset`` (list, dict or separate val/test keys) as ``{train, val, test}``."""
    splits = dataset_splits(raw, source)
    out = {key: value for key, value in raw.items() if key not in ("val_dataset", "test_dataset")}
    out["dataset"] = splits
    return out
