"""Models: energy functions over AtomicGraph batches, and the shared autograd-forces wrapper.

The energy-model interface (:class:`EnergyModel`) is all the rest of catforge relies on:

* ``forward(graph: AtomicGraph) -> Tensor`` energy per structure (n_graphs,), in eV (or in the
  trainer's normalised units), of a graph that has edges. It never reads config, files or
  loggers, and never searches for neighbours.
* ``graph_spec: GraphSpec`` (:mod:`catforge.data.edges`): the graph it reads (cutoff in A,
  neighbour cap, periodic or not, whether stored edges may be used). One graph step outside the
  model provides it: :class:`~catforge.data.edges.EdgeBuilder`, run by :class:`ForceModel`
  before the energy model. Relaxations and the calculator pass graphs without edges, so edges
  are built at every step. A neighbour cap below the atoms within the cutoff (OCP's 50 at 6 A
  cuts fcc metals' ~80) makes the energy jump when the 50th and 51st neighbours swap: forces
  are then not exactly ``-dE/dpos`` there, which matters for MD energy conservation more than
  for relaxations.

Forces are never a model's business: :class:`ForceModel` wraps any energy model and returns a
:class:`ModelOutput` with ``forces = -dE/dpos`` by autograd.
:func:`catforge.assemble.models.build_model` composes energy model, graph step and wrapper from
a config. No module here imports the
neighbour search.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from catforge.data.graph import AtomicGraph
from catforge.data.graph_spec import GraphSpec
from catforge.models.forces import ForceModel, ModelOutput
from catforge.models.pairwise import Morse
from catforge.models.schnet import SchNet


@runtime_checkable
class EnergyModel(Protocol):
    """An ``nn.Module`` mapping a batch with edges to energies (n_graphs,), and its graph needs."""

    @property
    def graph_spec(self) -> GraphSpec: ...

    def __call__(self, graph: AtomicGraph) -> Tensor: ...


__all__ = [
    "EnergyModel",
    "ForceModel",
    "ModelOutput",
    "Morse",
    "SchNet",
]
