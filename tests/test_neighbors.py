"""Neighbour search: both paths against ASE, batching, capping, invariances, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule
from ase.neighborlist import neighbor_list
from hypothesis import given, settings
from hypothesis import strategies as st

from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate, split
from catforge.data.graph import AtomicGraph
from catforge.data.neighbors import (
    DEGENERACY_TOLERANCE,
    MIN_DISTANCE,
    TIE_RESOLUTION,
    neighbor_list_cpu,
    radius_graph_pbc,
    select_edges,
    with_edges,
)
from catforge.errors import DataError

CUTOFF = 6.0
Edge = tuple[int, int, int, int, int]  # centre i, neighbour j, cell offset of j


def _slab(build, metal: str, size, adsorbate: str, pbc) -> Atoms:
    slab = build(metal, size, vacuum=10.0)
    add_adsorbate(slab, molecule(adsorbate), 2.0, "ontop")
    slab.pbc = pbc
    return slab


def _structures() -> dict[str, Atoms]:
    rng = np.random.default_rng(7)
    triclinic = Atoms(
        "CuOH2Pt",
        scaled_positions=rng.random((5, 3)),
        cell=[[4.1, 0.0, 0.0], [1.7, 3.6, 0.0], [0.9, -1.3, 4.4]],
        pbc=True,
    )
    outside = _slab(fcc111, "Pt", (2, 2, 3), "OH", True)
    outside.positions += [23.1, -41.7, 35.3]
    outside.positions[::2] += 3 * outside.cell[0] - 2 * outside.cell[2]
    benzene = molecule("C6H6")
    methane_sheet = molecule("CH4")
    methane_sheet.set_cell([[3.1, 0.0, 0.0], [0.4, 2.9, 0.0], [0.0, 0.0, 0.0]])
    methane_sheet.pbc = (True, True, False)
    wire = Atoms("Au2", positions=[[0, 0, 0], [1.3, 0.2, 0.1]], cell=[2.6, 0, 0], pbc=(1, 0, 0))
    return {
        "fcc111_slab": _slab(fcc111, "Pt", (3, 3, 4), "CO", True),
        "fcc100_slab_mixed_pbc": _slab(fcc100, "Cu", (2, 2, 3), "H2O", (True, True, False)),
        "bulk_primitive": bulk("Cu", "fcc", a=3.6),
        "bulk_cubic": bulk("NaCl", "rocksalt", a=5.64, cubic=True),
        "triclinic": triclinic,
        "tiny_cubic": Atoms("H", positions=[[0.1, 0.2, 0.3]], cell=np.eye(3) * 2.0, pbc=True),
        "tiny_skewed": Atoms(
            "H",
            positions=[[0.4, -0.2, 0.3]],
            cell=[[2, 0, 0], [0.9, 2, 0], [0.3, 0.7, 2]],
            pbc=True,
        ),
        "molecule_zero_cell": benzene,
        "sheet_zero_c": methane_sheet,
        "wire_zero_bc": wire,
        "atoms_outside_cell": outside,
    }


STRUCTURES = _structures()


def ase_edges(atoms: Atoms, cutoff: float = CUTOFF) -> dict[Edge, float]:
    """ASE's list (same sign convention: vector = pos[j] - pos[i] + S @ cell) -> distance.

    Pairs of coincident atoms (d = 0), which ASE keeps and catforge drops, are left out.
    """
    i, j, shifts, distance = neighbor_list("ijSd", atoms, cutoff)
    keep = distance > MIN_DISTANCE
    i, j, shifts, distance = i[keep], j[keep], shifts[keep], distance[keep]
    return {
        (a, b, *s): d
        for a, b, s, d in zip(i.tolist(), j.tolist(), shifts.tolist(), distance, strict=True)
    }


def edge_list(edge_index, offsets) -> list[Edge]:
    edge_index, offsets = np.asarray(edge_index), np.asarray(offsets)
    return [(i, j, *o) for j, i, o in zip(*edge_index.tolist(), offsets.tolist(), strict=True)]


def graph64(atoms: Atoms) -> AtomicGraph:
    return atoms_to_graph(atoms, with_labels=False, float_dtype=torch.float64)


def torch_edges(atoms: Atoms, cutoff=CUTOFF, max_neighbors=None, strict=False) -> list[Edge]:
    graph = radius_graph_pbc(graph64(atoms), cutoff, max_neighbors, strict=strict)
    assert int(graph.neighbors.sum()) == graph.n_edges
    return edge_list(graph.edge_index, graph.cell_offsets)


def cpu_edges(atoms: Atoms, cutoff=CUTOFF, max_neighbors=None, strict=False) -> list[Edge]:
    return edge_list(
        *neighbor_list_cpu(
            atoms.positions, atoms.cell.array, atoms.pbc, cutoff, max_neighbors, strict
        )
    )


def distances(atoms: Atoms, edges: list[Edge]) -> np.ndarray:
    array = np.array(edges, dtype=np.int64).reshape(-1, 5)
    vectors = atoms.positions[array[:, 1]] - atoms.positions[array[:, 0]]
    return np.linalg.norm(vectors + array[:, 2:] @ atoms.cell.array, axis=1)


PATHS = {"torch": torch_edges, "vesin": cpu_edges}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", STRUCTURES)
def test_edges_match_ase(name: str, path: str) -> None:
    atoms = STRUCTURES[name]
    reference = ase_edges(atoms)
    edges = PATHS[path](atoms)
    assert len(edges) == len(set(edges))
    assert set(edges) == set(reference)
    np.testing.assert_allclose(distances(atoms, edges), [reference[e] for e in edges], atol=1e-9)


@pytest.mark.parametrize("name", STRUCTURES)
def test_paths_agree_exactly_and_order_is_centre_then_distance(name: str) -> None:
    atoms = STRUCTURES[name]
    # Cutoff 8 A: the rounded distances need more than 16 bits (a wide key for numpy's sort).
    for cutoff, cap, strict in ((CUTOFF, None, False), (CUTOFF, 7, False), (8.0, 7, True)):
        edges = torch_edges(atoms, cutoff, cap, strict)
        assert edges == cpu_edges(atoms, cutoff, cap, strict)
        grid = np.round(distances(atoms, edges) / TIE_RESOLUTION).tolist()
        keys = [(e[0], g, *e[1:]) for e, g in zip(edges, grid, strict=True)]
        assert keys == sorted(keys)  # centre, rounded distance, neighbour, cell offset


def test_batched_equals_one_by_one() -> None:
    names = [
        "fcc111_slab",
        "molecule_zero_cell",
        "tiny_skewed",
        "fcc100_slab_mixed_pbc",
        "triclinic",
    ]
    graphs = [graph64(STRUCTURES[name]) for name in names]
    for cap, strict in ((None, False), (9, False), (9, True)):
        batch = radius_graph_pbc(collate(graphs), CUTOFF, cap, strict=strict)
        for graph, part in zip(graphs, split(batch), strict=True):
            alone = radius_graph_pbc(graph, CUTOFF, cap, strict=strict)
            assert torch.equal(part.edge_index, alone.edge_index)
            assert torch.equal(part.cell_offsets, alone.cell_offsets)
            assert torch.equal(part.neighbors, alone.neighbors)


def _brute_force_capped(reference: dict[Edge, float], cap: int, strict: bool) -> set[Edge]:
    """Per centre, sort ASE's neighbours and keep the nearest ``cap`` (plus ties if not strict)."""
    kept: set[Edge] = set()
    by_centre: dict[int, list[tuple[float, Edge]]] = {}
    for edge, d in reference.items():
        by_centre.setdefault(edge[0], []).append((d, edge))
    for items in by_centre.values():
        items.sort(key=lambda item: (round(item[0] / TIE_RESOLUTION), *item[1][1:]))
        if strict or len(items) <= cap:
            kept.update(edge for _, edge in items[:cap])
        else:
            limit = items[cap - 1][0] + DEGENERACY_TOLERANCE
            kept.update(edge for d, edge in items if d <= limit)
    return kept


