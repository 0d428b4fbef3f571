"""Label normalisation: OCP's Normalizer, per-element reference energies and one TargetTransform.

Energies are trained in normalised units ``(E - sum_i e_{Z_i} - mean) / std``: the per-element
references ``e_Z`` (optional) take the extensive composition part out of raw total energies, and
``mean``/``std`` are those of the *referenced* energies. Forces are normalised by the same ``std``
(OCP's ``grad_target_std = target_std``): forces are ``-dE/dpos``, the references do not depend on
positions, so a model whose normalised forces are ``-dE_norm/dpos`` gives, after denormalising
both by ``std``, forces that are exactly ``-dE/dpos`` of its denormalised energy. On raw OC20
total energies the spread without references is ~247 eV; dividing forces by it made the force
error 20x worse, which is why the std is taken after subtracting the references.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from ase.data import atomic_numbers as SYMBOL_TO_Z
from torch import Tensor

from catforge.data.graph import AtomicGraph
from catforge.errors import ConfigError, DataError

if TYPE_CHECKING:
    from catforge.potential.label_stats import Stats

log = logging.getLogger(__name__)

__all__ = ["N_ELEMENTS", "TARGET_FIELDS", "ElementReferences", "Normalizer", "TargetTransform"]

N_ELEMENTS = 119  # Z = 0 .. 118
TARGET_FIELDS = ("y", "y_relaxed")


class Normalizer:
    """``norm(x) = (x - mean) / std``, ``denorm(x) = x * std + mean`` (OCP ``Normalizer``).

    ``mean``/``std`` are scalars (stored as float64 tensors); ``state_dict`` is OCP's
    ``{"mean": tensor, "std": tensor}``. Computation runs in the input's dtype and device.
    """

    def __init__(self, mean: float | Tensor = 0.0, std: float | Tensor = 1.0) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float64).detach().clone().cpu()
        self.std = torch.as_tensor(std, dtype=torch.float64).detach().clone().cpu()
        if not (torch.isfinite(self.std).all() and (self.std > 0).all()):
            raise ConfigError(f"normaliser std must be finite and > 0, got {self.std.tolist()}")
        if not torch.isfinite(self.mean).all():
            raise ConfigError(f"normaliser mean must be finite, got {self.mean.tolist()}")

    def norm(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def denorm(self, x: Tensor) -> Tensor:
        return x * self.std.to(x) + self.mean.to(x)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        loaded = Normalizer(state["mean"], state["std"])
        self.mean, self.std = loaded.mean, loaded.std

    def __repr__(self) -> str:
        return f"Normalizer(mean={self.mean.tolist()}, std={self.std.tolist()})"


class ElementReferences:
    """Per-element reference energies ``e_Z`` (eV), ``E_ref(structure) = sum_Z n_Z e_Z``.

    ``energies`` is a (119,) float64 tensor indexed by Z; elements never seen are 0.
    """

    def __init__(self, energies: Tensor | Sequence[float]) -> None:
        values = torch.as_tensor(energies, dtype=torch.float64).detach().clone().cpu()
        if values.shape != (N_ELEMENTS,):
            raise ConfigError(
                f"element references need {N_ELEMENTS} values, got {tuple(values.shape)}"
            )
        if not torch.isfinite(values).all():
            raise ConfigError("element references must be finite numbers")
        self.energies = values

    @classmethod
    def fit(
        cls, counts: Tensor, energies: Tensor, *, ridge: float = 0.0, rcond: float = 1e-12
    ) -> ElementReferences:
        """Least-squares fit of ``energies ~ counts @ e`` (counts (n_structures, 119)).

        No intercept: a per-structure constant is not extensive, and the energy normaliser's
        mean absorbs any leftover constant. See :meth:`from_normal_equations` for the solver.
        """
        a = torch.as_tensor(counts, dtype=torch.float64)
        y = torch.as_tensor(energies, dtype=torch.float64).reshape(-1)
        return cls.from_normal_equations(a.T @ a, a.T @ y, ridge=ridge, rcond=rcond)

    @classmethod
    def from_normal_equations(
        cls, gram: Tensor, rhs: Tensor, *, ridge: float = 0.0, rcond: float = 1e-12
    ) -> ElementReferences:
        """Solve ``(A^T A + ridge I) e = A^T y`` over the elements present (float64, CPU).

        Absent elements (zero column) get 0. ``torch.linalg.lstsq`` (gelsd) drops singular
        values below ``rcond`` x the largest, so elements that always occur in a fixed ratio
        (e.g. only CO, never C or O alone) get the minimum-norm split of their joint energy;
        predictions of such compositions stay exact. ``ridge`` > 0 shrinks poorly determined
        references towards 0 (units eV^-2 weight on ``||e||^2``).
        """
        gram = torch.as_tensor(gram, dtype=torch.float64).cpu()
        rhs = torch.as_tensor(rhs, dtype=torch.float64).cpu()
        present = torch.diagonal(gram) > 0
        energies = torch.zeros(N_ELEMENTS, dtype=torch.float64)
        if present.any():
            sub = gram[present][:, present] + ridge * torch.eye(
                int(present.sum()), dtype=gram.dtype
            )
            solution = torch.linalg.lstsq(sub, rhs[present, None], rcond=rcond, driver="gelsd")
            energies[present] = solution.solution[:, 0]
        return cls(energies)

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[Any, Any], source: str = "element references"
    ) -> ElementReferences:
        """From ``{Z or symbol: eV}`` (e.g. ``{1: -3.4, "O": -7.2}``); other elements are 0."""
        energies = torch.zeros(N_ELEMENTS, dtype=torch.float64)
        for key, value in mapping.items():
            if isinstance(key, bool):  # YAML 1.1 reads an unquoted No (nobelium) as False
                raise ConfigError(f"{source}: key {key!r} is a boolean; quote element symbols")
            z = SYMBOL_TO_Z.get(key) if isinstance(key, str) and not key.isdigit() else int(key)
            if z is None or not 0 <= z < N_ELEMENTS:
                raise ConfigError(f"{source}: '{key}' is not an element symbol or Z in 0..118")
            try:
                energies[z] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{source}: energy of '{key}' must be a number, got {value!r}"
                ) from None
        return cls(energies)

    @classmethod
    def from_file(cls, path: str | Path) -> ElementReferences:
        """From a YAML or JSON file holding one mapping ``{Z or symbol: eV}``."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: cannot read element references: {error}") from error
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{path}: expected a mapping of element (Z or symbol) -> energy in eV"
            )
        return cls.from_mapping(data, source=str(path))

    def energy_offset(self, atomic_numbers: Tensor, batch: Tensor, n_graphs: int) -> Tensor:
        """Reference energy per structure (n_graphs,) float64 eV from (n_atoms,) Z and batch."""
        per_atom = self.energies.to(atomic_numbers.device)[atomic_numbers.long()]
        out = torch.zeros(n_graphs, dtype=torch.float64, device=atomic_numbers.device)
        return out.index_add_(0, batch, per_atom)

    def to_mapping(self) -> dict[int, float]:
        """``{Z: eV}`` for the non-zero references."""
        return {z: float(e) for z, e in enumerate(self.energies.tolist()) if e != 0.0}

    def state_dict(self) -> dict[str, Tensor]:
        return {"energies": self.energies.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.energies = ElementReferences(state["energies"]).energies


class TargetTransform:
    """Raw labels <-> normalised model targets, shared by training, predict and relax.

    ``energy_norm = (E - E_ref - target.mean) / target.std`` and
    ``forces_norm = (F - grad_target.mean) / grad_target.std``; ``grad_target`` defaults to
    ``Normalizer(0, target.std)`` (OCP's S2EF convention, which keeps ``F = -dE/dpos`` exact
    through denormalisation). ``field`` is the energy label: ``"y"`` (S2EF) or ``"y_relaxed"``.
    """

    def __init__(
        self,
        target: Normalizer | None = None,
        grad_target: Normalizer | None = None,
        element_references: ElementReferences | None = None,
        field: str = "y",
    ) -> None:
        if field not in TARGET_FIELDS:
            raise ConfigError(f"energy target must be one of {TARGET_FIELDS}, got '{field}'")
        self.target = target or Normalizer()
        self.grad_target = grad_target or Normalizer(0.0, self.target.std)
        self.element_references = element_references
        self.field = field
        if float(self.grad_target.mean) != 0.0 or not torch.equal(
            self.grad_target.std, self.target.std
        ):
            log.warning("grad_target differs from (0, target_std): forces != -dE/dpos after denorm")

    @classmethod
    def from_stats(cls, stats: Stats, field: str = "y") -> TargetTransform:
        """The OCP normalisers from :func:`fit_statistics` output, with its element references."""
        return cls(
            Normalizer(stats.target_mean, stats.target_std),
            Normalizer(stats.grad_target_mean, stats.grad_target_std),
            stats.element_references,
            field,
        )

    def energy_offset(self, graph: AtomicGraph) -> Tensor | None:
        """Reference energies (n_graphs,) float64 eV of ``graph``, or None without references."""
        if self.element_references is None:
            return None
        return self.element_references.energy_offset(
            graph.atomic_numbers, graph.batch, graph.n_graphs
        )

    def normalize_energy(self, energy: Tensor, graph: AtomicGraph) -> Tensor:
        """Energies (n_graphs,) eV -> normalised, in the input dtype."""
        offset = self.energy_offset(graph)
        referenced = energy if offset is None else (energy.double() - offset).to(energy.dtype)
        return self.target.norm(referenced)

    def normalize_batch(self, graph: AtomicGraph) -> tuple[Tensor, Tensor | None]:
        """Normalised (energy (n_graphs,), forces (n_atoms, 3) or None) targets of ``graph``."""
        energy = getattr(graph, self.field)
        if energy is None:
            raise DataError(f"batch has no '{self.field}' label; the training data must provide it")
        forces = None if graph.force is None else self.grad_target.norm(graph.force)
        return self.normalize_energy(energy, graph), forces

    def denormalize(
        self, energy_norm: Tensor, forces_norm: Tensor | None, graph: AtomicGraph
    ) -> tuple[Tensor, Tensor | None]:
        """Model outputs -> (energy (n_graphs,) eV, forces (n_atoms, 3) eV/A or None)."""
        energy = self.target.denorm(energy_norm)
        offset = self.energy_offset(graph)
        if offset is not None:
            energy = (energy.double() + offset).to(energy_norm.dtype)
        forces = None if forces_norm is None else self.grad_target.denorm(forces_norm)
        return energy, forces

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """OCP's checkpoint ``normalizers`` dict, plus ``element_references`` when present."""
        state = {"target": self.target.state_dict(), "grad_target": self.grad_target.state_dict()}
        if self.element_references is not None:
            state["element_references"] = self.element_references.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Load :meth:`state_dict` output (or an OCP ``normalizers`` dict without references)."""
        self.target.load_state_dict(state["target"])
        grad = state.get("grad_target")
        self.grad_target = (
            Normalizer(0.0, self.target.std)
            if grad is None
            else Normalizer(grad["mean"], grad["std"])
        )
        refs = state.get("element_references")
        self.element_references = None if refs is None else ElementReferences(refs["energies"])
