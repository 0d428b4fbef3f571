"""OC20 metrics as pure functions that return *totals*, so batches and ranks combine exactly.

Each metric is a pair ``(total, numel)``; the value is ``total / numel`` after summing both over
every batch and process (never an average of averages). The definitions follow OCP's
``ocpmodels/modules/evaluator.py`` (see ``ocp-spec.md`` section 5), computed in float64 on the
inputs' device without Python loops over atoms or systems. Units: eV, eV/A, A.

Decisions where OCP is silent or crashes:

* A system with **no free atoms** meets the force condition of ``energy_force_within_threshold``
  trivially (OCP raises on the empty max) and has ``d = 0`` for ADwT (OCP gets NaN, a failure);
  it adds nothing to the per-atom metrics.
* ``forces_cos`` is ``torch.nn.functional.cosine_similarity(eps=1e-8)`` as in OCP: each norm is
  clamped to ``eps``, so an atom whose predicted or true force is zero scores 0.
* ``positions_mae``/``positions_mse`` use the minimum-image displacement of free atoms (as ADwT
  does). OCP V3 uses the raw Cartesian difference; the two agree unless a free atom's
  displacement crosses half a periodic cell vector, where OCP's value is an artefact of wrapping.
  Pass ``positions_minimum_image=False`` for OCP's raw difference.
* Thresholds are strict (``<``) and compared in float64 after converting the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from catforge.registry import METRIC_DIRECTIONS, PRIMARY_METRICS, TASK_METRICS, lookup_name

ENERGY_THRESHOLD = 0.02
"""eV; EwT and EFwT count a system when ``|dE| < ENERGY_THRESHOLD``."""
FORCE_THRESHOLD = 0.03
"""eV/A; EFwT needs every free force component error ``< FORCE_THRESHOLD``."""
ADWT_THRESHOLDS = np.arange(0.01, 0.5, 0.001)
"""A; the 490 distance thresholds of ADwT, exactly OCP's ``np.arange(0.01, 0.5, 0.001)``."""
COSINE_EPS = 1e-8
"""Norm clamp of ``forces_cos`` (torch's default, as OCP)."""


class MetricTotals:
    """Per metric name a float64 ``total`` and ``numel`` (0-dim tensors); immutable.

    Combine with ``a + b`` or :meth:`merge`; read values with :meth:`compute`. For an all-reduce,
    flatten with :meth:`as_tensor` and rebuild with :meth:`from_tensor` using the same names.
    """

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, tuple[Tensor | float, Tensor | float]] | None = None):
        self._entries: dict[str, tuple[Tensor, Tensor]] = {}
        for name, (total, numel) in (entries or {}).items():
            total_t = torch.as_tensor(total, dtype=torch.float64)
            numel_t = torch.as_tensor(numel, dtype=torch.float64, device=total_t.device)
            if total_t.ndim != 0 or numel_t.ndim != 0:
                raise ValueError(f"metric '{name}': total and numel must be scalars")
            self._entries[name] = (total_t, numel_t)

    @property
    def names(self) -> tuple[str, ...]:
        """Metric names in insertion order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def total(self, name: str) -> Tensor:
        """The summed total of ``name`` (0-dim float64)."""
        return self._entries[name][0]

    def numel(self, name: str) -> Tensor:
        """The summed count of ``name`` (0-dim float64)."""
        return self._entries[name][1]

    def __add__(self, other: MetricTotals) -> MetricTotals:
        if not isinstance(other, MetricTotals):
            return NotImplemented
        entries = dict(self._entries)
        for name, (total, numel) in other._entries.items():
            if name in entries:
                mine = entries[name]
                entries[name] = (
                    mine[0] + total.to(mine[0].device),
                    mine[1] + numel.to(mine[1].device),
                )
            else:
                entries[name] = (total, numel)
        return MetricTotals(entries)

    add = __add__

    @classmethod
    def merge(cls, many: Iterable[MetricTotals]) -> MetricTotals:
        """Sum the totals and counts of many batches (an empty iterable gives no metrics)."""
        merged = cls()
        for totals in many:
            merged = merged + totals
        return merged

    def select(self, names: Iterable[str]) -> MetricTotals:
        """Only the given metrics (those missing here are skipped)."""
        return MetricTotals({name: self._entries[name] for name in names if name in self._entries})

    def as_tensor(
        self, names: Sequence[str] | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Flat float64 ``(2 * len(names),)``: all totals, then all counts, in ``names`` order.

        A name missing here contributes zeros, so every rank can reduce the same layout.
        """
        names = self.names if names is None else tuple(names)
        if device is None:
            device = next(iter(self._entries.values()))[0].device if self._entries else "cpu"
        zero = torch.zeros((), dtype=torch.float64)
        pairs = [self._entries.get(name, (zero, zero)) for name in names]
        flat = [pair[0] for pair in pairs] + [pair[1] for pair in pairs]
        if not flat:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.stack([value.to(device) for value in flat])

    @classmethod
    def from_tensor(cls, names: Sequence[str], flat: Tensor) -> MetricTotals:
        """Inverse of :meth:`as_tensor` for the same ``names``."""
        names = tuple(names)
        if flat.shape != (2 * len(names),):
            raise ValueError(f"expected shape ({2 * len(names)},) for {names}, got {flat.shape}")
        flat = flat.to(torch.float64).clone()
        k = len(names)
        return cls({name: (flat[i], flat[k + i]) for i, name in enumerate(names)})

    def compute(self) -> dict[str, float]:
        """``total / numel`` per metric as Python floats (NaN where ``numel == 0``); one sync."""
        values = self.as_tensor().tolist()
        k = len(self._entries)
        return {
            name: values[i] / values[k + i] if values[k + i] else math.nan
            for i, name in enumerate(self._entries)
        }

    def __repr__(self) -> str:
        return f"MetricTotals({self.compute()})"