def _rattled_slab() -> Atoms:
    atoms = _slab(fcc111, "Pt", (3, 3, 3), "CH3OH", True)
    atoms.rattle(0.05, seed=3)
    return atoms


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", ["bulk_primitive", "fcc111_slab", "tiny_skewed", "rattled"])
def test_max_neighbors_against_brute_force(name: str, strict: bool) -> None:
    atoms = _rattled_slab() if name == "rattled" else STRUCTURES[name]
    cap = 14  # cuts through a shell of the fcc lattice (12 + 6 neighbours)
    expected = _brute_force_capped(ase_edges(atoms), cap, strict)
    edges = torch_edges(atoms, max_neighbors=cap, strict=strict)
    assert set(edges) == expected
    assert edges == cpu_edges(atoms, max_neighbors=cap, strict=strict)
    counts = np.bincount([e[0] for e in edges], minlength=len(atoms))
    full = np.bincount([e[0] for e in ase_edges(atoms)], minlength=len(atoms))
    if strict:
        assert (counts == np.minimum(full, cap)).all()
    else:
        assert (counts >= np.minimum(full, cap)).all()


def test_non_strict_keeps_whole_shells_and_strict_breaks_ties_by_offset() -> None:
    atoms = STRUCTURES["bulk_primitive"]  # one atom: 12 nearest, then 6 second neighbours
    loose = torch_edges(atoms, max_neighbors=14)
    tight = torch_edges(atoms, max_neighbors=14, strict=True)
    assert len(loose) == 18 and len(tight) == 14
    assert set(tight) < set(loose)
    assert tight == torch_edges(atoms, max_neighbors=14, strict=True)  # deterministic
    tight_offsets = sorted(e[2:] for e in tight[12:])  # the two kept second neighbours
    second_shell = sorted(e[2:] for e in loose[12:])
    assert tight_offsets == second_shell[:2]


