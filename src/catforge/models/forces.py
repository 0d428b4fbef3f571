"""Forces by autograd: one wrapper that turns any energy model into an energy + forces model."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from catforge.data.graph import AtomicGraph
from catforge.data.graph_spec import GraphSpec
from catforge.runtime.numerics import initialise_vector_math

if TYPE_CHECKING:
    from catforge.models import EnergyModel

_INNER = "energy_model."


@dataclass(frozen=True)
class ModelOutput:
    """What a ForceModel predicts for a batch.

    ``energy`` (n_graphs,) eV; ``forces`` (n_atoms, 3) eV/A, or None when forces are not regressed.
    """

    energy: Tensor
    forces: Tensor | None = None


class ForceModel(nn.Module):
    """Energy model + forces ``F = -dE/dpos`` by autograd.

    The energy model follows :class:`catforge.models.EnergyModel`. ``edges`` is the graph step
    that runs before it on every forward (``EdgeBuilder(energy_model.graph_spec)`` of
    :mod:`catforge.data.edges`, as :func:`catforge.assemble.models.build_model` composes it);
    without one the graph's own edges are used as given, and a graph without edges is a ValueError.

    Gradients are enabled locally, so forces also come out inside ``torch.no_grad()`` (predict,
    validate, relax). The autograd graph of the forces is kept (``create_graph``) only when
    training: by default that is ``self.training``, or the explicit ``training`` argument of
    :meth:`forward`. When not training, energy and forces are returned detached. The caller's
    graph is never modified.

    The wrapper has no parameters of its own and is transparent to state dicts: its keys are the
    energy model's (``embedding.weight``, not ``energy_model.embedding.weight``), so OCP/PyG state
    dicts load into it directly, also through DDP (``module.`` prefix).
    """

    energy_model: EnergyModel

    def __init__(
        self,
        energy_model: EnergyModel,
        regress_forces: bool = True,
        edges: Callable[[AtomicGraph], AtomicGraph] | None = None,
    ) -> None:
        super().__init__()
        # before the model's first parallel sqrt/exp (catforge.runtime.numerics)
        initialise_vector_math()
        self.energy_model = energy_model
        self.regress_forces = regress_forces
        self.edges = edges
        self.register_state_dict_post_hook(_strip_inner_prefix)
        self.register_load_state_dict_pre_hook(_add_inner_prefix)

    @property
    def graph_spec(self) -> GraphSpec:
        """The graph the energy model reads."""
        return self.energy_model.graph_spec

    @property
    def cutoff(self) -> float:
        """Neighbour cutoff (A) of the energy model's graph."""
        return float(self.graph_spec.cutoff)

    @property
    def max_neighbors(self) -> int | None:
        """Neighbours kept per atom in the energy model's graph (None: no cap)."""
        return self.graph_spec.max_neighbors

    def with_edges(self, graph: AtomicGraph) -> AtomicGraph:
        """``graph`` with the edges the energy model reads (the graph step, if any)."""
        if self.edges is not None:
            return self.edges(graph)
        if graph.edge_index is None:
            raise ValueError(
                "ForceModel got a graph without edges and has no graph step: build it with "
                "edges=EdgeBuilder(energy_model.graph_spec) (catforge.data.edges), or give the "
                "graph edge_index and cell_offsets"
            )
        return graph

    def forward(self, graph: AtomicGraph, *, training: bool | None = None) -> ModelOutput:
        """Energies (n_graphs,) and, with ``regress_forces``, forces (n_atoms, 3)."""
        create_graph = self.training if training is None else training
        graph = self.with_edges(graph)  # indices and offsets only: no autograd history needed
        if not self.regress_forces:
            with torch.set_grad_enabled(create_graph):
                return ModelOutput(self.energy_model(graph))
        with torch.enable_grad():
            pos = graph.pos
            if not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            energy = self.energy_model(graph.replace(pos=pos))
            forces = _negative_gradient(energy, pos, create_graph)
        if not create_graph:
            energy, forces = energy.detach(), forces.detach()
        return ModelOutput(energy, forces)


def _negative_gradient(energy: Tensor, pos: Tensor, create_graph: bool) -> Tensor:
    """``-d(sum energy)/d pos`` (n_atoms, 3); zeros where the energy does not depend on ``pos``."""
    if not energy.requires_grad:
        return torch.zeros_like(pos)
    (grad,) = torch.autograd.grad(
        energy,
        pos,
        grad_outputs=torch.ones_like(energy),
        create_graph=create_graph,
        allow_unused=True,
    )
    if grad is None:
        return torch.zeros_like(pos)
    return -grad


def _strip_inner_prefix(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    inner = prefix + _INNER
    items = list(state_dict.items())
    if not any(key.startswith(inner) for key, _ in items):
        return
    state_dict.clear()
    for key, value in items:
        new_key = prefix + key[len(inner) :] if key.startswith(inner) else key
        state_dict[new_key] = value


def _add_inner_prefix(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    renamed = OrderedDict()
    for key in list(state_dict):
        if key.startswith(prefix) and not key.startswith(prefix + _INNER):
            renamed[prefix + _INNER + key[len(prefix) :]] = state_dict.pop(key)
    state_dict.update(renamed)
