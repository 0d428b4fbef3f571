"""Models: energy functions over AtomicGraph batches, and the shared autograd-forces wrapper.

The energy-model interface (:class:`EnergyModel`) is all the rest of catforge relies on:

* ``forward(graph: AtomicGraph) -> Tensor`` energy per structure (n_graphs,), in eV (or in the
  trainer's normalised units). The model builds the edges it needs when the graph has none (or
  always, if it was configured so); it never reads config, files or loggers.
* ``cutoff: float`` (A) and ``max_neighbors: int | None``: the graph parameters it builds edges
  with. Relaxations and the calculator pass graphs without edges, so the model rebuilds them at
  every step. A neighbour cap below the atoms within the cutoff (OCP's 50 at 6 A cuts fcc
  metals' ~80) makes the energy jump when the 50th and 51st neighbours swap: forces are then not
  exactly ``-dE/dpos`` there, which matters for MD energy conservation more than for relaxations.

Forces are never a model's business: :class:`ForceModel` wraps any energy model and returns a
:class:`ModelOutput` with ``forces = -dE/dpos`` by autograd. :func:`build_schnet` takes an OCP
``model:`` block (minus ``name``) and returns that wrapper.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from catforge.data.graph import AtomicGraph
from catforge.models.forces import ForceModel, ModelOutput
from catforge.models.schnet import SchNet, build_schnet


@runtime_checkable
class EnergyModel(Protocol):
    """An ``nn.Module`` mapping a batch to energies (n_graphs,), with its graph parameters."""

    cutoff: float
    max_neighbors: int | None

    def __call__(self, graph: AtomicGraph) -> Tensor: ...


__all__ = ["EnergyModel", "ForceModel", "ModelOutput", "SchNet", "build_schnet"]
