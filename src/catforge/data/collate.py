"""Collate many AtomicGraphs into one batch, and split a batch back into structures."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from catforge.data import keys
from catforge.data.graph import AtomicGraph
from catforge.data.keys import FIELDS, Level
from catforge.errors import DataError


def collate(graphs: Sequence[AtomicGraph]) -> AtomicGraph:
    """Concatenate structures into one batch; edge indices are shifted by the atoms before them.

    Optional fields must be present in all graphs or in none (a DataError names the field).
    """
    if not graphs:
        raise DataError("collate needs at least one structure")
    if len(graphs) == 1:
        return graphs[0]
    present = set(graphs[0].present())
    for index, graph in enumerate(graphs[1:], start=1):
        if set(graph.present()) != present:
            differing = sorted(present.symmetric_difference(graph.present()))
            raise DataError(
                f"cannot batch structures 0 and {index}: field(s) {differing} present in only one"
            )
    natoms = torch.cat([graph.natoms for graph in graphs])
    values: dict[str, Tensor] = {}
    for name in FIELDS:
        if name not in present or name in (keys.BATCH, keys.EDGE_INDEX):
            continue
        values[name] = torch.cat([getattr(graph, name) for graph in graphs])
    values[keys.BATCH] = torch.repeat_interleave(torch.arange(len(natoms)), natoms)
    if keys.EDGE_INDEX in present:
        shifted: list[Tensor] = []
        atoms_before = 0
        for graph in graphs:
            if graph.edge_index is not None:  # always: every graph has the same fields
                shifted.append(graph.edge_index + atoms_before)
            atoms_before += graph.n_atoms
        values[keys.EDGE_INDEX] = torch.cat(shifted, dim=1)
    return AtomicGraph(**values)


def split(batch: AtomicGraph) -> list[AtomicGraph]:
    """Split a batch into single structures (inverse of :func:`collate`)."""
    natoms = batch.natoms.tolist()
    atom_starts = [0, *torch.cumsum(batch.natoms, 0).tolist()]
    edge_starts = [] if batch.neighbors is None else [0, *torch.cumsum(batch.neighbors, 0).tolist()]
    graphs = []
    for index in range(batch.n_graphs):
        a0, a1 = atom_starts[index], atom_starts[index + 1]
        values: dict[str, Tensor] = {}
        for name in batch.present():
            value: Tensor = getattr(batch, name)
            level = FIELDS[name].level
            if name == keys.EDGE_INDEX:
                values[name] = value[:, edge_starts[index] : edge_starts[index + 1]] - a0
            elif level is Level.EDGE:
                values[name] = value[edge_starts[index] : edge_starts[index + 1]]
            elif level is Level.ATOM:
                values[name] = value[a0:a1]
            else:
                values[name] = value[index : index + 1]
        values[keys.BATCH] = torch.zeros(natoms[index], dtype=torch.long, device=batch.pos.device)
        graphs.append(AtomicGraph(**values))
    return graphs
