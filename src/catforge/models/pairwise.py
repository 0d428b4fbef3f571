"""A pairwise Morse potential with learnable per-element parameters: a classical baseline.

.. math::

    E = \\sum_i e_{Z_i} + \\sum_{i<j} s(r_{ij})
        \\left[D_{ij} \\left(1 - e^{-a_{ij} (r_{ij} - r_{ij}^0)}\\right)^2 - D_{ij}\\right]

Each element ``Z`` has a well depth ``D_Z`` (eV), a stiffness ``a_Z`` (1/A), an equilibrium
distance ``r_Z`` (A) and a reference energy ``e_Z`` (eV, zero to start). A pair mixes them as
``D_ij = sqrt(D_i D_j)``, ``a_ij = (a_i + a_j) / 2`` and ``r_ij = (r_i + r_j) / 2``. ``D``, ``a``
and ``r`` are learned as logarithms, so they stay positive. The switch ``s`` is 1 below
``cutoff - switch_width`` and falls to 0 at ``cutoff`` as the quintic smoothstep, so energy,
forces and their first derivatives are continuous where pairs cross the cutoff.

The sum over pairs is half the sum over the graph's directed edges (each pair appears in both
directions); zero-length edges are dropped (zero energy and gradient), as in SchNet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from catforge.data.graph import AtomicGraph
from catforge.data.graph_spec import GraphSpec
from catforge.errors import ConfigError
from catforge.models.layers import edge_displacements, safe_norm, scatter_sum
from catforge.runtime.numerics import initialise_vector_math

N_ELEMENTS = 119
"""Rows of the per-element parameters: atomic numbers 0..118."""


class Morse(nn.Module):
    """Morse pair potential, ``forward(graph) -> energy (n_graphs,)`` in eV.

    ``cutoff`` (A), ``max_neighbors``, ``use_pbc`` and ``otf_graph`` make its :attr:`graph_spec`
    (as SchNet's). ``well_depth`` (eV), ``stiffness`` (1/A) and ``equilibrium_distance`` (A) are
    every element's starting parameters; ``switch_width`` (A) is the width of the smooth cutoff.
    """

    def __init__(
        self,
        cutoff: float = 6.0,
        max_neighbors: int | None = None,
        use_pbc: bool = True,
        otf_graph: bool = False,
        well_depth: float = 0.5,
        stiffness: float = 1.5,
        equilibrium_distance: float = 2.5,
        switch_width: float = 1.0,
    ) -> None:
        super().__init__()
        check_morse_block(
            {
                "cutoff": cutoff,
                "max_neighbors": max_neighbors,
                "well_depth": well_depth,
                "stiffness": stiffness,
                "equilibrium_distance": equilibrium_distance,
                "switch_width": switch_width,
            }
        )
        initialise_vector_math()  # before the first parallel sqrt/exp (catforge.runtime.numerics)
        self.cutoff = float(cutoff)
        self.max_neighbors = max_neighbors
        self.use_pbc = use_pbc
        self.otf_graph = otf_graph
        self.switch_width = float(switch_width)
        self.initial = (float(well_depth), float(stiffness), float(equilibrium_distance))
        self.log_well_depth = nn.Parameter(torch.empty(N_ELEMENTS))
        self.log_stiffness = nn.Parameter(torch.empty(N_ELEMENTS))
        self.log_equilibrium_distance = nn.Parameter(torch.empty(N_ELEMENTS))
        self.atom_energy = nn.Parameter(torch.empty(N_ELEMENTS))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every element at the starting ``well_depth``, ``stiffness`` and distance; ``e_Z = 0``."""
        depth, stiffness, distance = self.initial
        with torch.no_grad():
            self.log_well_depth.fill_(math.log(depth))
            self.log_stiffness.fill_(math.log(stiffness))
            self.log_equilibrium_distance.fill_(math.log(distance))
            self.atom_energy.zero_()

    @property
    def graph_spec(self) -> GraphSpec:
        """The graph this model reads (see :mod:`catforge.data.edges`)."""
        return GraphSpec(self.cutoff, self.max_neighbors, self.use_pbc, self.otf_graph)

    def forward(self, graph: AtomicGraph) -> Tensor:
        """Energy per structure (n_graphs,) eV of a (batched) graph with edges."""
        if graph.edge_index is None:
            raise ValueError(
                "Morse needs a graph with edges; provide them with "
                "catforge.data.edges.provide_edges(graph, model.graph_spec)"
            )
        neighbour, centre = graph.edge_index[0], graph.edge_index[1]
        offsets = graph.cell_offsets if self.use_pbc else None
        distance, nonzero = safe_norm(edge_displacements(graph, graph.edge_index, offsets))
        z_j, z_i = graph.atomic_numbers[neighbour], graph.atomic_numbers[centre]
        depth = torch.exp(0.5 * (self.log_well_depth[z_i] + self.log_well_depth[z_j]))
        stiffness = 0.5 * (self.log_stiffness[z_i].exp() + self.log_stiffness[z_j].exp())
        minimum = 0.5 * (
            self.log_equilibrium_distance[z_i].exp() + self.log_equilibrium_distance[z_j].exp()
        )
        well = depth * (1.0 - torch.exp(-stiffness * (distance - minimum))).square() - depth
        pair = 0.5 * well * smooth_switch(distance, self.cutoff, self.switch_width) * nonzero
        atoms = self.atom_energy[graph.atomic_numbers]
        per_atom = scatter_sum(pair, centre, graph.n_atoms) + atoms
        return scatter_sum(per_atom, graph.batch, graph.n_graphs)


def smooth_switch(distance: Tensor, cutoff: float, width: float) -> Tensor:
    """1 below ``cutoff - width``, 0 from ``cutoff`` on, the quintic smoothstep between (A).

    ``1 - x^3 (10 - 15 x + 6 x^2)`` with ``x = (d - cutoff + width) / width``: its first and
    second derivatives vanish at both ends.
    """
    x = ((distance - (cutoff - width)) / width).clamp(0.0, 1.0)
    return 1.0 - x.pow(3) * (10.0 - 15.0 * x + 6.0 * x.square())


_POSITIVE = {
    "well_depth": "an energy in eV",
    "stiffness": "an inverse length in 1/A",
    "equilibrium_distance": "a distance in A",
}


def check_morse_block(block: Mapping[str, Any]) -> None:
    """A ConfigError naming ``model.<key>`` and its valid range for a value Morse cannot use."""
    cutoff = block.get("cutoff")
    if cutoff is not None and not (math.isfinite(cutoff) and cutoff > 0):
        raise ConfigError(f"model.cutoff must be a distance in A > 0 (finite), got {cutoff!r}")
    for key, what in _POSITIVE.items():
        value = block.get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"model.{key} must be {what} > 0 (finite), got {value!r}")
    neighbours = block.get("max_neighbors")
    if neighbours is not None and neighbours < 1:
        raise ConfigError(
            f"model.max_neighbors must be >= 1 (or null for no cap), got {neighbours!r}"
        )
    width = block.get("switch_width")
    if width is not None and not (width > 0 and (cutoff is None or width <= cutoff)):
        raise ConfigError(
            f"model.switch_width must be a distance in A in (0, model.cutoff], got {width!r}"
        )
