"""Periodic radius graphs: a batched torch search (CPU/CUDA) and a vesin path for preprocessing.

Conventions (OCP): edge ``e`` joins neighbour ``j = edge_index[0, e]`` to centre
``i = edge_index[1, e]``; the vector from centre to neighbour is ``pos[j] - pos[i] +
cell_offsets[e] @ cell`` (A) for the positions as given (atoms may lie outside the cell).
``neighbors[g]`` counts the edges of structure ``g``.

* Cutoff: pairs with distance ``d < cutoff`` are kept (strict ``<``, like ASE and vesin).
* Self pairs: edges with ``d <= MIN_DISTANCE`` (1e-8 A) are dropped: each atom's zero-offset self
  pair and pairs of coincident atoms (ASE keeps those with ``d = 0``; models cannot use them).
* Periodicity is per axis: no images along a non-periodic axis, whose cell vector may be zero.
  Periodic axes need non-zero, independent cell vectors, else :class:`~catforge.errors.DataError`.
* Order: edges are sorted by centre ``i``, then distance, then neighbour ``j``, then cell offset.
  Distances are compared after rounding to a ``TIE_RESOLUTION`` (1e-4 A) grid, so rounding noise
  (float32/float64, CPU/CUDA, vesin/torch) does not reorder symmetry-equivalent neighbours.
* Max neighbours: each centre keeps its first ``max_neighbors`` edges in that order. With
  ``strict=False`` (default, like fairchem's ``enforce_max_neighbors_strictly=False``) it also
  keeps every edge with ``d <= d_k + DEGENERACY_TOLERANCE`` (0.01 A), ``d_k`` the distance of the
  ``max_neighbors``-th edge, so degenerate shells stay whole and symmetric structures symmetric.
  With ``strict=True`` exactly ``max_neighbors`` are kept, ties going to the smaller ``j``, then
  the smaller cell offset. Both paths order and cap with the one function :func:`select_edges`.

:func:`radius_graph_pbc` handles whole batches on any device with no loop over atoms or
structures. It wraps positions into the cell along periodic axes, takes ``ceil(cutoff * |b_k|)``
images each way along periodic axis ``k`` (``b_k`` the reciprocal vector), drops images and
(image, centre) rows whose bounding-box distance is at least the cutoff (so vacuum along ``c``
costs nothing) and tests the remaining pairs in chunks of at most ``_PAIRS_PER_CHUNK`` (under
0.1 GB each). Final distances use the given positions, in the dtype of ``pos``.
:func:`neighbor_list_cpu` runs vesin (float64, one thread, its half list with each pair once,
then mirrored) on one structure for preprocessing; :func:`with_edges` picks the path for a graph.
Both paths sort with a radix-friendly :func:`_lexsort` (16-bit digits and ``np.lexsort`` on
numpy, packed int64 keys on torch).
"""

from __future__ import annotations

import math
import numbers
from typing import TypeVar

import numpy as np
import torch
import vesin
from torch import Tensor

from catforge.data.graph import AtomicGraph
from catforge.errors import DataError

Array = TypeVar("Array", np.ndarray, Tensor)

MIN_DISTANCE = 1e-8
"""Edges this short or shorter (A) are dropped as self pairs."""
DEGENERACY_TOLERANCE = 0.01
"""With ``strict=False``, edges this close (A) beyond the max_neighbors-th distance are kept too."""
TIE_RESOLUTION = 1e-4
"""Grid (A) distances are rounded to when ordering edges."""
_PAIRS_PER_CHUNK = 2**22
_MAX_IMAGES = 100_000  # per structure
_SINGULAR = 1e-6  # smallest accepted |det| / prod(|a_k|) of the periodic cell vectors
_MARGIN = 1e-3  # A added to the cutoff while searching; exact distances decide at the end


