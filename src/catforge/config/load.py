"""Reading OCP YAML configs: ``includes:``, deep merging and dotted command-line overrides.

Include rules (see :func:`load_yaml_config`):

* ``includes:`` is a list of paths (a single string is accepted), resolved against the folder of
  the including file. A path that only exists relative to the current working directory (OCP's
  old rule) still works, with a deprecation warning.
* Includes are merged in order, each a deep merge (mappings merge key by key; lists and scalars
  are replaced). When two includes set the same leaf to different values the later include wins
  and a warning names the key (OCP V3 raised an error here; layering a variant over a base is
  common and harmless, so catforge allows it). The including file is then merged over the
  includes and wins silently (that is what including is for).
* A file that includes itself, directly or through others, is an error naming the chain.
* IS2RS keys written at the top level move under ``task:`` in each file (with a warning), so a
  child's top-level ``write_pos`` overrides its base's ``task.write_pos``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from catforge.errors import ConfigError

from .ocp import move_relax_keys

log = logging.getLogger(__name__)

Clash = Callable[[str], None]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate keys in a mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """One YAML file as a dict; syntax errors name the file, line and column."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from error
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error)
        context = getattr(error, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{where}: invalid YAML: {detail}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config file must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def load_yaml_config(path: Path) -> dict[str, Any]:
    """The raw config of ``path`` with its ``includes`` resolved and merged (module docs)."""
    return _load(Path(path), ())


def _load(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(str(p) for p in (*chain[chain.index(resolved) :], resolved))
        raise ConfigError(f"include cycle: {names}")
    raw = move_relax_keys(read_yaml(path), str(path))
    includes = raw.pop("includes", None)
    if includes is None:
        return raw
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: 'includes' must be a list of file paths")
    merged: dict[str, Any] = {}
    for include in includes:
        child = _resolve_include(include, path)
        loaded = _load(child, (*chain, resolved))

        def warn(key: str, child: Path = child) -> None:
            log.warning(
                "%s: '%s' is set by two includes; the later one (%s) wins", path, key, child
            )

        merged = deep_merge(merged, loaded, on_clash=warn)
    return deep_merge(merged, raw)


def _resolve_include(include: str, including: Path) -> Path:
    """``include`` relative to the including file's folder, else (deprecated) to the CWD."""
    target = Path(include).expanduser()
    if target.is_absolute():
        candidates = [target]
    else:
        candidates = [including.parent / target, Path.cwd() / target]
    for number, candidate in enumerate(candidates):
        if candidate.is_file():
            if number == 1:
                log.warning(
                    "%s: include '%s' was found relative to the working directory (OCP's old "
                    "rule, deprecated); write it relative to the including file instead",
                    including,
                    include,
                )
            return candidate
    tried = " or ".join(str(candidate) for candidate in dict.fromkeys(candidates))
    raise ConfigError(f"{including}: included file '{include}' not found (looked for {tried})")


def deep_merge(
    base: Mapping[str, Any],
    over: Mapping[str, Any],
    on_clash: Clash | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings recursively, anything else replaced.

    ``on_clash(dotted_key)`` is called where a leaf of ``base`` is replaced by a different value.
    """
    out = dict(base)
    for key, value in over.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = deep_merge(old, value, on_clash, path)
            continue
        if on_clash is not None and key in out and old != value:
            on_clash(path)
        out[key] = value
    return out


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """OCP's dotted overrides ``--optim.lr_initial=0.001`` (or ``--a.b VALUE``) as a nested dict.

    Values are read as YAML (``1e-3``, ``true``, ``[1, 2]``, ``null``); text that is not valid
    YAML is kept as a string, as OCP does.
    """
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or len(arg) == 2 or arg[2] in "=.":
            raise ConfigError(
                f"unexpected argument {arg!r}; config overrides look like --optim.lr_initial=0.001"
            )
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            key, text = arg[2:], args[index + 1]
            index += 1
        else:
            if "." not in arg:
                raise ConfigError(
                    f"unrecognized argument {arg}; see --help for the flags (config overrides "
                    "look like --optim.lr_initial=0.001)"
                )
            raise ConfigError(f"config override {arg} needs a value: {arg}=VALUE")
        _set_dotted(overrides, key, _parse_value(text), arg)
        index += 1
    if "includes" in overrides:
        raise ConfigError("'includes' cannot be overridden on the command line")
    return overrides


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(target: dict[str, Any], key: str, value: Any, arg: str) -> None:
    parts = key.split(".")
    if any(not part for part in parts):
        raise ConfigError(f"config override {arg}: empty name in '{key}'")
    node = target
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            done = ".".join(parts[: depth + 1])
            raise ConfigError(f"config override {arg} conflicts with an earlier --{done}")
        node = child
    if isinstance(node.get(parts[-1]), dict):
        raise ConfigError(f"config override {arg} conflicts with an earlier --{key}.*")
    node[parts[-1]] = value


def merge_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` (from :func:`parse_overrides`) deep-merged over ``config``; overrides win."""
    return deep_merge(config, move_relax_keys(overrides, "command line"))
