"""Batching structures and splitting them back."""

from __future__ import annotations

import pytest
import torch

from catforge.data.collate import collate, split
from catforge.errors import DataError
from tests.factories import graphs


def with_ring_edges(graph):
    """Edges i -> i+1 (mod n) with distinct cell offsets, to track edge shifting."""
    n = graph.n_atoms
    centre = torch.arange(n)
    neighbour = (centre + 1) % n
    offsets = torch.stack([centre, -centre, centre % 2], dim=1)
    return graph.replace(
        edge_index=torch.stack([neighbour, centre]),
        cell_offsets=offsets,
        neighbors=torch.tensor([n]),
    ).validate()


def test_collate_then_split_is_identity() -> None:
    originals = [with_ring_edges(graph) for graph in graphs()]
    batch = collate(originals).validate()
    assert batch.n_graphs == len(originals)
    assert batch.natoms.tolist() == [graph.n_atoms for graph in originals]
    assert batch.batch.bincount().tolist() == batch.natoms.tolist()
    starts = torch.cumsum(batch.natoms, 0) - batch.natoms
    first_edges = torch.cumsum(batch.neighbors, 0) - batch.neighbors
    for index in range(len(originals)):
        # Edge endpoints of structure `index` point into its own atom range.
        edge = first_edges[index]
        assert batch.edge_index[1, edge].item() == starts[index].item()
    parts = split(batch)
    for part, original in zip(parts, originals, strict=True):
        assert part.present() == original.present()
        for name in original.present():
            assert torch.equal(getattr(part, name), getattr(original, name)), name


def test_collate_of_batches_equals_flat_collate() -> None:
    items = [with_ring_edges(graph) for graph in graphs()]
    nested = collate([collate(items[:2]), collate(items[2:])])
    flat = collate(items)
    for name in flat.present():
        assert torch.equal(getattr(nested, name), getattr(flat, name)), name


def test_mixed_fields_refused() -> None:
    a, b = graphs()[:2]
    with pytest.raises(DataError, match=r"field\(s\) \['force', 'y'\] present in only one"):
        collate([a, b.replace(y=None, force=None)])
    with pytest.raises(DataError, match="at least one"):
        collate([])
