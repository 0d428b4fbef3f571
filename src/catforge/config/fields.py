"""Typed parsing of raw config sections into frozen dataclasses, and back to plain data.

:func:`parse_section` checks the keys of one raw mapping against a dataclass's fields (an unknown
key is a ConfigError naming its dotted path and the closest valid key) and coerces each value to
the field's annotated type with :func:`coerce`. :func:`to_plain` is the inverse: dataclasses,
paths, tuples and mapping proxies become YAML-able dicts, strings and lists.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from catforge.errors import ConfigError
from catforge.registry import suggest

T = TypeVar("T")

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
"""Numbers that YAML 1.1 (PyYAML) leaves as strings, such as ``1e-3``."""


def join_path(prefix: str, key: object) -> str:
    """``"optim" + "lr_initial" -> "optim.lr_initial"``; an empty prefix gives the key alone."""
    return f"{prefix}.{key}" if prefix else str(key)


def unknown_key_error(
    key: str, prefix: str, valid: Iterable[str], source: str = "", elsewhere: Iterable[str] = ()
) -> ConfigError:
    """A ConfigError for ``prefix.key`` with the closest valid key and the list of valid keys.

    ``elsewhere`` are dotted paths of all known keys; when ``key`` is a field of another section
    the error says where it belongs.
    """
    valid = sorted(valid)
    where = f"{source}: " if source else ""
    close = suggest(key, valid)
    if close is not None:
        hint = f" Did you mean '{join_path(prefix, close)}'?"
    else:
        homes = [path for path in elsewhere if path.rsplit(".", 1)[-1] == key]
        hint = f" Did you mean '{homes[0]}'?" if homes else ""
    section = f"'{prefix}'" if prefix else "the top level"
    return ConfigError(
        f"{where}unknown key '{join_path(prefix, key)}'.{hint} "
        f"Valid keys in {section}: {', '.join(valid)}"
    )


def check_keys(raw: Mapping[str, Any], valid: Iterable[str], prefix: str, source: str = "") -> None:
    """Raise :func:`unknown_key_error` for the first key of ``raw`` not in ``valid``."""
    valid = set(valid)
    for key in raw:
        if not isinstance(key, str):
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}key {key!r} in '{prefix or 'top level'}' is not a string")
        if key not in valid:
            raise unknown_key_error(key, prefix, valid, source)


def parse_section(cls: type[T], raw: object, prefix: str, source: str = "", **ready: Any) -> T:
    """Build dataclass ``cls`` from mapping ``raw``; ``ready`` holds fields already parsed.

    Missing fields take the dataclass defaults; a field without a default is a ConfigError
    naming ``prefix.field``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise type_error(prefix, "a mapping (a section of keys)", raw, source)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    check_keys(raw, fields, prefix, source)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(ready)
    for name, value in raw.items():
        if name not in ready:
            values[name] = coerce(value, hints[name], join_path(prefix, name), source)
    for name, field in fields.items():
        no_default = field.default is dataclasses.MISSING
        if name not in values and no_default and field.default_factory is dataclasses.MISSING:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}missing required key '{join_path(prefix, name)}'")
    return cls(**values)


def type_error(path: str, expected: str, value: object, source: str = "") -> ConfigError:
    where = f"{source}: " if source else ""
    shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
    return ConfigError(f"{where}'{path}' must be {expected}, got {type(value).__name__} {shown}")


def describe(tp: Any) -> str:
    """A human name for annotated type ``tp`` ("an integer", "one of 'a', 'b'", ...)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    if origin is not None and issubclass(origin, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping (a section of keys)"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, "a path" if tp is Path else getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings"}.get(tp, describe(tp))


def coerce(value: object, tp: Any, path: str, source: str = "") -> Any:
    """``value`` converted to annotated type ``tp``, or a ConfigError naming ``path``.

    Ints are accepted for floats and integral floats for ints; numeric strings such as ``"1e-3"``
    (which YAML 1.1 does not read as numbers) are accepted for both. Bools are never numbers.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return freeze(value)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, path, source)
    if tp is type(None):
        if value is None:
            return None
        raise type_error(path, "null", value, source)
    if origin is typing.Literal:
        return _coerce_literal(value, typing.get_args(tp), path, source)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise type_error(path, describe(tp), value, source)
        item = typing.get_args(tp)[0]
        return tuple(coerce(v, item, f"{path}[{i}]", source) for i, v in enumerate(value))
    if origin is not None and issubclass(origin, Mapping):
        if not isinstance(value, Mapping):
            raise type_error(path, "a mapping", value, source)
        return freeze(value)
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, path, source)  # type: ignore[arg-type]
    return _coerce_scalar(value, tp, path, source)


def _coerce_union(value: object, tp: Any, path: str, source: str) -> Any:
    members = [member for member in typing.get_args(tp) if member is not type(None)]
    if value is None and len(members) < len(typing.get_args(tp)):
        return None
    for member in members:
        try:
            return coerce(value, member, path, source)
        except ConfigError:
            if len(members) == 1 and not _is_scalar(member):
                raise  # a nested section's own error is the useful one
    raise type_error(path, describe(tp), value, source)


def _is_scalar(tp: Any) -> bool:
    return tp in (bool, int, float, str, Path)


def _coerce_literal(value: object, choices: tuple[Any, ...], path: str, source: str) -> Any:
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return choice
    shown = ", ".join(repr(choice) for choice in choices)
    close = suggest(str(value), [str(c) for c in choices]) if isinstance(value, str) else None
    hint = f" Did you mean '{close}'?" if close else ""
    where = f"{source}: " if source else ""
    raise ConfigError(f"{where}'{path}' must be one of {shown}, got {value!r}.{hint}")


def _coerce_scalar(value: object, tp: Any, path: str, source: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
    elif tp is float:
        number = _number(value)
        if number is not None and not math.isnan(number):
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str | Path) and str(value):
            return Path(value)
    else:  # pragma: no cover - a schema annotation this module does not know
        raise TypeError(f"unsupported config field type {tp!r} at {path}")
    raise type_error(path, describe(tp), value, source)


def _number(value: object) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        return float(value)
    return None


def freeze(value: object) -> Any:
    """Dicts -> read-only MappingProxyType and lists -> tuples, recursively."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({key: freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    return value


def to_plain(value: object) -> Any:
    """Dataclasses, mappings, tuples and paths -> dicts, lists and strings (YAML-able)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of every field of dataclass ``cls``, descending into nested dataclasses."""
    paths = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        path = join_path(prefix, field.name)
        paths.append(path)
        for member in (hints[field.name], *typing.get_args(hints[field.name])):
            if dataclasses.is_dataclass(member):
                paths.extend(field_paths(member, path))  # type: ignore[arg-type]
    return paths
