"""Slurm host lists (``node[01-03,07],gpu5``) expanded to host names, without ``scontrol``."""

from __future__ import annotations

import itertools
import re

_HOST = re.compile(r"(?:[^,\[]|\[[^\]]*\])+")
_GROUP = re.compile(r"\[([^\]]*)\]")


def expand_hostlist(hostlist: str) -> list[str]:
    """Every host of a Slurm host list, in order: ``"node[01-03,07],gpu5"`` ->
    ``["node01", "node02", "node03", "node07", "gpu5"]``.

    Ranges keep the zero padding of their lower bound; several bracket groups in one name
    (``"r[1-2]n[1-2]"``) expand as their product. Raises ValueError on a malformed list.
    """
    text = hostlist.strip()
    hosts: list[str] = []
    position = 0
    for match in _HOST.finditer(text):
        if text[position : match.start()] not in ("", ","):
            raise ValueError(f"cannot parse host list {hostlist!r}")
        position = match.end()
        hosts.extend(_expand_host(match.group(), hostlist))
    if text[position:] not in ("", ",") or not hosts:
        raise ValueError(f"cannot parse host list {hostlist!r}")
    return hosts


def _expand_host(pattern: str, hostlist: str) -> list[str]:
    """One comma-free item: literal parts between bracket groups, each group a list of ranges."""
    literals = _GROUP.split(pattern)  # [text, group, text, group, ..., text]
    choices: list[list[str]] = []
    for index, part in enumerate(literals):
        if index % 2 == 0:
            if "[" in part or "]" in part:
                raise ValueError(f"unbalanced brackets in host list {hostlist!r}")
            choices.append([part])
        else:
            choices.append(_expand_ranges(part, hostlist))
    return ["".join(parts) for parts in itertools.product(*choices)]


def _expand_ranges(group: str, hostlist: str) -> list[str]:
    values: list[str] = []
    for item in group.split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {item!r} in host list {hostlist!r}")
        if not dash:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in host list {hostlist!r}")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values
