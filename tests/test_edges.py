"""The graph step: GraphSpec, provide_edges / EdgeBuilder, and models that never search."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ase.build import molecule

from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate
from catforge.data.edges import EdgeBuilder, provide_edges
from catforge.data.graph import AtomicGraph
from catforge.data.graph_spec import GraphSpec
from catforge.data.neighbors import radius_graph_pbc
from catforge.models import ForceModel, Morse
from tests.factories import emt_slab

MODELS_DIR = Path(__file__).resolve().parents[1] / "src" / "catforge" / "models"
SPEC = GraphSpec(cutoff=4.0, max_neighbors=12)


def slab_graph(seed: int = 0) -> AtomicGraph:
    return atoms_to_graph(emt_slab(seed=seed, labelled=False), float_dtype=torch.float64)


def bare(graph: AtomicGraph) -> AtomicGraph:
    return graph.replace(edge_index=None, cell_offsets=None, neighbors=None)


def assert_same_edges(a: AtomicGraph, b: AtomicGraph) -> None:
    assert a.edge_index is not None and b.edge_index is not None
    assert torch.equal(a.edge_index, b.edge_index)
    assert a.cell_offsets is not None and b.cell_offsets is not None
    assert torch.equal(a.cell_offsets, b.cell_offsets)
    assert a.neighbors is not None and b.neighbors is not None
    assert torch.equal(a.neighbors, b.neighbors)


# --- GraphSpec ---------------------------------------------------------------------------------


def test_graph_spec_defaults_and_is_frozen() -> None:
    spec = GraphSpec(6.0)
    assert (spec.max_neighbors, spec.use_pbc, spec.otf_graph, spec.triplets) == (
        None,
        True,
        False,
        False,
    )
    with pytest.raises(AttributeError):
        spec.cutoff = 5.0  # type: ignore[misc]
    assert GraphSpec(6.0, 50) == GraphSpec(cutoff=6.0, max_neighbors=50)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"cutoff": 0.0}, r"cutoff must be a distance in A > 0, got 0\.0"),
        ({"cutoff": -1.0}, "cutoff must be"),
        ({"cutoff": float("inf")}, "cutoff must be"),
        ({"cutoff": float("nan")}, "cutoff must be"),
        ({"cutoff": True}, "cutoff must be"),
        ({"cutoff": 6.0, "max_neighbors": 0}, r"max_neighbors must be an int >= 1 or None, got 0"),
        ({"cutoff": 6.0, "max_neighbors": 2.5}, "max_neighbors must be"),
        ({"cutoff": 6.0, "max_neighbors": True}, "max_neighbors must be"),
    ],
)
def test_graph_spec_refuses_bad_values(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GraphSpec(**arguments)  # type: ignore[arg-type]


def test_triplets_are_refused_by_the_graph_step_not_by_the_spec() -> None:
    spec = GraphSpec(6.0, triplets=True)  # the spec can say it; nothing can build it yet
    with pytest.raises(ValueError, match="triplets are not built yet"):
        EdgeBuilder(spec)
    with pytest.raises(ValueError, match="triplets are not built yet"):
        provide_edges(slab_graph(), spec)


# --- provide_edges -----------------------------------------------------------------------------


def test_missing_edges_are_built_with_the_spec() -> None:
    graph = slab_graph()
    assert not graph.has_edges
    out = provide_edges(graph, SPEC)
    assert_same_edges(out, radius_graph_pbc(graph, SPEC.cutoff, SPEC.max_neighbors))
    assert out.pos is graph.pos and not graph.has_edges  # input untouched, pos passed through
    assert out.cell_offsets is not None and out.cell_offsets.abs().sum() > 0  # images are used
    assert out.n_edges < radius_graph_pbc(graph, SPEC.cutoff).n_edges  # the cap was applied


def test_stored_edges_are_used_as_they_are() -> None:
    graph = slab_graph()
    stored = radius_graph_pbc(graph, 3.0, 6)  # not what SPEC would build
    assert provide_edges(stored, SPEC) is stored
    assert EdgeBuilder(SPEC)(stored) is stored


def test_otf_graph_rebuilds_stored_edges() -> None:
    graph = slab_graph()
    stored = radius_graph_pbc(graph, 3.0, 6)
    otf = GraphSpec(SPEC.cutoff, SPEC.max_neighbors, otf_graph=True)
    assert_same_edges(provide_edges(stored, otf), radius_graph_pbc(graph, 4.0, 12))


def test_without_pbc_the_graph_is_rebuilt_non_periodic() -> None:
    atoms = molecule("CH3CH2OH")
    atoms.set_cell([4.0, 4.0, 4.0])  # smaller than twice the cutoff: images would be neighbours
    atoms.pbc = True
    graph = radius_graph_pbc(atoms_to_graph(atoms), 4.0)
    spec = GraphSpec(4.0, use_pbc=False)
    out = provide_edges(graph, spec)
    assert not bool(out.pbc.any())
    assert out.cell_offsets is not None and not bool(out.cell_offsets.any())
    atoms.pbc = False
    assert_same_edges(out, radius_graph_pbc(atoms_to_graph(atoms), 4.0))
    assert out.n_edges < graph.n_edges


def test_a_batch_gets_the_edges_of_each_structure() -> None:
    graphs = [slab_graph(0), slab_graph(1)]
    together = provide_edges(collate(graphs), SPEC)
    alone = collate([provide_edges(graph, SPEC) for graph in graphs])
    assert_same_edges(together, alone)


def test_pos_keeps_its_autograd_history() -> None:
    graph = slab_graph()
    pos = graph.pos.clone().requires_grad_(True)
    out = provide_edges(graph.replace(pos=pos * 1.0), SPEC)
    assert out.pos.grad_fn is not None
    (grad,) = torch.autograd.grad(out.pos.sum(), pos)
    assert torch.equal(grad, torch.ones_like(pos))


# --- the step around the model -----------------------------------------------------------------


class Counting:
    """A graph step that counts its calls."""

    def __init__(self, spec: GraphSpec) -> None:
        self.builder = EdgeBuilder(spec)
        self.calls = 0

    def __call__(self, graph: AtomicGraph) -> AtomicGraph:
        self.calls += 1
        return self.builder(graph)


def test_force_model_runs_its_graph_step_before_the_energy_model() -> None:
    energy_model = Morse(cutoff=4.0).double()
    step = Counting(energy_model.graph_spec)
    model = ForceModel(energy_model, edges=step)
    graph = slab_graph()
    out = model(graph, training=False)
    assert step.calls == 1 and out.forces is not None
    plain = ForceModel(energy_model)  # no step: the graph's own edges
    expected = plain(provide_edges(graph, energy_model.graph_spec), training=False)
    torch.testing.assert_close(out.energy, expected.energy, rtol=0, atol=0)
    torch.testing.assert_close(out.forces, expected.forces, rtol=0, atol=0)
    energy_only = ForceModel(energy_model, regress_forces=False, edges=step)
    energy_only(graph, training=False)
    assert step.calls == 2


def test_force_model_without_a_graph_step_needs_edges() -> None:
    model = ForceModel(Morse(cutoff=4.0).double())
    with pytest.raises(ValueError, match=r"without edges.*edges=EdgeBuilder"):
        model(slab_graph())
    with pytest.raises(ValueError, match="Morse needs a graph with edges"):
        model.energy_model(slab_graph())
    assert (model.cutoff, model.max_neighbors) == (4.0, None)
    assert model.graph_spec == GraphSpec(4.0)


# --- who may search for neighbours -------------------------------------------------------------


def imported_names(path: Path) -> set[str]:
    """Every ``module`` and ``module.name`` that ``path`` imports, at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted(MODELS_DIR.glob("*.py")), ids=lambda path: path.name)
def test_models_never_import_the_neighbour_search_or_the_graph_step(path: Path) -> None:
    names = imported_names(path)
    forbidden = {
        "catforge.data.neighbors",
        "catforge.data.edges.EdgeBuilder",
        "catforge.data.edges.provide_edges",
    }
    assert not names & forbidden
    assert not any(name.startswith("catforge.data.neighbors.") for name in names)


def test_importing_models_and_the_spec_does_not_import_the_neighbour_search() -> None:
    code = (
        "import sys, catforge.models, catforge.data.edges; "
        "print('catforge.data.neighbors' in sys.modules, 'vesin' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split() == ["False", "False"]