def test_capped_edges_are_the_nearest() -> None:
    atoms = _rattled_slab()
    kept = set(torch_edges(atoms, max_neighbors=20, strict=True))
    reference = ase_edges(atoms)
    for centre in range(len(atoms)):
        mine = [d for e, d in reference.items() if e[0] == centre and e in kept]
        dropped = [d for e, d in reference.items() if e[0] == centre and e not in kept]
        if dropped:
            assert max(mine) <= min(dropped) + TIE_RESOLUTION


@pytest.mark.parametrize("path", PATHS)
def test_translation_invariance_and_permutation_equivariance(path: str) -> None:
    atoms = STRUCTURES["fcc100_slab_mixed_pbc"].copy()
    reference = set(PATHS[path](atoms, max_neighbors=12))
    moved = atoms.copy()
    moved.positions += [17.3, -5.2, 9.9]
    assert set(PATHS[path](moved, max_neighbors=12)) == reference
    permutation = np.random.default_rng(0).permutation(len(atoms))
    new_index = np.argsort(permutation)  # atom a of the permuted structure is old permutation[a]
    permuted = atoms[permutation]
    expected = {(new_index[i], new_index[j], *o) for i, j, *o in reference}
    assert set(PATHS[path](permuted, max_neighbors=12)) == expected


def test_float32_input_matches_float64_away_from_the_cutoff() -> None:
    atoms = _rattled_slab()
    graph = radius_graph_pbc(atoms_to_graph(atoms, with_labels=False), CUTOFF)
    assert graph.pos.dtype == torch.float32
    found = set(edge_list(graph.edge_index, graph.cell_offsets))
    reference = ase_edges(atoms)
    for edge in found.symmetric_difference(reference):
        assert abs(reference.get(edge, distances(atoms, [edge])[0]) - CUTOFF) < 1e-4


def test_outputs_have_the_graph_layout() -> None:
    graph = radius_graph_pbc(graph64(STRUCTURES["fcc111_slab"]), CUTOFF, 50)
    assert graph.edge_index.dtype == torch.long and graph.cell_offsets.dtype == torch.long
    assert graph.neighbors.tolist() == [graph.n_edges]
    graph.validate()
    single = atoms_to_graph(Atoms("H", positions=[[0, 0, 0]]), with_labels=False)
    empty = radius_graph_pbc(single, CUTOFF)
    assert empty.edge_index.shape == (2, 0) and empty.neighbors.tolist() == [0]
    assert with_edges(single, CUTOFF).edge_index.shape == (2, 0)