def energy_totals(pred_energy: Tensor, target_energy: Tensor) -> MetricTotals:
    """``energy_mae``, ``energy_mse``, ``energy_within_threshold`` of one batch.

    pred_energy, target_energy: (n_graphs,) eV (denormalised).
    """
    if pred_energy.ndim != 1:
        raise ValueError(f"pred_energy must have shape (n_graphs,), got {tuple(pred_energy.shape)}")
    n = pred_energy.shape[0]
    _check_shape("target_energy", target_energy, (n,))
    error = (pred_energy.to(torch.float64) - target_energy.to(torch.float64)).abs()
    return MetricTotals(
        {
            "energy_mae": (error.sum(), n),
            "energy_mse": (error.square().sum(), n),
            "energy_within_threshold": ((error < ENERGY_THRESHOLD).sum(), n),
        }
    )


def force_totals(
    pred_forces: Tensor,
    target_forces: Tensor,
    batch: Tensor,
    n_graphs: int,
    free_mask: Tensor | None = None,
    pred_energy: Tensor | None = None,
    target_energy: Tensor | None = None,
) -> MetricTotals:
    """S2EF force metrics over free atoms, plus ``energy_mae`` and EFwT when energies are given.

    pred_forces, target_forces: (n_atoms, 3) eV/A; batch: (n_atoms,) system index;
    free_mask: (n_atoms,) bool, True where evaluated (``~graph.fixed``; None = all atoms);
    pred_energy, target_energy: (n_graphs,) eV. Fixed atoms' values (even NaN) are ignored.
    """
    n_atoms = pred_forces.shape[0]
    _check_shape("pred_forces", pred_forces, (n_atoms, 3))
    _check_shape("target_forces", target_forces, (n_atoms, 3))
    free = _free_mask(free_mask, batch, n_atoms)
    pred, target = pred_forces.to(torch.float64), target_forces.to(torch.float64)
    error = torch.where(free[:, None], (pred - target).abs(), 0.0)
    n_free = free.sum().to(torch.float64)
    cos = F.cosine_similarity(pred, target, dim=1, eps=COSINE_EPS)
    magnitude = (
        torch.linalg.vector_norm(pred, dim=1) - torch.linalg.vector_norm(target, dim=1)
    ).abs()
    axis_sums = error.sum(dim=0)
    entries: dict[str, tuple[Tensor | float, Tensor | float]] = {
        "forcesx_mae": (axis_sums[0], n_free),
        "forcesy_mae": (axis_sums[1], n_free),
        "forcesz_mae": (axis_sums[2], n_free),
        "forces_mae": (axis_sums.sum(), 3 * n_free),
        "forces_cos": (torch.where(free, cos, 0.0).sum(), n_free),
        "forces_magnitude": (torch.where(free, magnitude, 0.0).sum(), n_free),
    }
    if (pred_energy is None) != (target_energy is None):
        raise ValueError("give both pred_energy and target_energy, or neither")
    if pred_energy is not None and target_energy is not None:
        _check_shape("pred_energy", pred_energy, (n_graphs,))
        _check_shape("target_energy", target_energy, (n_graphs,))
        energy_error = (pred_energy.to(torch.float64) - target_energy.to(torch.float64)).abs()
        # Errors are >= 0, so a zero start makes a system without free atoms pass the force test.
        max_force_error = torch.zeros(n_graphs, dtype=torch.float64, device=error.device)
        max_force_error.scatter_reduce_(0, batch, error.amax(dim=1), "amax", include_self=True)
        success = (energy_error < ENERGY_THRESHOLD) & (max_force_error < FORCE_THRESHOLD)
        entries["energy_mae"] = (energy_error.sum(), n_graphs)
        entries["energy_force_within_threshold"] = (success.sum(), n_graphs)
    return MetricTotals(entries)


