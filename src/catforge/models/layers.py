"""Building blocks shared by the models: radial basis, cutoff, activation, scatter, PBC edges.

All functions are pure functions of tensors. Distances are in A. Edges follow the OCP convention
of :mod:`catforge.data.keys`: ``edge_index[0]`` is the neighbour ``j``, ``edge_index[1]`` the
centre ``i`` and the vector from ``i`` to ``j`` is ``pos[j] - pos[i] + cell_offsets @ cell``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from catforge.data.graph import AtomicGraph

SHIFT = 0.6931471824645996
"""ln 2 rounded to float32: the shift of PyG's ``ShiftedSoftplus``, so float64 results agree too."""


def shifted_softplus(x: Tensor) -> Tensor:
    """``softplus(x) - ln 2`` (zero at ``x = 0``), SchNet's activation; ln 2 as in PyG."""
    return F.softplus(x) - SHIFT


class ShiftedSoftplus(nn.Module):
    """Module form of :func:`shifted_softplus` (no parameters, as PyG's)."""

    def forward(self, x: Tensor) -> Tensor:
        return shifted_softplus(x)


def cosine_cutoff(distance: Tensor, cutoff: float) -> Tensor:
    """SchNet's envelope ``0.5 (cos(pi d / cutoff) + 1)``, same shape as ``distance`` (A).

    Like OCP/PyG it is *not* set to zero beyond ``cutoff``; the neighbour list does that.
    """
    return 0.5 * (torch.cos(distance * math.pi / cutoff) + 1.0)  # rounding as PyG


class GaussianSmearing(nn.Module):
    """Gaussians ``exp(coeff (d - mu_k)^2)`` with centres ``mu = linspace(start, stop, n)`` (A).

    ``coeff = -0.5 / (mu_1 - mu_0)^2``. The buffer ``offset`` (n,) and the float32 way ``coeff`` is
    computed match PyG's ``GaussianSmearing``, so state dicts and numbers agree.
    """

    offset: Tensor

    def __init__(self, start: float = 0.0, stop: float = 5.0, num_gaussians: int = 50) -> None:
        super().__init__()
        offset = torch.linspace(start, stop, num_gaussians)
        self.coeff = -0.5 / (offset[1] - offset[0]).item() ** 2
        self.register_buffer("offset", offset)

    def forward(self, distance: Tensor) -> Tensor:
        """``distance`` (E,) -> basis (E, n)."""
        diff = distance.unsqueeze(-1) - self.offset
        return torch.exp(self.coeff * diff.square())


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Sum the rows of ``src`` (E, ...) into ``dim_size`` rows by ``index`` (E,), via index_add_."""
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.index_add_(0, index, src)


def edge_vectors(graph: AtomicGraph) -> tuple[Tensor, Tensor]:
    """Vectors ``pos[j] - pos[i] + cell_offsets @ cell`` (E, 3) and their norms (E,), in A.

    The cell of each edge is the cell of its centre's structure. Without ``cell_offsets`` the
    graph is treated as non-periodic. Differentiable in ``pos`` and ``cell``.
    """
    if graph.edge_index is None:
        raise ValueError("edge_vectors needs a graph with edges; build them with radius_graph_pbc")
    vec = edge_displacements(graph, graph.edge_index, graph.cell_offsets)
    return vec, torch.linalg.vector_norm(vec, dim=-1)


def edge_displacements(
    graph: AtomicGraph, edge_index: Tensor, cell_offsets: Tensor | None
) -> Tensor:
    """Vectors (E, 3) A of the given edges of ``graph``; no periodic shift without offsets."""
    neighbour, centre = edge_index[0], edge_index[1]
    vec = graph.pos.index_select(0, neighbour) - graph.pos.index_select(0, centre)
    if cell_offsets is not None:
        # (n_graphs, 3, 3) x offsets per edge; bmm on the edge's cell equals offsets @ cell.
        cell = graph.cell.index_select(0, graph.batch.index_select(0, centre))
        shift = torch.bmm(cell_offsets.to(vec.dtype).unsqueeze(1), cell).squeeze(1)
        vec = vec + shift
    return vec


def safe_norm(vec: Tensor) -> tuple[Tensor, Tensor]:
    """Norms (E,) of ``vec`` (E, 3) with a finite gradient everywhere, and the mask ``d > 0``.

    Where a vector is exactly zero the norm is 0 and its gradient 0 (not NaN); callers multiply
    by the mask to drop such edges, as OCP's ``get_pbc_distances`` does.
    """
    square = vec.square().sum(-1)
    nonzero = square > 0
    norm = torch.where(nonzero, square, torch.ones_like(square)).sqrt()
    return torch.where(nonzero, norm, torch.zeros_like(norm)), nonzero


def symmetric_pairs(
    edge_index: Tensor, cell_offsets: Tensor | None, n_atoms: int | None = None
) -> tuple[Tensor, int] | None:
    """Pair each edge with its reverse: ``(representative (P,), n_both)``, or None.

    The edge ``j -> i`` with offset ``o`` and the edge ``i -> j`` with offset ``-o`` join the same
    atoms by opposite vectors, so every function of their distance is the same for both.
    ``representative[p]`` is the first edge of pair ``p``; the first ``n_both`` pairs have both
    edges, the others only one (a reverse cut by ``max_neighbors``, say). None when some edge
    appears more than once, so edges cannot be paired. ``n_atoms`` (default: from ``edge_index``)
    only saves a reduction.
    """
    neighbour, centre = edge_index[0], edge_index[1]
    n_edges = neighbour.shape[0]
    if n_edges == 0:
        return neighbour.new_zeros(0), 0
    if cell_offsets is None:
        offset_code, n_codes = torch.zeros_like(neighbour), 1
    else:
        reach = int(cell_offsets.abs().max()) + 1
        base = 2 * reach + 1
        shifted = cell_offsets + reach
        offset_code = (shifted[:, 0] * base + shifted[:, 1]) * base + shifted[:, 2]
        n_codes = base**3
    # The code of -o is n_codes - 1 - code(o). Orient each pair from its smaller atom index.
    reverse_code = n_codes - 1 - offset_code
    code = torch.where(neighbour > centre, offset_code, reverse_code)
    code = torch.where(neighbour == centre, torch.maximum(offset_code, reverse_code), code)
    n_atoms = int(edge_index.max()) + 1 if n_atoms is None else n_atoms
    low, high = torch.minimum(neighbour, centre), torch.maximum(neighbour, centre)
    key = (low * n_atoms + high) * n_codes + code
    order = torch.argsort(key, stable=True)  # equal keys are adjacent, first edge first
    sorted_key = key.index_select(0, order)
    starts = torch.ones_like(sorted_key, dtype=torch.bool)
    starts[1:] = sorted_key[1:] != sorted_key[:-1]
    start = torch.nonzero(starts).squeeze(1)
    counts = torch.diff(start, append=start.new_tensor([n_edges]))
    if int(counts.max()) > 2:
        return None
    both = counts == 2
    first = order.index_select(0, start)
    return torch.cat([first[both], first[~both]]), n_edges - int(start.shape[0])
