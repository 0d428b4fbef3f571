"""SchNet itself: the OCP model block, PyG parameter names and initialisation, PyG's numbers with
the same weights, and the exact sharing of filters between reverse edges. The suite every model
passes is ``test_models.py``."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule

from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate
from catforge.data.edges import EdgeBuilder
from catforge.data.graph import AtomicGraph
from catforge.data.graph_spec import GraphSpec
from catforge.data.neighbors import radius_graph_pbc
from catforge.errors import ConfigError
from catforge.models import EnergyModel, ForceModel, ModelOutput, SchNet
from catforge.models.layers import edge_vectors, symmetric_pairs

CUTOFF = 5.0
TINY: dict[str, Any] = {
    "hidden_channels": 16,
    "num_filters": 16,
    "num_interactions": 2,
    "num_gaussians": 12,
    "cutoff": CUTOFF,
    "max_neighbors": 50,
}


def wrap(energy_model: SchNet, regress_forces: bool = True) -> ForceModel:
    """SchNet + its graph step + forces, as :func:`catforge.assemble.models.build_model`."""
    return ForceModel(energy_model, regress_forces, edges=EdgeBuilder(energy_model.graph_spec))


def tiny_model(seed: int = 0, **options: object) -> ForceModel:
    """A float64 SchNet with small random weights (biases made non-zero too)."""
    torch.manual_seed(seed)
    model = wrap(SchNet(**{**TINY, **options})).double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.uniform_(-0.5, 0.5)
    return model


def to_graph(atoms: Atoms) -> AtomicGraph:
    return radius_graph_pbc(atoms_to_graph(atoms, float_dtype=torch.float64), CUTOFF, 50)


def slab(seed: int = 0) -> Atoms:
    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    add_adsorbate(atoms, "O", 1.5, "fcc")
    atoms.rattle(0.1, seed=seed)
    return atoms


def ethanol() -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=0)
    return atoms


def crystal() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=3)
    return atoms


def predict(model: ForceModel, graph: AtomicGraph) -> ModelOutput:
    return model(graph, training=False)


# --- the OCP model block -----------------------------------------------------------------------


def test_schnet_takes_an_ocp_model_block() -> None:
    block = {"num_atoms": 0, "bond_feat_dim": 50, "num_targets": 1, "use_pbc": True}
    energy_model = SchNet(**block, **TINY, otf_graph=False)
    assert isinstance(energy_model, SchNet) and isinstance(energy_model, EnergyModel)
    assert energy_model.graph_spec == GraphSpec(CUTOFF, 50, use_pbc=True, otf_graph=False)
    model = wrap(energy_model, regress_forces=False)
    assert (model.cutoff, model.max_neighbors) == (CUTOFF, 50)
    out = model(to_graph(slab()).to("cpu", torch.float32))
    assert out.forces is None and out.energy.shape == (1,)


def test_defaults_are_ocp_s() -> None:
    defaults = SchNet()
    sizes = (defaults.hidden_channels, defaults.num_filters, defaults.num_interactions)
    assert sizes == (128, 128, 6)
    assert (defaults.num_gaussians, defaults.cutoff, defaults.readout) == (50, 10.0, "add")
    assert defaults.graph_spec == GraphSpec(10.0, 50, use_pbc=True, otf_graph=False)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"readout": "max"}, r"model\.readout must be one of add, sum, mean, got 'max'"),
        ({"cutoff": -1.0}, r"model\.cutoff must be a distance in A > 0"),
        ({"cutoff": math.inf}, r"model\.cutoff must be a distance in A > 0"),
        ({"hidden_channels": 1}, r"model\.hidden_channels must be >= 2, got 1"),
        ({"num_gaussians": 1}, r"model\.num_gaussians must be >= 2, got 1"),
        ({"max_neighbors": 0}, r"model\.max_neighbors must be >= 1 \(or null for no cap\)"),
    ],
)
def test_values_schnet_cannot_use_are_config_errors(block: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SchNet(**block)  # type: ignore[arg-type]


def test_mean_readout_divides_by_the_atom_count() -> None:
    graph = collate([to_graph(slab()), to_graph(crystal())])
    added = predict(tiny_model(), graph).energy
    mean = predict(tiny_model(readout="mean"), graph).energy
    torch.testing.assert_close(mean, added / graph.natoms.double(), rtol=1e-12, atol=0)


# --- PyG parameter names, initialisation and numbers -------------------------------------------


def test_state_dict_has_pyg_s_names() -> None:
    model = tiny_model()
    keys = list(model.state_dict())
    assert keys[:2] == ["embedding.weight", "distance_expansion.offset"]
    assert "interactions.0.conv.lin1.weight" in keys and "interactions.1.mlp.2.bias" in keys
    assert "interactions.0.conv.nn.0.weight" in keys  # PyG's alias of the block's filter network
    wrapped = torch.nn.ModuleDict({"module": model})  # how DDP prefixes the keys
    assert "module.embedding.weight" in wrapped.state_dict()
    tiny_model(seed=2).load_state_dict(
        {k.removeprefix("module."): v for k, v in wrapped.state_dict().items()}
    )


def pyg_energy(reference: Any, graph: AtomicGraph) -> torch.Tensor:
    """PyG SchNet's forward driven with catforge's edges and (PBC) distances."""
    _, distance = edge_vectors(graph)
    h = reference.embedding(graph.atomic_numbers)
    edge_attr = reference.distance_expansion(distance)
    for interaction in reference.interactions:
        h = h + interaction(h, graph.edge_index, distance, edge_attr)
    h = reference.lin2(reference.act(reference.lin1(h))).squeeze(-1)
    return torch.zeros(graph.n_graphs, dtype=h.dtype).index_add_(0, graph.batch, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_energies_and_forces_as_pyg_schnet_with_its_state_dict(dtype: torch.dtype) -> None:
    pyg = pytest.importorskip("torch_geometric.nn.models")
    torch.manual_seed(0)
    sizes = {key: value for key, value in TINY.items() if key != "max_neighbors"}
    reference = pyg.SchNet(**sizes).to(dtype)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith("bias"):
                parameter.uniform_(-0.5, 0.5)
    model = wrap(SchNet(**TINY, num_atoms=None, bond_feat_dim=50, num_targets=1)).to(dtype)
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    graphs = [to_graph(atoms) for atoms in (ethanol(), slab(), crystal())]
    batch = collate(graphs).to("cpu", dtype)
    assert batch.cell_offsets is not None and batch.cell_offsets.abs().sum() > 0  # images count
    pos = batch.pos.clone().requires_grad_(True)
    expected = pyg_energy(reference, batch.replace(pos=pos))
    (gradient,) = torch.autograd.grad(expected.sum(), pos)
    out = predict(model, batch)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.energy, expected.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(out.forces, -gradient, rtol=tolerance, atol=tolerance)


def test_initialisation_is_pyg_s() -> None:
    pyg = pytest.importorskip("torch_geometric.nn.models")
    torch.manual_seed(0)
    model = SchNet(**TINY)
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    assert biases and all(bool((p == 0).all()) for p in biases)
    assert bool((model.embedding.weight[0] == 0).all()) and model.embedding.padding_idx == 0
    weight = model.interactions[0].mlp[0].weight
    bound = math.sqrt(6.0 / sum(weight.shape))  # Xavier uniform
    assert weight.abs().max() <= bound and weight.abs().max() > 0.5 * bound
    torch.manual_seed(0)  # the same random draws in the same order: identical weights
    reference = pyg.SchNet(**{key: value for key, value in TINY.items() if key != "max_neighbors"})
    theirs = reference.state_dict()
    assert all(torch.equal(value, theirs[name]) for name, value in model.state_dict().items())


# --- filters shared between reverse edges ------------------------------------------------------


def drop_edges(graph: AtomicGraph, keep: torch.Tensor) -> AtomicGraph:
    assert graph.edge_index is not None and graph.cell_offsets is not None
    return graph.replace(
        edge_index=graph.edge_index[:, keep],
        cell_offsets=graph.cell_offsets[keep],
        neighbors=torch.tensor([int(graph.edge_index[:, keep].shape[1])]),
    )


def edge_set(edge_index: torch.Tensor, offsets: torch.Tensor) -> set[tuple[int, ...]]:
    """Edges as (neighbour, centre, offset...) tuples."""
    return {tuple(row) for row in torch.cat([edge_index.T, offsets], dim=1).tolist()}


@pytest.mark.parametrize("make", [slab, crystal])  # the crystal has self-image edges
def test_reverse_edges_pair_up(make: Callable[[], Atoms]) -> None:
    graph = to_graph(make())
    assert graph.edge_index is not None and graph.cell_offsets is not None
    pairs = symmetric_pairs(graph.edge_index, graph.cell_offsets)
    assert pairs is not None
    representative, n_both = pairs
    assert n_both == len(representative) == graph.n_edges // 2
    forward = graph.edge_index[:, representative]
    offsets = graph.cell_offsets[representative]
    reverse = edge_set(forward.flip(0), -offsets)
    assert not reverse & edge_set(forward, offsets)
    assert reverse | edge_set(forward, offsets) == edge_set(graph.edge_index, graph.cell_offsets)
    keep = torch.ones(graph.n_edges, dtype=torch.bool)
    keep[representative[:3]] = False  # one edge of three pairs
    fewer = symmetric_pairs(graph.edge_index[:, keep], graph.cell_offsets[keep])
    assert fewer is not None and fewer[1] == n_both - 3
    repeated = torch.cat([torch.arange(graph.n_edges), torch.tensor([0])])
    assert symmetric_pairs(graph.edge_index[:, repeated], graph.cell_offsets[repeated]) is None


def test_sharing_filters_between_reverse_edges_is_exact() -> None:
    graph = to_graph(slab())
    keep = torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(0)) > 0.1
    duplicated = torch.cat([torch.arange(graph.n_edges), torch.tensor([0, 1])])
    shared, plain = tiny_model(), tiny_model(share_pair_filters=False)
    variants = (graph, drop_edges(graph, keep), drop_edges(graph, duplicated), to_graph(crystal()))
    for variant in variants:
        for training in (False, True):
            a, b = shared(variant, training=training), plain(variant, training=training)
            assert a.forces is not None and b.forces is not None
            torch.testing.assert_close(a.energy, b.energy, rtol=0, atol=1e-12)
            torch.testing.assert_close(a.forces, b.forces, rtol=0, atol=1e-12)


# --- OCP's own numbers -------------------------------------------------------------------------


def reference_batch(inputs: list[dict[str, Any]], dtype: torch.dtype) -> AtomicGraph:
    """OCP's stored structures with their stored edges (no neighbour search here)."""
    fields = ("atomic_numbers", "pos", "cell", "pbc", "edge_index", "cell_offsets")
    graphs = [
        AtomicGraph.from_fields({key: item[key] for key in fields}, "ocp", float_dtype=dtype)
        for item in inputs
    ]
    return collate(graphs)


