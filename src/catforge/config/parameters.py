"""The keyword parameters a config may pass to what it names, found without importing it.

A model's parameters are the keyword arguments of its class's ``__init__``, read from the
module's source with :mod:`ast` (annotations are evaluated over builtin types, ``Literal`` and
``Any``; defaults must be literals). Optimizers and schedulers declare theirs in the registry.
Nothing here imports torch or a model, so parsing a config stays fast; the values a model cannot
use (a negative cutoff) are refused when the model is built, before any data is read.
"""

from __future__ import annotations

import ast
import functools
import inspect
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from catforge.errors import ConfigError
from catforge.registry import MODELS, OPTIMIZERS, SCHEDULERS, UNSUPPORTED_SCHEDULERS, Entry

from .fields import coerce, freeze, unknown_key_error

COMMON_MODEL_KEYS = ("regress_forces",)
"""Keys every ``model:`` block may set: ``regress_forces`` (forces by autograd; OCP's default
True) belongs to the force wrapper, not to the energy model."""

_ANNOTATION_NAMES: dict[str, Any] = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "None": None,
    "tuple": tuple,
    "list": list,
    "dict": dict,
    "Literal": Literal,
    "Any": Any,
}


class Parameter(NamedTuple):
    """One keyword parameter: its annotation (a type, ``Any`` when not plain) and its default
    (``inspect.Parameter.empty`` when required)."""

    annotation: Any
    default: Any


def model_parameters(name: str) -> dict[str, Parameter]:
    """Keyword parameters a ``model:`` block of model ``name`` may set (besides the common)."""
    return dict(_class_parameters(MODELS.lookup(name)))


@functools.cache
def _class_parameters(entry: Entry) -> MappingProxyType[str, Parameter]:
    module, _, attribute = entry.target.partition(":")
    path = _source_path(module)
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError) as error:
        raise ConfigError(f"cannot read the source of {entry.target}: {error}") from error
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == attribute:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    return MappingProxyType(_signature(item.args))
            return MappingProxyType({})
    raise ConfigError(f"{entry.target}: no class {attribute} in {path}")


def _source_path(module: str) -> Path:
    """The file of catforge module ``module`` (found without importing its package)."""
    root = Path(__file__).resolve().parents[1]
    parts = module.split(".")
    if parts[0] != "catforge":
        raise ConfigError(f"model module {module} is not part of catforge")
    return root.joinpath(*parts[1:]).with_suffix(".py")


def _signature(args: ast.arguments) -> dict[str, Parameter]:
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += list(args.defaults)
    keyword = zip(args.kwonlyargs, args.kw_defaults, strict=True)
    pairs = [*zip(positional, defaults, strict=True), *keyword]
    return {
        arg.arg: Parameter(_annotation(arg.annotation), _default(default))
        for arg, default in pairs
        if arg.arg != "self"
    }


def _annotation(node: ast.expr | None) -> Any:
    if node is None:
        return Any
    text = ast.unparse(node)
    try:
        return eval(text, {"__builtins__": {}}, _ANNOTATION_NAMES)  # names above only
    except Exception:  # an annotation that is not a plain type: any value is passed on
        return Any


def _default(node: ast.expr | None) -> Any:
    if node is None:
        return inspect.Parameter.empty
    return ast.literal_eval(node)


def parse_model_attributes(
    name: str, raw: Mapping[str, Any], regress_forces: bool, source: str = ""
) -> Mapping[str, Any]:
    """The ``model:`` block (without ``name``) checked, coerced and completed with defaults.

    Every parameter with a default is filled in, so the stored config pins the architecture;
    ``regress_forces`` defaults to the trainer's need (True for ``forces``, False for ``energy``).
    """
    accepted = model_parameters(name) | {"regress_forces": Parameter(bool, regress_forces)}
    attributes = {}
    for key, value in raw.items():
        if key not in accepted:
            raise unknown_key_error(str(key), "model", [*accepted, "name"], source)
        attributes[key] = coerce(value, accepted[key].annotation, f"model.{key}", source)
    for key, parameter in accepted.items():
        if key not in attributes and parameter.default is inspect.Parameter.empty:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}missing required key 'model.{key}'")
    return MappingProxyType(
        {key: attributes.get(key, freeze(p.default)) for key, p in accepted.items()}
    )


def optimizer_parameters(name: str) -> frozenset[str]:
    """Keyword arguments of optimizer ``name`` that ``optim.optimizer_params`` may set."""
    return frozenset(OPTIMIZERS.lookup(name).parameters or ())


def scheduler_parameters(name: str) -> frozenset[str]:
    """Keyword arguments of LR scheduler ``name`` that ``optim.scheduler_params`` may set."""
    if name in UNSUPPORTED_SCHEDULERS:
        raise ConfigError(
            f"optim.scheduler '{name}' needs Python objects as arguments and cannot be set from "
            "a config; leave optim.scheduler out for OCP's warmup + milestones LambdaLR"
        )
    return frozenset(SCHEDULERS.lookup(name).parameters or ())
