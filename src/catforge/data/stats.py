"""Label statistics: mergeable moments, OCP normalisation statistics and their YAML lines.

:func:`target_stats` and :func:`s2ef_stats` give the ``target_mean``/``target_std`` (and, for
S2EF, ``grad_target_mean``/``grad_target_std``/``force_std``) that ingest and the demo generator
report; standard deviations are population values (``ddof=0``, like ``np.std``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Moments", "normalization_lines", "s2ef_stats", "target_stats", "yaml_float"]


class Moments:
    """Running count, mean and sum of squared deviations (Chan et al.), mergeable across workers."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, values: Any) -> None:
        """Include every element of ``values``."""
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if array.size:
            other = Moments()
            other.count = int(array.size)
            other.mean = float(array.mean())
            other.m2 = float(((array - other.mean) ** 2).sum())
            self.merge(other)

    def merge(self, other: Moments) -> None:
        """Include another accumulator's values."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total

    @property
    def std(self) -> float | None:
        """Population standard deviation, or None when nothing was added."""
        return None if self.count == 0 else float(np.sqrt(self.m2 / self.count))


def target_stats(energies: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """``target_mean`` and ``target_std`` of ``energies`` (both None when there are none)."""
    values = np.asarray(energies, dtype=np.float64)
    if not values.size:
        return {"target_mean": None, "target_std": None}
    return {"target_mean": float(values.mean()), "target_std": float(values.std())}


def s2ef_stats(energies: Sequence[float] | np.ndarray, forces: Moments) -> dict[str, float | None]:
    """:func:`target_stats` plus OCP's S2EF force normalisation and the force component std.

    ``grad_target_std`` is ``target_std``, as in OCP's S2EF configs: forces are -dE/dpos, so
    denormalising them by target_std gives -dE/dpos exactly.
    """
    stats = target_stats(energies)
    stats.update(grad_target_mean=0.0, grad_target_std=stats["target_std"], force_std=forces.std)
    return stats


def yaml_float(value: float | None) -> str:
    """A float as YAML 1.1 reads it back exactly (``1e-05`` needs a dot: ``1.0e-05``)."""
    if value is None:
        return "null"
    text = repr(float(value))
    if "e" in text and "." not in text:
        text = text.replace("e", ".0e")
    return text


def normalization_lines(stats: Mapping[str, float | None], indent: str = "") -> list[str]:
    """An OCP dataset entry's ``normalize_labels`` block (grad_target_* only for S2EF stats)."""
    names = ["target_mean", "target_std"]
    if "grad_target_std" in stats:
        names += ["grad_target_mean", "grad_target_std"]
    lines = ["normalize_labels: true", *(f"{name}: {yaml_float(stats[name])}" for name in names)]
    return [indent + line for line in lines]