@pytest.mark.parametrize(
    ("dtype", "suffix", "energy_rtol", "forces_atol"),
    [(torch.float64, "", 1e-7, 1e-6), (torch.float32, "_float32", 1e-5, 1e-4)],
)
def test_reproduces_ocp_schnet_energies_and_forces(
    shared_data: Path, dtype: torch.dtype, suffix: str, energy_rtol: float, forces_atol: float
) -> None:
    """OCP's SchNetWrap on 4 OC20 structures (``ocp_reference/schnet.pt``, its README). In float64
    energies agree to 4e-8 relative (4.3e-6 eV of -113 eV) and forces to 7e-8 eV/A."""
    reference = torch.load(shared_data / "ocp_reference" / "schnet.pt", weights_only=False)
    block = {key: value for key, value in reference["model"].items() if key != "name"}
    block.pop("regress_forces", None)
    model = wrap(SchNet(**block)).to(dtype)
    model.load_state_dict(reference["state_dict"], strict=True)
    batch = reference_batch(reference["inputs"], dtype)
    assert model.edges is not None and model.edges(batch) is batch  # OCP's stored edges are used
    out = predict(model, batch)
    energy = torch.as_tensor(reference["energy" + suffix]).to(dtype)
    forces = torch.as_tensor(reference["forces" + suffix]).to(dtype)
    torch.testing.assert_close(out.energy, energy, rtol=energy_rtol, atol=0)
    torch.testing.assert_close(out.forces, forces, rtol=0, atol=forces_atol)
