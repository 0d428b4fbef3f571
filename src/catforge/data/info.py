"""Summaries of an LMDB dataset: entries, fields, sizes, elements, energy and force statistics.

:func:`info` returns a JSON-serialisable dict with the keys ``path``, ``entries``, ``fields``,
``natoms``, ``elements``, ``energy_mean``, ``energy_std``, ``force_std`` and ``bad_entries``
(what ``catforge data info PATH --json`` prints; scripts rely on these names). Every entry is
read, checksum-verified and validated; the bad ones (unreadable, corrupt, NaN/inf, Z outside
1..118, no atoms) are counted in ``bad_entries`` (``count`` and the ``first`` few as ``file``,
``entry``, ``sid``, ``reason``) and left out of every other statistic; ``entries`` counts all.
:func:`format_info` renders it for people, with a WARNING line when there are bad entries.
Standard deviations are population values (``ddof=0``, like ``np.std``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import chemical_symbols

from catforge.data import keys
from catforge.data.lmdb import BadEntry, LmdbDataset
from catforge.data.stats import Moments, target_stats
from catforge.runtime.progress import progress as progress_bar

log = logging.getLogger(__name__)

__all__ = ["format_info", "info"]

LISTED_BAD_ENTRIES = 10
"""How many bad entries :func:`info` lists (all are counted)."""


def info(path: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Scan every entry of an LMDB file or folder and summarise it (see the module docstring).

    ``fields`` maps each field name to the number of entries that have it (equal to ``entries``
    when every entry has it). The energy statistics use ``y``, or ``y_relaxed`` when no entry
    has ``y``; they and ``force_std`` are None when the field is absent. All of them cover the
    good entries only; a bad entry never stops the scan.
    """
    dataset = LmdbDataset(path)
    counts: dict[str, int] = {}
    natoms: list[int] = []
    elements: set[int] = set()
    energies: dict[str, list[float]] = {keys.ENERGY: [], keys.ENERGY_RELAXED: []}
    forces = Moments()
    bad: list[BadEntry] = []
    bad_count = 0
    for index in progress_bar(range(len(dataset)), desc="info", enabled=progress):
        checked = dataset.check(index)
        if isinstance(checked, BadEntry):
            bad_count += 1
            if len(bad) < LISTED_BAD_ENTRIES:
                bad.append(checked)
            continue
        fields = checked[0]
        for name in fields:
            counts[name] = counts.get(name, 0) + 1
        numbers = np.asarray(fields[keys.ATOMIC_NUMBERS]).reshape(-1).astype(np.int64)
        natoms.append(int(numbers.size))
        elements.update(int(z) for z in np.unique(numbers))
        for name, values in energies.items():
            if fields.get(name) is not None:
                values.append(float(np.asarray(fields[name], dtype=np.float64).reshape(-1)[0]))
        if fields.get(keys.FORCES) is not None:
            forces.add(fields[keys.FORCES])
    energy = target_stats(energies[keys.ENERGY] or energies[keys.ENERGY_RELAXED])
    return {
        "path": str(path),
        "entries": len(dataset),
        "fields": _ordered(counts),
        "natoms": {
            "min": min(natoms) if natoms else None,
            "mean": float(np.mean(natoms)) if natoms else None,
            "max": max(natoms) if natoms else None,
        },
        "elements": [chemical_symbols[z] for z in sorted(elements)],
        "energy_mean": energy["target_mean"],
        "energy_std": energy["target_std"],
        "force_std": forces.std,
        "bad_entries": {"count": bad_count, "first": [dataclasses.asdict(b) for b in bad]},
    }


def _ordered(counts: Mapping[str, int]) -> dict[str, int]:
    """Field counts in canonical field order, unknown (e.g. legacy OCP) fields after, sorted."""
    known = [name for name in keys.FIELDS if name in counts]
    extra = sorted(name for name in counts if name not in keys.FIELDS)
    return {name: counts[name] for name in [*known, *extra]}


def format_info(summary: Mapping[str, Any]) -> str:
    """Human-readable lines for a dict returned by :func:`info`."""
    entries = summary["entries"]
    bad = summary.get("bad_entries", {"count": 0, "first": []})
    good = entries - bad["count"]
    fields: Mapping[str, int] = summary["fields"]
    lines = [f"path: {summary.get('path', '?')}", f"entries: {entries}"]
    lines.append("fields: " + (", ".join(fields) or "(none)"))
    partial = [f"{name} ({count} of {good})" for name, count in fields.items() if count < good]
    if partial:
        lines.append("  missing in some entries: " + ", ".join(partial))
    natoms = summary["natoms"]
    if natoms["min"] is not None:
        low, mean, high = natoms["min"], natoms["mean"], natoms["max"]
        lines.append(f"atoms per structure: min {low}, mean {mean:.2f}, max {high}")
    lines.append("elements: " + (", ".join(summary["elements"]) or "(none)"))
    if summary["energy_mean"] is None:
        lines.append("energy: absent")
    else:
        name = keys.ENERGY if keys.ENERGY in fields else keys.ENERGY_RELAXED
        lines.append(
            f"energy ({name}): mean {summary['energy_mean']:.6g} eV, "
            f"std {summary['energy_std']:.6g} eV"
        )
    force_std = summary["force_std"]
    lines.append(
        "forces: absent" if force_std is None else f"force components: std {force_std:.6g} eV/A"
    )
    if bad["count"]:
        shown = len(bad["first"])
        lines.append(
            f"WARNING: {bad['count']} bad entries (of {entries}), left out of the statistics "
            f"above{'' if shown == bad['count'] else f'; the first {shown}'}:"
        )
        lines += [f"  {BadEntry(**entry)}" for entry in bad["first"]]
    return "\n".join(lines)