def test_coincident_atoms_get_no_edge() -> None:
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0]])
    assert torch_edges(atoms) == [] and cpu_edges(atoms) == []


def test_with_edges_uses_either_path_with_the_same_result() -> None:
    graphs = [graph64(STRUCTURES[name]) for name in ("fcc111_slab", "sheet_zero_c")]
    for graph in graphs:
        filled = with_edges(graph, CUTOFF, 20)
        filled.validate()
        reference = radius_graph_pbc(graph, CUTOFF, 20)
        assert torch.equal(filled.edge_index, reference.edge_index)
        assert torch.equal(filled.cell_offsets, reference.cell_offsets)
    batch = with_edges(collate(graphs), CUTOFF, 20)
    assert batch.neighbors.tolist() == [with_edges(g, CUTOFF, 20).n_edges for g in graphs]


@pytest.mark.parametrize(
    ("cutoff", "max_neighbors"), [(-1.0, None), (0.0, None), (float("nan"), None), (6.0, 0)]
)
def test_bad_arguments_raise_data_error(cutoff: float, max_neighbors: int | None) -> None:
    atoms = STRUCTURES["bulk_primitive"]
    with pytest.raises(DataError):
        radius_graph_pbc(graph64(atoms), cutoff, max_neighbors)
    with pytest.raises(DataError):
        neighbor_list_cpu(atoms.positions, atoms.cell.array, atoms.pbc, cutoff, max_neighbors)


@pytest.mark.parametrize(
    ("cell", "pbc"),
    [
        (np.diag([3.0, 3.0, 0.0]), (True, True, True)),
        ([[3.0, 0, 0], [6.0, 0, 0], [0, 0, 0]], (True, True, False)),
        ([[3.0, 0, 0], [0, 3.0, 0], [3.0, 3.0, 0]], (True, True, True)),
    ],
)
def test_singular_periodic_cell_raises_data_error(cell, pbc) -> None:
    atoms = Atoms("H2", positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=cell, pbc=pbc)
    with pytest.raises(DataError, match="singular cell"):
        radius_graph_pbc(graph64(atoms), CUTOFF)
    with pytest.raises(DataError, match="singular cell"):
        neighbor_list_cpu(atoms.positions, atoms.cell.array, atoms.pbc, CUTOFF)


