"""What the config checks against the things it names: model factories, torch optimizers and LR
schedulers (their names and keyword arguments), and element-reference files.

Everything here imports torch or the models lazily, inside the functions.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import yaml

from catforge.errors import ConfigError
from catforge.registry import lookup, model_factories

from .fields import coerce, freeze, suggest, unknown_key_error

UNSUPPORTED_SCHEDULERS = ("LambdaLR", "MultiplicativeLR", "ChainedScheduler", "SequentialLR")
"""torch schedulers that need Python objects (functions, other schedulers) as arguments."""
_TRAINER_OWNED = frozenset({"self", "params", "lr", "optimizer", "last_epoch", "verbose"})
"""Constructor arguments the trainer passes itself; not settable from a config."""


class Parameter(NamedTuple):
    """One keyword parameter of a model factory: its annotation and default (or ``empty``)."""

    annotation: Any
    default: Any


def model_factory(name: str) -> Callable[..., object]:
    """The factory registered for ``model.name``; unknown names suggest the closest one."""
    return lookup(model_factories(), name, "model (model.name)")


def _forwarded_class(name: str) -> type | None:
    """The class whose constructor receives a factory's ``**kwargs`` (SchNet for ``schnet``)."""
    if name == "schnet":
        from catforge.models.schnet import SchNet

        return SchNet
    return None


def _value_check(name: str) -> Callable[[Mapping[str, Any]], None] | None:
    """The check of model ``name``'s values (a ConfigError naming ``model.<key>``), if any."""
    if name == "schnet":
        from catforge.models.schnet import check_schnet_block

        return check_schnet_block
    return None


def _parameters(function: Callable[..., object]) -> tuple[dict[str, Parameter], bool]:
    """Named parameters of ``function`` (annotation, default), and whether it takes ``**kwargs``."""
    signature = inspect.signature(function)
    try:
        hints = typing.get_type_hints(function)
    except (NameError, TypeError):  # unresolvable annotations: accept any value
        hints = {}
    named: dict[str, Parameter] = {}
    var_keyword = False
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL and parameter.name != "self":
            named[parameter.name] = Parameter(hints.get(parameter.name, Any), parameter.default)
    return named, var_keyword


def model_parameters(name: str) -> dict[str, Parameter] | None:
    """Keyword parameters a ``model:`` block of model ``name`` may set.

    None when the factory takes ``**kwargs`` that cannot be traced to a class (anything goes).
    """
    named, var_keyword = _parameters(model_factory(name))
    if var_keyword:
        target = _forwarded_class(name)
        if target is None:
            return None
        forwarded, _ = _parameters(target.__init__)  # type: ignore[misc]
        named = forwarded | named
    return named


def parse_model_attributes(
    name: str, raw: Mapping[str, Any], regress_forces: bool, source: str = ""
) -> Mapping[str, Any]:
    """The ``model:`` block (without ``name``) checked, coerced and completed with defaults.

    Every parameter with a default is filled in, so the stored config pins the architecture;
    ``regress_forces`` (when the model has it and the block does not set it) becomes the given
    value (the trainer's: True for ``forces``, False for ``energy``).
    """
    accepted = model_parameters(name)
    if accepted is None:
        return freeze(dict(raw))
    attributes = {}
    for key, value in raw.items():
        if key not in accepted:
            raise unknown_key_error(str(key), "model", [*accepted, "name"], source)
        attributes[key] = coerce(value, accepted[key].annotation, f"model.{key}", source)
    if "regress_forces" in accepted:
        attributes.setdefault("regress_forces", regress_forces)
    for key, parameter in accepted.items():
        if key not in attributes and parameter.default is inspect.Parameter.empty:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}missing required key 'model.{key}'")
    check = _value_check(name)
    if check is not None:
        check(attributes)
    return MappingProxyType(
        {key: attributes.get(key, freeze(p.default)) for key, p in accepted.items()}
    )


def optimizer_names() -> dict[str, type]:
    """``torch.optim`` optimizer classes by name."""
    import torch

    return {
        name: value
        for name, value in vars(torch.optim).items()
        if isinstance(value, type)
        and issubclass(value, torch.optim.Optimizer)
        and value is not torch.optim.Optimizer
    }


def scheduler_names() -> dict[str, type]:
    """``torch.optim.lr_scheduler`` classes a config can name (no function arguments)."""
    from torch.optim import lr_scheduler

    bases = tuple(
        getattr(lr_scheduler, base)
        for base in ("LRScheduler", "_LRScheduler", "ReduceLROnPlateau")
        if hasattr(lr_scheduler, base)
    )
    return {
        name: value
        for name, value in vars(lr_scheduler).items()
        if isinstance(value, type)
        and issubclass(value, bases)
        and not name.startswith("_")
        and name not in ("LRScheduler", *UNSUPPORTED_SCHEDULERS)
    }


def _named(table: Mapping[str, type], name: str, what: str) -> type:
    """``table[name]``, or a ConfigError with the closest name (case-insensitive first)."""
    if name in table:
        return table[name]
    close = suggest(name, table)
    hint = f" Did you mean '{close}'?" if close else ""
    raise ConfigError(f"unknown {what} '{name}'.{hint} Valid names: {', '.join(sorted(table))}")


def optimizer_parameters(name: str) -> frozenset[str]:
    """Keyword arguments of torch optimizer ``name`` that ``optim.optimizer_params`` may set."""
    cls = _named(optimizer_names(), name, "optimizer (optim.optimizer)")
    return frozenset(inspect.signature(cls).parameters) - _TRAINER_OWNED


def scheduler_parameters(name: str) -> frozenset[str]:
    """Keyword arguments of torch LR scheduler ``name`` that ``optim.scheduler_params`` may set."""
    if name in UNSUPPORTED_SCHEDULERS:
        raise ConfigError(
            f"optim.scheduler '{name}' needs Python objects as arguments and cannot be set from "
            "a config; leave optim.scheduler out for OCP's warmup + milestones LambdaLR"
        )
    cls = _named(scheduler_names(), name, "LR scheduler (optim.scheduler)")
    return frozenset(inspect.signature(cls).parameters) - _TRAINER_OWNED


def load_element_references(path: Path) -> dict[int, float]:
    """Per-element reference energies (eV) from a YAML/JSON file: ``{Z or symbol: eV}``.

    A list is read as indexed by atomic number (fairchem's linear-reference layout).
    """
    from ase.data import atomic_numbers

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read task.element_references file {path}: {error}") from error
    if isinstance(data, list):
        data = dict(enumerate(data))
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"task.element_references file {path} must map atomic numbers or symbols to eV"
        )
    references = {}
    for key, value in data.items():
        z = atomic_numbers.get(key) if isinstance(key, str) else key
        if not isinstance(z, int) or isinstance(z, bool) or not 0 <= z < 119:
            raise ConfigError(f"{path}: {key!r} is not an atomic number or element symbol")
        references[z] = float(coerce(value, float, f"element {key}", str(path)))
    return references