def radius_graph_pbc(
    graph: AtomicGraph, cutoff: float, max_neighbors: int | None = None, *, strict: bool = False
) -> AtomicGraph:
    """``graph`` with ``edge_index`` (2, E), ``cell_offsets`` (E, 3) and ``neighbors`` (n_graphs,).

    ``cutoff`` in A. Batched over all structures on the graph's device; conventions in the module
    docstring.
    """
    _check_arguments(cutoff, max_neighbors)
    with torch.no_grad():
        lattice, inverse, n_images = _lattice_frame(graph.cell, graph.pbc, cutoff)
        pos64 = graph.pos.to(torch.float64)
        frac = torch.einsum("nc,nck->nk", pos64, inverse[graph.batch])
        shift = torch.where(graph.pbc[graph.batch], torch.floor(frac), 0.0)
        wrapped = pos64 - torch.einsum("nk,nkc->nc", shift, lattice[graph.batch])
        box = _boxes(wrapped, graph)
        img_graph, img_offset = _candidate_images(lattice, n_images, box, cutoff)
        rows = _rows(wrapped, graph, lattice, img_graph, img_offset, box, cutoff)
        centre, neighbour, image = _pairs_within_cutoff(wrapped, graph, rows, cutoff)
        shift = shift.long()
        offsets = (
            img_offset.index_select(0, image)
            - shift.index_select(0, neighbour)
            + shift.index_select(0, centre)
        )
        edge_graph = graph.batch.index_select(0, centre)
        distance = _edge_distances(graph, centre, neighbour, offsets, edge_graph)
        order = select_edges(
            centre, neighbour, offsets, distance, graph.n_atoms, cutoff, max_neighbors, strict
        )
        edge_index = torch.stack([neighbour.index_select(0, order), centre.index_select(0, order)])
        neighbors = torch.bincount(edge_graph.index_select(0, order), minlength=graph.n_graphs)
    return graph.replace(
        edge_index=edge_index, cell_offsets=offsets.index_select(0, order), neighbors=neighbors
    )


def _edge_distances(
    graph: AtomicGraph, centre: Tensor, neighbour: Tensor, offsets: Tensor, edge_graph: Tensor
) -> Tensor:
    """``|pos[j] - pos[i] + offsets @ cell|`` (E,) A in the dtype of ``pos``: the formula models
    use, exact for exact lattices (the search in wrapped coordinates may round across cutoff)."""
    cells = graph.cell.reshape(-1, 9).index_select(0, edge_graph)
    factors = offsets.to(graph.pos.dtype)
    vectors = graph.pos.index_select(0, neighbour) - graph.pos.index_select(0, centre)
    for axis in range(3):
        vectors.addcmul_(factors[:, axis, None], cells[:, 3 * axis : 3 * axis + 3])
    return torch.linalg.vector_norm(vectors, dim=1)


