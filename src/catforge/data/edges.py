"""Graphs before models: the one step that provides the graph a model declares
(:class:`~catforge.data.graph_spec.GraphSpec`): :func:`provide_edges`, :class:`EdgeBuilder`.

A model declares its needs as a ``graph_spec``; it never searches for neighbours itself. The graph
step runs before the model (in :class:`~catforge.models.forces.ForceModel`, composed by
:func:`catforge.assemble.models.build_model`) and hands it a graph whose ``edge_index`` and
``cell_offsets`` are the ones the spec asks for: the stored edges (an LMDB written with edges)
when they are usable, else edges built by :func:`~catforge.data.neighbors.radius_graph_pbc`.
Edges hold indices and offsets only; models compute distances from ``pos``, so forces by
autograd stay exact whichever way the edges came.

Models import :class:`~catforge.data.graph_spec.GraphSpec` only, never this module or the
neighbour search.
"""

from __future__ import annotations

import torch

from catforge.data.graph import AtomicGraph
from catforge.data.graph_spec import GraphSpec


def provide_edges(graph: AtomicGraph, spec: GraphSpec) -> AtomicGraph:
    """``graph`` with the edges ``spec`` asks for: its stored edges when usable, else built.

    Built edges come from ``radius_graph_pbc(graph, spec.cutoff, spec.max_neighbors)``; without
    ``use_pbc`` on the graph made non-periodic first (stored edges are then never used). ``pos``
    and every other field are passed through unchanged (and keep their autograd history).
    """
    _check_buildable(spec)
    if spec.uses_stored_edges(graph):
        return graph
    from catforge.data.neighbors import radius_graph_pbc

    if not spec.use_pbc:
        graph = graph.replace(
            pbc=torch.zeros_like(graph.pbc), edge_index=None, cell_offsets=None, neighbors=None
        )
    return radius_graph_pbc(graph, spec.cutoff, spec.max_neighbors)


class EdgeBuilder:
    """The graph step of one model as a callable: ``EdgeBuilder(spec)(graph)`` is
    ``provide_edges(graph, spec)``. Refuses a spec it cannot serve when it is made."""

    def __init__(self, spec: GraphSpec) -> None:
        _check_buildable(spec)
        self.spec = spec

    def __call__(self, graph: AtomicGraph) -> AtomicGraph:
        return provide_edges(graph, self.spec)

    def __repr__(self) -> str:
        return f"EdgeBuilder({self.spec!r})"


def _check_buildable(spec: GraphSpec) -> None:
    if spec.triplets:
        raise ValueError(
            "GraphSpec(triplets=True): triplets are not built yet; "
            "no model in catforge can be given them"
        )