def minimum_image(
    displacement: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor | None = None
) -> Tensor:
    """OCP's ``min_diff``: wrap displacements to fractional (-0.5, 0.5] along periodic axes.

    displacement: (n, 3) A; cell: (n_graphs, 3, 3) A, rows are lattice vectors; pbc:
    (n_graphs, 3) bool; batch: (n,) system index (None = one system). Non-periodic axes are not
    wrapped; a zero-length non-periodic cell row is replaced by the unit axis for the solve.
    Returns (n, 3) float64.
    """
    n = displacement.shape[0]
    _check_shape("displacement", displacement, (n, 3))
    n_graphs = cell.shape[0]
    _check_shape("cell", cell, (n_graphs, 3, 3))
    _check_shape("pbc", pbc, (n_graphs, 3))
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=displacement.device)
    _check_shape("batch", batch, (n,))
    cell, pbc = cell.to(torch.float64), pbc.to(torch.bool)
    eye = torch.eye(3, dtype=torch.float64, device=cell.device)
    degenerate = (torch.linalg.vector_norm(cell, dim=-1) == 0) & ~pbc
    solve_cell = torch.where(degenerate[..., None], eye, cell)[batch]
    frac = torch.linalg.solve(solve_cell.mT, displacement.to(torch.float64))
    wrapped = torch.remainder(torch.remainder(frac, 1.0), 1.0)  # twice, as OCP: -1e-17 % 1 == 1
    wrapped = torch.where(wrapped > 0.5, wrapped - 1.0, wrapped)
    frac = torch.where(pbc[batch], wrapped, frac)
    return (frac.unsqueeze(-2) @ solve_cell).squeeze(-2)


