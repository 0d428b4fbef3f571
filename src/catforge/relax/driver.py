"""Batched relaxations with in-flight refill: many structures, one model call per step.

:func:`relax` keeps up to ``batch_size`` structures in flight. Every iteration evaluates the
force field once on all of them, hands each structure's frame to an optional observer, retires
the structures that converged (``max_i |F_i| < fmax`` on the forces of their *current*
positions, fixed atoms excluded) or used up ``steps``, refills the free places from the queue,
and moves the rest by one :class:`~catforge.relax.lbfgs.BatchedLBFGS` step. A retired structure
costs nothing more. Its result pairs the final positions with the energy and forces computed at
those positions. Step for step this is ``ase.optimize.LBFGS(...).run(fmax, steps)`` on each
structure: at most ``steps`` steps and ``steps + 1`` force evaluations.

The neighbour graph is rebuilt by the model's graph step on every call (stored edges are
dropped), with the model's own cutoff and neighbour cap. Positions are never wrapped into the cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from catforge.data.collate import collate
from catforge.data.graph import AtomicGraph
from catforge.relax.forcefields import ForceField
from catforge.relax.lbfgs import BatchedLBFGS, LBFGSSettings


@dataclass(frozen=True)
class RelaxSettings:
    """``steps``: most optimizer steps per structure; ``fmax`` eV/A: convergence threshold
    (0 runs all ``steps``); ``batch_size``: structures in flight; ``lbfgs``: optimizer settings."""

    steps: int = 300
    fmax: float = 0.05
    batch_size: int = 32
    lbfgs: LBFGSSettings = field(default_factory=LBFGSSettings)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"relaxation steps must be >= 0, got {self.steps}")
        if self.fmax < 0:
            raise ValueError(f"relaxation fmax must be >= 0 eV/A, got {self.fmax}")
        if self.batch_size < 1:
            raise ValueError(f"relaxation batch size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Frame:
    """One structure at one iteration: positions (n, 3) A, energy eV, forces (n, 3) eV/A
    (unconstrained, as the model gives them) and ``fmax`` over the free atoms."""

    index: int
    step: int
    positions: np.ndarray
    energy: float
    forces: np.ndarray
    fmax: float


@dataclass(frozen=True)
class RelaxResult:
    """A finished relaxation: ``initial`` is the input structure (labels included), ``final``
    the frame of the relaxed positions; ``converged`` says whether ``fmax`` was reached."""

    index: int
    initial: AtomicGraph
    final: Frame
    converged: bool

    @property
    def steps(self) -> int:
        return self.final.step


class FrameObserver(Protocol):
    """Receives every frame of every structure, in iteration order."""

    def __call__(self, frame: Frame) -> None: ...


def relax(
    force_field: ForceField,
    structures: Iterable[AtomicGraph],
    settings: RelaxSettings,
    observer: FrameObserver | None = None,
) -> Iterator[RelaxResult]:
    """Relax single structures from ``structures``; yield results as they finish.

    ``RelaxResult.index`` is the structure's position in ``structures``, so callers can restore
    the input order. Fixed atoms (``graph.fixed``) never move.
    """
    queue = enumerate(structures)
    flight = _InFlight(settings, force_field.device)
    while flight.refill(queue):
        output = force_field(flight.batch(force_field.dtype))
        if output.forces is None:
            raise ValueError("relaxations need a model that predicts forces (regress_forces)")
        energy = output.energy.detach().to(flight.device, torch.float64)
        forces = output.forces.detach().to(flight.device, torch.float64)
        free_forces = torch.where(flight.fixed[:, None], 0.0, forces)
        fmax = flight.per_system_max(torch.linalg.vector_norm(free_forces, dim=1))
        converged = fmax < settings.fmax
        done = converged | (flight.lbfgs.iterations >= settings.steps)
        done_slots = torch.nonzero(done).flatten().tolist()
        slots = range(flight.n_systems) if observer is not None else done_slots
        frames = flight.frames(slots, energy, forces, fmax)
        if observer is not None:
            for frame in frames.values():
                observer(frame)
        for slot in done_slots:
            yield RelaxResult(
                flight.indices[slot], flight.graphs[slot], frames[slot], bool(converged[slot])
            )
        kept_atoms = flight.retire(done)
        if flight.n_systems:
            flight.step(free_forces[kept_atoms])


class _InFlight:
    """The structures being relaxed: their graphs, positions (float64) and optimizer state."""

    def __init__(self, settings: RelaxSettings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.lbfgs = BatchedLBFGS(settings.lbfgs, device=device)
        self.indices: list[int] = []
        self.graphs: list[AtomicGraph] = []
        self.pos = torch.zeros(0, 3, dtype=torch.float64, device=device)
        self._template: AtomicGraph | None = None

    @property
    def n_systems(self) -> int:
        return len(self.graphs)

    @property
    def fixed(self) -> Tensor:
        """(n_atoms,) bool: atoms that never move."""
        fixed = self._batch_template().fixed
        return torch.zeros_like(self.pos[:, 0], dtype=torch.bool) if fixed is None else fixed

    @property
    def system_of_atom(self) -> Tensor:
        return self._batch_template().batch

    def refill(self, queue: Iterator[tuple[int, AtomicGraph]]) -> bool:
        """Take structures from ``queue`` up to ``batch_size``; False when nothing is left."""
        new: list[tuple[int, AtomicGraph]] = []
        while self.n_systems + len(new) < self.settings.batch_size:
            item = next(queue, None)
            if item is None:
                break
            new.append((item[0], without_edges(item[1])))
        if new:
            self.indices += [index for index, _ in new]
            self.graphs += [graph for _, graph in new]
            natoms = torch.tensor([graph.n_atoms for _, graph in new], device=self.device)
            self.lbfgs.add_systems(natoms)
            added = [graph.pos.to(self.device, torch.float64) for _, graph in new]
            self.pos = torch.cat([self.pos, *added])
            self._template = None
        return self.n_systems > 0

    def batch(self, dtype: torch.dtype) -> AtomicGraph:
        """The structures in flight at their current positions, in ``dtype``."""
        template = self._batch_template()
        if template.pos.dtype != dtype:
            template = self._template = template.to(self.device, dtype)
        return template.replace(pos=self.pos.to(dtype))

    def per_system_max(self, values: Tensor) -> Tensor:
        """Largest of an atom-level (n_atoms,) tensor within each structure (n_systems,)."""
        out = torch.zeros(self.n_systems, dtype=values.dtype, device=values.device)
        return out.scatter_reduce_(0, self.system_of_atom, values, "amax", include_self=True)

    def frames(
        self, slots: Sequence[int], energy: Tensor, forces: Tensor, fmax: Tensor
    ) -> dict[int, Frame]:
        """The frames of this iteration of the structures in ``slots``."""
        if not slots:
            return {}
        bounds = np.cumsum([0, *(graph.n_atoms for graph in self.graphs)])
        pos, forces_np = self.pos.cpu().numpy(), forces.cpu().numpy()
        steps = self.lbfgs.iterations.tolist()
        frames = {}
        for slot in slots:
            atoms = slice(bounds[slot], bounds[slot + 1])
            frames[slot] = Frame(
                self.indices[slot],
                steps[slot],
                pos[atoms].copy(),
                float(energy[slot]),
                forces_np[atoms].copy(),
                float(fmax[slot]),
            )
        return frames

    def retire(self, done: Tensor) -> Tensor:
        """Drop the structures where ``done`` (n_systems,) is True; return the kept atoms mask."""
        kept_atoms = ~done[self.system_of_atom]
        if bool(done.any()):
            keep = (~done).tolist()
            self.indices = [index for index, kept in zip(self.indices, keep, strict=True) if kept]
            self.graphs = [graph for graph, kept in zip(self.graphs, keep, strict=True) if kept]
            self.lbfgs.keep_systems(~done)
            self.pos = self.pos[kept_atoms]
            self._template = None
        return kept_atoms

    def step(self, free_forces: Tensor) -> None:
        """One optimizer step of every structure in flight."""
        self.pos = self.lbfgs.step(self.pos, free_forces, self.fixed)

    def _batch_template(self) -> AtomicGraph:
        if self._template is None:
            self._template = collate(self.graphs).to(self.device)
        return self._template


def without_edges(graph: AtomicGraph) -> AtomicGraph:
    """``graph`` without stored edges, which stop being valid once atoms move."""
    return graph.replace(edge_index=None, cell_offsets=None, neighbors=None)
