"""Label statistics of a training set for the normalisers: mean, std, element references."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from catforge.data.graph import AtomicGraph, check_atomic_numbers
from catforge.data.stats import Moments
from catforge.errors import ConfigError, DataError
from catforge.potential.targets import N_ELEMENTS, TARGET_FIELDS, ElementReferences
from catforge.runtime.progress import progress as progress_bar

log = logging.getLogger(__name__)

__all__ = ["Stats", "fit_statistics"]


@dataclass(frozen=True)
class Stats:
    """Label statistics of a training set (eV, eV/A); energies after subtracting references.

    ``grad_target_mean``/``grad_target_std`` follow OCP's convention (0 and ``target_std``);
    ``force_std`` is the raw std of all force components (for logging), None without forces.
    """

    target_mean: float
    target_std: float
    grad_target_mean: float
    grad_target_std: float
    force_std: float | None
    count: int
    element_references: ElementReferences | None = None


class _CompositionSums:
    """Streaming sufficient statistics ``n, sum y, sum y^2, 1^T A, A^T y, A^T A`` (float64)."""

    def __init__(self, chunk: int = 4096) -> None:
        self.count = 0
        self.sum_y = 0.0
        self.sum_y2 = 0.0
        self.colsum = np.zeros(N_ELEMENTS)
        self.aty = np.zeros(N_ELEMENTS)
        self.ata = np.zeros((N_ELEMENTS, N_ELEMENTS))
        self._rows: list[np.ndarray] = []
        self._ys: list[float] = []
        self._chunk = chunk

    def add(self, counts: np.ndarray, y: float) -> None:
        self._rows.append(counts)
        self._ys.append(y)
        if len(self._ys) >= self._chunk:
            self.flush()

    def flush(self) -> None:
        if not self._ys:
            return
        a, y = np.stack(self._rows).astype(np.float64), np.asarray(self._ys, dtype=np.float64)
        self.count += len(y)
        self.sum_y += float(y.sum())
        self.sum_y2 += float(y @ y)
        self.colsum += a.sum(axis=0)
        self.aty += a.T @ y
        self.ata += a.T @ a
        self._rows, self._ys = [], []

    def residual_moments(self, refs: np.ndarray) -> tuple[float, float]:
        """Mean and population std of ``y - A @ refs``, from the sums alone."""
        mean = (self.sum_y - self.colsum @ refs) / self.count
        sq = self.sum_y2 - 2.0 * refs @ self.aty + refs @ self.ata @ refs
        return float(mean), math.sqrt(max(sq / self.count - mean * mean, 0.0))


def fit_statistics(
    dataset: Any,
    target: str = "y",
    *,
    with_forces: bool = True,
    element_references: ElementReferences | None = None,
    fit_references: bool = False,
    ridge: float = 0.0,
    max_samples: int | None = None,
    progress: bool = True,
) -> Stats:
    """One pass over ``dataset`` (``fields(i)`` if it has it, else ``dataset[i]``) -> Stats.

    ``target`` is ``"y"`` (S2EF) or ``"y_relaxed"`` (IS2RE). Energies have ``element_references``
    subtracted, or, with ``fit_references``, references fitted by least squares in the same pass
    (normal equations, see :meth:`ElementReferences.from_normal_equations`) and the referenced
    mean/std computed exactly from the accumulated sums. ``max_samples`` uses that many evenly
    spaced entries. A zero spread (e.g. one structure) falls back to std 1 with a warning.
    """
    if target not in TARGET_FIELDS:
        raise ConfigError(f"target must be one of {TARGET_FIELDS}, got '{target}'")
    if fit_references and element_references is not None:
        raise ConfigError("give element references or fit them, not both")
    indices = _sample_indices(len(dataset), max_samples)
    sums, energies, forces = _CompositionSums(), Moments(), Moments()
    fixed_refs = None if element_references is None else element_references.energies.numpy()
    for index in progress_bar(indices, total=len(indices), desc="label stats", enabled=progress):
        fields = _entry_fields(dataset, int(index))
        z, energy = _composition_and_energy(fields, target, int(index))
        counts = np.bincount(z, minlength=N_ELEMENTS)
        if fit_references:
            sums.add(counts, energy)
        else:
            energies.add(energy - (0.0 if fixed_refs is None else float(counts @ fixed_refs)))
        if with_forces:
            forces.add(_required(fields, "force", int(index)))
    refs = element_references
    if fit_references:
        sums.flush()
        refs = ElementReferences.from_normal_equations(
            torch.from_numpy(sums.ata), torch.from_numpy(sums.aty), ridge=ridge
        )
        mean, std = sums.residual_moments(refs.energies.numpy())
    else:
        mean, std = energies.mean, energies.std or 0.0
    if not std > 1e-8:
        log.warning("energy targets have no spread (std %.3g); using target_std = 1", std)
        std = 1.0
    log.info("label stats over %d structures: mean %.6g eV, std %.6g eV", len(indices), mean, std)
    return Stats(mean, std, 0.0, std, forces.std if with_forces else None, len(indices), refs)


def _sample_indices(length: int, max_samples: int | None) -> np.ndarray:
    if length == 0:
        raise DataError("cannot compute label statistics of an empty training set")
    if max_samples is None or max_samples >= length:
        return np.arange(length)
    if max_samples < 1:
        raise ConfigError(f"max_samples must be at least 1, got {max_samples}")
    return np.unique(np.linspace(0, length - 1, max_samples).round().astype(np.int64))


def _entry_fields(dataset: Any, index: int) -> Mapping[str, Any]:
    """Entry ``index``'s fields; datasets that validate their entries (``check``) refuse a bad
    one here, naming its file, entry and sid."""
    if hasattr(dataset, "check"):
        checked = dataset.check(index)
        if not isinstance(checked, tuple):
            raise DataError(
                f"{checked}; fix or remove it, or set dataset.train.skip_bad_entries: true"
            )
        return checked[0]  # type: ignore[no-any-return]
    if hasattr(dataset, "fields"):
        fields: Mapping[str, Any] = dataset.fields(index)
        return fields
    graph: AtomicGraph = dataset[index]
    return {name: getattr(graph, name) for name in graph.present()}


def _required(fields: Mapping[str, Any], name: str, index: int) -> np.ndarray:
    value = fields.get(name)
    if value is None:
        raise DataError(f"training entry {index} has no '{name}' label, which this task needs")
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _composition_and_energy(
    fields: Mapping[str, Any], target: str, index: int
) -> tuple[np.ndarray, float]:
    z = _required(fields, "atomic_numbers", index).astype(np.int64).reshape(-1)
    check_atomic_numbers(z, f"training entry {index}")
    energy = _required(fields, target, index).reshape(-1)
    if energy.size != 1:
        raise DataError(f"training entry {index}: '{target}' has {energy.size} values, expected 1")
    return z, float(energy[0])