@st.composite
def random_structures(draw) -> tuple[Atoms, float]:
    """Random triclinic cells with bounded skew, random pbc, atoms up to a cell outside."""
    lengths = np.array(draw(st.lists(st.floats(2.5, 7.0), min_size=3, max_size=3)))
    shear = draw(st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3))
    cell = np.diag(lengths)
    cell[0, 1:], cell[1, 2] = np.multiply(shear[:2], lengths[0]), shear[2] * lengths[1]
    rotation = np.linalg.qr(np.random.default_rng(draw(st.integers(0, 999))).normal(size=(3, 3)))
    cell = cell @ rotation[0]
    pbc = np.array(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    frame = np.where(pbc[:, None], cell, np.diag(lengths))
    if draw(st.booleans()):
        cell[~pbc] = 0.0  # a non-periodic axis may have a zero cell vector
    n_atoms = draw(st.integers(2, 8))
    scaled = draw(
        st.lists(st.floats(-0.7, 1.7), min_size=3 * n_atoms, max_size=3 * n_atoms).map(
            lambda values: np.reshape(values, (-1, 3))
        )
    )
    cutoff = draw(st.floats(2.0, 6.0))
    return Atoms(f"Cu{n_atoms}", positions=scaled @ frame, cell=cell, pbc=pbc), cutoff


@settings(max_examples=100, deadline=None, derandomize=True)
@given(random_structures(), st.integers(1, 12), st.booleans())
def test_random_structures_match_ase(case: tuple[Atoms, float], cap: int, strict: bool) -> None:
    atoms, cutoff = case
    reference = ase_edges(atoms, cutoff)
    edges = torch_edges(atoms, cutoff)
    vesin_edges = cpu_edges(atoms, cutoff)
    # Only pairs within rounding of the cutoff may differ from ASE (hypothesis likes exact values).
    for found in (edges, vesin_edges):
        assert len(found) == len(set(found))  # no duplicates (vesin's half list is mirrored)
        differing = list(set(found).symmetric_difference(reference))
        assert np.all(np.abs(distances(atoms, differing) - cutoff) < 1e-9)
    if set(edges) == set(vesin_edges) == set(reference):
        assert edges == vesin_edges
        capped = torch_edges(atoms, cutoff, cap, strict)
        assert set(capped) == _brute_force_capped(reference, cap, strict)
        assert capped == cpu_edges(atoms, cutoff, cap, strict)


def test_select_edges_gives_the_same_order_on_numpy_and_torch() -> None:
    rng = np.random.default_rng(1)
    n_atoms, n_edges = 9, 400
    centre, neighbour = rng.integers(0, n_atoms, (2, n_edges))
    offsets = rng.integers(-2, 3, (n_edges, 3)).astype(np.int32)
    distance = np.round(rng.uniform(0.0, 4.0, n_edges), 1)  # many exact ties, some zeros
    for cap, strict in ((None, False), (5, False), (5, True)):
        args = (n_atoms, 4.0, cap, strict)
        on_numpy = select_edges(centre, neighbour, offsets, distance, *args)
        tensors = [torch.from_numpy(x) for x in (centre, neighbour, offsets, distance)]
        assert np.array_equal(select_edges(*tensors, *args).numpy(), on_numpy)
        assert (distance[on_numpy] > 0).all()


def _select_edges_reference(centre, neighbour, offsets, distance, cutoff, cap, strict) -> list:
    """The documented selection and order, edge by edge in Python."""
    grid = np.round(distance * (1.0 / TIE_RESOLUTION))
    kept = []
    for c in np.unique(centre).tolist():
        edges = [
            e for e in np.flatnonzero(centre == c).tolist() if MIN_DISTANCE < distance[e] < cutoff
        ]
        edges.sort(key=lambda e: (grid[e], neighbour[e], *offsets[e]))
        if cap is not None and len(edges) > cap:
            limit = distance[edges[cap - 1]] + DEGENERACY_TOLERANCE
            edges = edges[:cap] if strict else [e for e in edges if distance[e] <= limit]
        kept += edges
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_select_edges_matches_a_reference_implementation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Large offsets in some cases: keys wider than 16 bits for numpy's sort.
    n_atoms, n_edges, reach = 7, 600, (2, 300)[seed % 2]
    width = 2 * reach + 1
    triples = rng.choice(n_atoms * n_atoms * width**3, n_edges, replace=False)  # distinct edges
    centre, rest = np.divmod(triples, n_atoms * width**3)
    neighbour, code = np.divmod(rest, width**3)
    offsets = np.stack(np.unravel_index(code, (width,) * 3), axis=1) - reach
    # Exact ties, ties on the rounding grid and within DEGENERACY_TOLERANCE, self pairs, pairs
    # beyond the cutoff.
    scale = rng.choice([5.0, 100.0, 1e5], n_edges)
    distance = np.round(rng.uniform(0.0, 4.4, n_edges) * scale) / scale
    for cap, strict in ((None, False), (1, False), (20, False), (20, True), (90, True)):
        args = (n_atoms, 4.0, cap, strict)
        expected = _select_edges_reference(centre, neighbour, offsets, distance, 4.0, cap, strict)
        found = select_edges(centre, neighbour, offsets.astype(np.int32), distance, *args)
        assert found.tolist() == expected
        tensors = [torch.from_numpy(x) for x in (centre, neighbour, offsets, distance)]
        assert select_edges(*tensors, *args).tolist() == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    graphs = [graph64(atoms) for atoms in STRUCTURES.values()]
    batch = collate(graphs)
    on_cpu = radius_graph_pbc(batch, CUTOFF, 12)
    on_gpu = radius_graph_pbc(batch.to("cuda"), CUTOFF, 12)
    assert torch.equal(on_gpu.edge_index.cpu(), on_cpu.edge_index)
    assert torch.equal(on_gpu.cell_offsets.cpu(), on_cpu.cell_offsets)
    float32 = radius_graph_pbc(batch.to("cuda", torch.float32), CUTOFF, 12)
    assert float32.n_edges > 0