def neighbor_list_cpu(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    max_neighbors: int | None = None,
    strict: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Edges of one structure by vesin: ``edge_index`` (2, E), ``cell_offsets`` (E, 3), int64.

    ``positions`` (n_atoms, 3) A, ``cell`` (3, 3) rows are lattice vectors, ``pbc`` (3,) bool,
    ``cutoff`` A. Same conventions, order and capping as :func:`radius_graph_pbc`, in float64.
    """
    _check_arguments(cutoff, max_neighbors)
    positions = np.ascontiguousarray(positions, dtype=np.float64).reshape(-1, 3)
    cell = np.ascontiguousarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    _check_cell_numpy(cell, pbc)  # vesin crashes (SIGFPE) on some singular periodic cells
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=False, n_threads=1)
    # vesin's S has the sign of cell_offsets (vector = pos[j] - pos[i] + S @ cell), like ASE's.
    pairs, shifts, distance = calculator.compute(positions, cell, pbc, quantities="PSd", copy=False)
    # Each pair once (about 30% faster than vesin's full list); add the reverse edges j -> i, -S.
    n_pairs = len(distance)
    atoms = np.concatenate([pairs[:, 0], pairs[:, 1], pairs[:, 0]]).view(np.int64)
    i, j = atoms[: 2 * n_pairs], atoms[n_pairs:]  # (i, j) then (j, i)
    offsets = np.empty((2 * n_pairs, 3), dtype=np.int64)
    offsets[:n_pairs] = shifts
    np.negative(offsets[:n_pairs], out=offsets[n_pairs:])
    distance = np.concatenate([distance, distance])
    order = select_edges(i, j, offsets, distance, len(positions), cutoff, max_neighbors, strict)
    return np.stack([j[order], i[order]]), np.take(offsets, order, axis=0)


def with_edges(
    graph: AtomicGraph, cutoff: float, max_neighbors: int | None = None, strict: bool = False
) -> AtomicGraph:
    """``graph`` with edges: vesin for one structure on CPU, else :func:`radius_graph_pbc`.

    Both give the same edges; only pairs within rounding of the cutoff can differ (vesin computes
    in float64, the torch path in the dtype of ``pos``).
    """
    if graph.n_graphs != 1 or graph.pos.device.type != "cpu":
        return radius_graph_pbc(graph, cutoff, max_neighbors, strict=strict)
    arrays = (graph.pos.detach().numpy(), graph.cell[0].detach().numpy(), graph.pbc[0].numpy())
    edge_index, offsets = neighbor_list_cpu(*arrays, cutoff, max_neighbors, strict)
    return graph.replace(
        edge_index=torch.from_numpy(edge_index),
        cell_offsets=torch.from_numpy(offsets),
        neighbors=torch.tensor([edge_index.shape[1]], dtype=torch.long),
    )


def select_edges(
    centre: Array,
    neighbour: Array,
    offsets: Array,
    distance: Array,
    n_atoms: int,
    cutoff: float,
    max_neighbors: int | None = None,
    strict: bool = False,
) -> Array:
    """Indices (E_kept,) of the edges to keep, in output order; shared by both search paths.

    ``centre``, ``neighbour`` (E,) int64 atom indices below ``n_atoms``; ``offsets`` (E, 3) int;
    ``distance`` (E,) A. Drops self pairs and pairs with ``distance >= cutoff``, then sorts and
    caps per centre as the module docstring says. The same code runs on numpy arrays (the vesin
    path: numpy's per-call overhead is lower) and on torch tensors on any device (batched path).
    """
    xp = np if isinstance(distance, np.ndarray) else torch
    n_edges = int(distance.shape[0])
    if n_edges == 0:
        return _int64(distance[:0])
    # Self pairs and pairs at or beyond the cutoff get centre key n_atoms: sorted last, dropped.
    centre_key = centre
    longest = float(distance.max())
    if float(distance.min()) <= MIN_DISTANCE or longest >= cutoff:
        centre_key = xp.where((distance > MIN_DISTANCE) & (distance < cutoff), centre, n_atoms)
    reach = max(-int(offsets.min()), int(offsets.max()))
    width = 2 * reach + 1
    # Neighbour and offset as base-width digits in [0, n_atoms * width**3), ordered like them.
    code = _int64(neighbour) * width
    code += offsets[:, 0]
    code *= width
    code += offsets[:, 1]
    code *= width
    code += offsets[:, 2]
    code += reach * (width * width + width + 1)
    grid = (distance * (1.0 / TIE_RESOLUTION)).round()  # integral floats: numpy needs no int64
    grid_bound = round(longest / TIE_RESOLUTION) + 2  # dropped edges too must stay in bounds
    order = _lexsort([(centre_key, n_atoms + 1), (grid, grid_bound), (code, n_atoms * width**3)])
    counts = xp.bincount(centre_key, minlength=n_atoms + 1)
    if max_neighbors is None or int(counts[:n_atoms].max()) <= max_neighbors:
        return order[: n_edges - int(counts[n_atoms])]
    starts = counts.cumsum(0) - counts
    centre_sorted = _take(centre_key, order)
    if strict:  # the first max_neighbors of each centre, none of the self pairs
        ends = starts + max_neighbors
        ends[n_atoms] = 0
        return order[_arange(n_edges, order) < _take(ends, centre_sorted)]
    # Keep d <= d_k + tolerance; this includes the first k (their grid is at most d_k's).
    dist_sorted = _take(distance, order)
    last = (starts + (max_neighbors - 1)).clip(max=n_edges - 1)
    limit = _take(dist_sorted, last) + DEGENERACY_TOLERANCE
    limit[counts <= max_neighbors] = math.inf
    limit[n_atoms] = -math.inf
    return order[dist_sorted <= _take(limit, centre_sorted)]


def _lexsort(keys: list[tuple[Array, int]]) -> Array:
    """Indices that sort lexicographically by ``keys``, most significant first (stable).

    Each key is (array of integers in ``[0, bound)``, int64 or integral floats, bound), all numpy
    or all torch; the result is of the same kind.
    """
    if isinstance(keys[0][0], np.ndarray):
        return _lexsort_numpy(keys)
    return _lexsort_torch(keys)


def _pack_keys(keys: list[tuple[Array, int]], limit: int) -> list[tuple[Array, int]]:
    """Adjacent keys merged while the product of bounds is <= ``limit``; least significant first."""
    packed: list[tuple[Array, int]] = []
    current, current_bound = keys[-1]
    for values, bound in reversed(keys[:-1]):
        if current_bound * bound <= limit:
            current = values * current_bound + current
            current_bound *= bound
        else:
            packed.append((current, current_bound))
            current, current_bound = values, bound
    packed.append((current, current_bound))
    return packed


def _lexsort_torch(keys: list[tuple[Tensor, int]]) -> Tensor:
    """:func:`_lexsort` on tensors: keys packed into int64, usually one stable sort."""
    packed = _pack_keys([(values.long(), bound) for values, bound in keys], 2**62)
    order = torch.argsort(packed[0][0], stable=True)
    for key, _ in packed[1:]:
        order = order.index_select(0, torch.argsort(key.index_select(0, order), stable=True))
    return order


def _lexsort_numpy(keys: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """:func:`_lexsort` on arrays: 16-bit digits for ``np.lexsort``, which radix-sorts those
    (several times faster than sorting int64)."""
    limit = 2**16
    digits = []
    for key, bound in _pack_keys(keys, limit):
        if bound > limit:  # split a wide key into 16-bit digits
            key = key.astype(np.int64, copy=False)
            while bound > limit:
                digits.append((key & (limit - 1)).astype(np.uint16))
                key, bound = key >> 16, -(-bound // limit)
        digits.append(key.astype(np.uint16))
    return np.lexsort(digits)


def _take(values: Array, index: Array) -> Array:
    """``values[index]`` along the first axis (torch's index_select is the faster gather)."""
    if isinstance(values, np.ndarray):
        return values[index]
    return values.index_select(0, index)


def _int64(values: Array) -> Array:
    if isinstance(values, np.ndarray):
        return values.astype(np.int64, copy=False)
    return values.long()


def _arange(stop: int, like: Array) -> Array:
    if isinstance(like, np.ndarray):
        return np.arange(stop, dtype=np.int64)
    return torch.arange(stop, device=like.device)


def _lattice_frame(cell: Tensor, pbc: Tensor, cutoff: float) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 lattice (B, 3, 3), its inverse, and images each way per axis (B, 3) long.

    ``lattice`` is the cell with each non-periodic row replaced by an orthonormal completion of
    the periodic rows: zero non-periodic vectors are fine, and nothing is wrapped along them.
    """
    cell64 = cell.to(torch.float64)
    _, _, vh = torch.linalg.svd(cell64 * pbc[..., None])  # null-space rows come last
    fill_index = (pbc.sum(1, keepdim=True) + torch.cumsum(~pbc, 1) - 1).clamp(0, 2)
    fill = vh.gather(1, fill_index[..., None].expand(-1, -1, 3))
    lattice = torch.where(pbc[..., None], cell64, fill)
    volume = torch.linalg.det(lattice).abs()  # fill rows are orthonormal: periodic volume only
    bad = ~(volume > _SINGULAR * lattice.norm(dim=2).prod(1))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise DataError(_singular_message(pbc[index].tolist(), index))
    inverse = torch.linalg.inv(lattice)
    # Column k of the inverse is the reciprocal vector b_k; the margin covers rounding.
    n_images = torch.ceil((cutoff + _MARGIN) * inverse.norm(dim=1)).long() * pbc
    if int((2 * n_images + 1).prod(1).max()) > _MAX_IMAGES:
        too_many = f"more than {_MAX_IMAGES} cell images would be needed"
        raise DataError(f"neighbour search: a cell is too small for cutoff {cutoff} A ({too_many})")
    return lattice, inverse, n_images


def _boxes(wrapped: Tensor, graph: AtomicGraph) -> tuple[Tensor, Tensor]:
    """Axis-aligned bounding box of each structure's wrapped positions: low, high (B, 3) A."""
    index = graph.batch[:, None].expand(-1, 3)
    empty = wrapped.new_zeros(graph.n_graphs, 3)
    low = empty.scatter_reduce(0, index, wrapped, "amin", include_self=False)
    high = empty.scatter_reduce(0, index, wrapped, "amax", include_self=False)
    return low, high


def _candidate_images(
    lattice: Tensor, n_images: Tensor, box: tuple[Tensor, Tensor], cutoff: float
) -> tuple[Tensor, Tensor]:
    """Images that may hold a pair within cutoff: structure (K,) and cell offset (K, 3) long.

    An image is dropped when the structure's box and its shifted copy are ``cutoff`` apart.
    """
    reach = n_images.amax(0).tolist()
    grid = torch.cartesian_prod(*(torch.arange(-r, r + 1, device=lattice.device) for r in reach))
    inside = (grid.abs()[None] <= n_images[:, None]).all(-1)
    shift = torch.einsum("gk,bkc->bgc", grid.to(lattice.dtype), lattice)
    gap = (shift.abs() - (box[1] - box[0])[:, None]).clamp(min=0)
    near = gap.square().sum(-1) < (cutoff + _MARGIN) ** 2
    img_graph, img_index = (inside & near).nonzero(as_tuple=True)
    return img_graph, grid[img_index]


def _rows(
    wrapped: Tensor,
    graph: AtomicGraph,
    lattice: Tensor,
    img_graph: Tensor,
    img_offset: Tensor,
    box: tuple[Tensor, Tensor],
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(image, centre) rows near their structure's box: image, centre atom, structure (R,), and
    the centre moved by minus the image shift (R, 3) in the dtype of ``pos``.

    Neighbour ``j`` of centre ``i`` in image ``t`` is within cutoff iff ``|w_j - (w_i - t)| <
    cutoff``, so a row whose moved centre is ``cutoff`` away from the box has no pair.
    """
    device = wrapped.device
    img_shift = torch.einsum("mk,mkc->mc", img_offset.to(lattice.dtype), lattice[img_graph])
    img_natoms = graph.natoms[img_graph]
    row_image = torch.repeat_interleave(torch.arange(len(img_graph), device=device), img_natoms)
    row_graph = img_graph.index_select(0, row_image)
    row_first = (img_natoms.cumsum(0) - img_natoms).index_select(0, row_image)
    atom_start = (graph.natoms.cumsum(0) - graph.natoms).index_select(0, row_graph)
    row_atom = atom_start + torch.arange(len(row_image), device=device) - row_first
    point = wrapped.index_select(0, row_atom) - img_shift.index_select(0, row_image)
    low, high = box[0].index_select(0, row_graph), box[1].index_select(0, row_graph)
    gap = torch.maximum(low - point, point - high).clamp(min=0)
    keep = (gap.square().sum(1) < (cutoff + _MARGIN) ** 2).nonzero().squeeze(1)
    row_image, row_atom, row_graph = (
        x.index_select(0, keep) for x in (row_image, row_atom, row_graph)
    )
    return row_image, row_atom, row_graph, point.index_select(0, keep).to(graph.pos.dtype)


def _pairs_within_cutoff(
    wrapped: Tensor,
    graph: AtomicGraph,
    rows: tuple[Tensor, Tensor, Tensor, Tensor],
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs closer than cutoff plus a margin: centre, neighbour, image index (E,).

    Each row is tested against every atom of its structure, padded to the largest structure
    (padding at +inf), one Cartesian component at a time, in chunks of bounded size.
    """
    row_image, row_atom, row_graph, point = rows
    device, dtype = wrapped.device, graph.pos.dtype
    atom_start = graph.natoms.cumsum(0) - graph.natoms
    n_max = int(graph.natoms.max()) if graph.n_atoms else 0
    padded = torch.full((3, graph.n_graphs, n_max), math.inf, dtype=dtype, device=device)
    local = torch.arange(graph.n_atoms, device=device) - atom_start[graph.batch]
    padded[:, graph.batch, local] = wrapped.T.to(dtype)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    parts = [(empty, empty, empty)]
    step = max(1, _PAIRS_PER_CHUNK // max(n_max, 1))
    for start in range(0, len(row_atom), step):
        graphs, moved = row_graph[start : start + step], point[start : start + step]
        terms = [padded[k].index_select(0, graphs).sub_(moved[:, k, None]) for k in range(3)]
        dist2 = terms[0].square_().add_(terms[1].square_()).add_(terms[2].square_())
        row, column = (dist2 < (cutoff + _MARGIN) ** 2).nonzero(as_tuple=True)
        found = row + start
        first = atom_start.index_select(0, row_graph.index_select(0, found))
        parts.append(
            (row_atom.index_select(0, found), first + column, row_image.index_select(0, found))
        )
    centre, neighbour, image = (torch.cat(values) for values in zip(*parts, strict=True))
    return centre, neighbour, image


def _check_arguments(cutoff: float, max_neighbors: int | None) -> None:
    if not (isinstance(cutoff, numbers.Real) and math.isfinite(cutoff) and cutoff > 0):
        raise DataError(f"neighbour search: cutoff must be a positive number of A, got {cutoff!r}")
    if max_neighbors is not None and (
        isinstance(max_neighbors, bool)
        or not isinstance(max_neighbors, numbers.Integral)
        or max_neighbors < 1
    ):
        raise DataError(
            f"neighbour search: max_neighbors must be a positive int or None, got {max_neighbors!r}"
        )


def _check_cell_numpy(cell: np.ndarray, pbc: np.ndarray) -> None:
    """Raise DataError unless the periodic cell vectors of one structure are independent."""
    values = cell.tolist()
    if not all(math.isfinite(x) for row in values for x in row):
        raise DataError("neighbour search: the cell contains NaN or infinite values")
    rows = [row for row, periodic in zip(values, pbc.tolist(), strict=True) if periodic]
    volume = math.hypot(*rows[0]) if rows else 1.0  # length, area or volume they span
    if len(rows) > 1:
        (a1, a2, a3), (b1, b2, b3) = rows[0], rows[1]
        cross = (a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1)
        if len(rows) == 2:
            volume = math.hypot(*cross)
        else:
            volume = abs(sum(x * y for x, y in zip(cross, rows[2], strict=True)))
    if not volume > _SINGULAR * math.prod(math.hypot(*row) for row in rows):
        raise DataError(_singular_message(pbc.tolist()))


def _singular_message(pbc: list[bool], index: int = 0) -> str:
    return (
        f"neighbour search: structure {index} has a singular cell along its periodic axes "
        f"(pbc={pbc}); each periodic axis needs a non-zero, linearly independent cell vector"
    )