def relaxation_totals(
    pred_pos: Tensor,
    target_pos: Tensor,
    cell: Tensor,
    pbc: Tensor,
    batch: Tensor,
    n_graphs: int,
    free_mask: Tensor | None,
    positions_minimum_image: bool = True,
) -> MetricTotals:
    """IS2RS metrics: ``average_distance_within_threshold``, ``positions_mae``, ``positions_mse``.

    pred_pos, target_pos: (n_atoms, 3) A (relaxed, not necessarily wrapped); cell: (n_graphs, 3, 3);
    pbc: (n_graphs, 3) bool; batch: (n_atoms,); free_mask: (n_atoms,) bool (None = all atoms).
    ADwT: per system d = mean over free atoms of the minimum-image distance; each system adds
    ``#{t in ADWT_THRESHOLDS: d < t}`` to the total and ``len(ADWT_THRESHOLDS)`` to the count.
    """
    n_atoms = pred_pos.shape[0]
    _check_shape("pred_pos", pred_pos, (n_atoms, 3))
    _check_shape("target_pos", target_pos, (n_atoms, 3))
    _check_shape("cell", cell, (n_graphs, 3, 3))
    free = _free_mask(free_mask, batch, n_atoms)
    raw = pred_pos.to(torch.float64) - target_pos.to(torch.float64)
    delta = minimum_image(raw, cell, pbc, batch)
    distance = torch.where(free, torch.linalg.vector_norm(delta, dim=1), 0.0)
    weights = free.to(torch.float64)
    zeros = torch.zeros(n_graphs, dtype=torch.float64, device=delta.device)
    distance_sum = zeros.index_add(0, batch, distance)
    free_count = zeros.index_add(0, batch, weights)
    mean_distance = torch.where(free_count > 0, distance_sum / free_count.clamp_min(1.0), 0.0)
    thresholds = torch.as_tensor(ADWT_THRESHOLDS, dtype=torch.float64, device=delta.device)
    success = (mean_distance[:, None] < thresholds[None, :]).sum()
    position_error = torch.where(free[:, None], (delta if positions_minimum_image else raw), 0.0)
    n_components = 3 * weights.sum()
    return MetricTotals(
        {
            "average_distance_within_threshold": (success, n_graphs * len(ADWT_THRESHOLDS)),
            "positions_mae": (position_error.abs().sum(), n_components),
            "positions_mse": (position_error.square().sum(), n_components),
        }
    )


def metric_direction(name: str) -> str:
    """``"min"`` if lower values of metric ``name`` are better, ``"max"`` if higher are.

    Unknown names fall back on the suffix (``_mae``/``_mse``: min; ``_within_threshold``: max),
    else raise a ConfigError with the closest known name.
    """
    if name in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[name]
    if name.endswith(("_mae", "_mse", "_loss")):
        return "min"
    if name.endswith("_within_threshold"):
        return "max"
    return lookup_name(METRIC_DIRECTIONS, name, "metric")


def is_better(name: str, new: float, old: float | None) -> bool:
    """Whether ``new`` strictly improves on ``old`` for metric ``name`` (no old value: True).

    A NaN ``new`` is never better; any finite value beats a NaN ``old``.
    """
    direction = metric_direction(name)
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new < old if direction == "min" else new > old


def task_metrics(task: str) -> tuple[str, ...]:
    """The metric names of ``task`` (``s2ef``, ``is2re``, ``is2rs``)."""
    return lookup_name(TASK_METRICS, task, "task")


def primary_metric(task: str) -> str:
    """The default primary metric of ``task``."""
    return lookup_name(PRIMARY_METRICS, task, "task")


def format_metrics_table(metrics: Mapping[str, float]) -> str:
    """An aligned two-column text table ``metric  value``, one row per metric in given order."""
    if not metrics:
        return "(no metrics)"
    values = [_format_value(value) for value in metrics.values()]
    name_width = max(len("metric"), *(len(name) for name in metrics))
    value_width = max(len("value"), *(len(value) for value in values))
    lines = [f"{'metric':<{name_width}}  {'value':>{value_width}}"]
    lines.append("-" * (name_width + 2 + value_width))
    lines += [
        f"{name:<{name_width}}  {value:>{value_width}}"
        for name, value in zip(metrics, values, strict=True)
    ]
    return "\n".join(lines)


def _format_value(value: float) -> str:
    if math.isfinite(value) and (value == 0 or 1e-3 <= abs(value) < 1e6):
        return f"{value:.4f}"
    return f"{value:.4e}"


def _free_mask(free_mask: Tensor | None, batch: Tensor, n_atoms: int) -> Tensor:
    """Validated (n_atoms,) bool free-atom mask (all True when None)."""
    _check_shape("batch", batch, (n_atoms,))
    if free_mask is None:
        return torch.ones(n_atoms, dtype=torch.bool, device=batch.device)
    _check_shape("free_mask", free_mask, (n_atoms,))
    if free_mask.dtype != torch.bool:
        raise ValueError(f"free_mask must be bool (True = free atom), got {free_mask.dtype}")
    return free_mask


def _check_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
