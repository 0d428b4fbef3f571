"""SchNet energy model and the autograd-forces wrapper: derivatives, invariances, batching."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, make_supercell, molecule

from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate
from catforge.data.graph import AtomicGraph
from catforge.data.neighbors import radius_graph_pbc
from catforge.errors import ConfigError
from catforge.models import EnergyModel, ForceModel, ModelOutput, SchNet, build_schnet
from catforge.models.layers import edge_vectors, symmetric_pairs

CUTOFF = 5.0
TINY = {
    "hidden_channels": 16,
    "num_filters": 16,
    "num_interactions": 2,
    "num_gaussians": 12,
    "cutoff": CUTOFF,
    "max_neighbors": 50,
}


def tiny_model(seed: int = 0, **options: object) -> ForceModel:
    """A float64 SchNet with small random weights (biases made non-zero too)."""
    torch.manual_seed(seed)
    model = build_schnet(**{**TINY, **options}).double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.uniform_(-0.5, 0.5)
    return model


def to_graph(atoms: Atoms, edges: bool = True) -> AtomicGraph:
    graph = atoms_to_graph(atoms, float_dtype=torch.float64)
    return radius_graph_pbc(graph, CUTOFF, 50) if edges else graph


def slab(seed: int = 0) -> Atoms:
    """Cu(111) 2x2x3 + O, rattled, periodic in-plane: atoms sit on and near the cell boundary."""
    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    add_adsorbate(atoms, "O", 1.5, "fcc")
    atoms.rattle(0.1, seed=seed)
    return atoms


def ethanol(seed: int = 0) -> Atoms:
    """A non-periodic molecule (zero cell), rattled so it has no symmetry."""
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return atoms


def crystal() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=3)
    return atoms


def random_rotation(seed: int) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return torch.from_numpy(q)


def predict(model: ForceModel, graph: AtomicGraph) -> ModelOutput:
    return model(graph, training=False)


# --- interface ---------------------------------------------------------------------------------


def test_build_schnet_takes_an_ocp_model_block() -> None:
    block = {"num_atoms": 0, "bond_feat_dim": 50, "num_targets": 1, "use_pbc": True}
    model = build_schnet(**block, **TINY, regress_forces=False, otf_graph=False)
    assert isinstance(model, ForceModel) and isinstance(model.energy_model, SchNet)
    assert isinstance(model.energy_model, EnergyModel)
    assert (model.cutoff, model.max_neighbors) == (CUTOFF, 50)
    out = model(to_graph(slab()).to("cpu", torch.float32))
    assert out.forces is None and out.energy.shape == (1,)
    defaults = SchNet()
    assert (defaults.hidden_channels, defaults.num_filters, defaults.num_interactions) == (
        128,
        128,
        6,
    )
    assert (defaults.num_gaussians, defaults.cutoff, defaults.readout) == (50, 10.0, "add")
    with pytest.raises(ConfigError, match=r"model\.readout must be one of add, sum, mean"):
        SchNet(readout="max")
    with pytest.raises(ConfigError, match=r"model\.cutoff must be a distance in A > 0"):
        build_schnet(cutoff=-1.0)  # built directly, not from a config


def test_force_model_state_dict_is_the_energy_models() -> None:
    model = tiny_model()
    keys = list(model.state_dict())
    assert keys == list(model.energy_model.state_dict())
    assert "embedding.weight" in keys and "interactions.0.conv.lin1.weight" in keys
    other = tiny_model(seed=1)
    other.load_state_dict(model.state_dict(), strict=True)
    graph = to_graph(slab())
    torch.testing.assert_close(predict(other, graph).energy, predict(model, graph).energy)
    wrapped = torch.nn.ModuleDict({"module": model})  # how DDP prefixes the keys
    assert "module.embedding.weight" in wrapped.state_dict()
    tiny_model(seed=2).load_state_dict(
        {k.removeprefix("module."): v for k, v in wrapped.state_dict().items()}
    )


# --- derivatives -------------------------------------------------------------------------------


def test_forces_match_central_finite_differences() -> None:
    model = tiny_model()
    graph = to_graph(slab())
    forces = predict(model, graph).forces
    frac = np.linalg.solve(graph.cell[0].numpy().T, graph.pos.numpy().T).T[:, :2]
    edge_atoms = np.flatnonzero((np.abs(frac - np.round(frac)) < 0.15).any(axis=1))
    atoms = [*edge_atoms[:3].tolist(), graph.n_atoms - 1]  # near the boundary, and the adsorbate
    assert len(atoms) >= 3
    step = 1e-5
    for atom in atoms:
        for axis in range(3):
            energies = []
            for sign in (1.0, -1.0):
                pos = graph.pos.clone()
                pos[atom, axis] += sign * step
                energies.append(predict(model, graph.replace(pos=pos)).energy.item())
            numeric = -(energies[0] - energies[1]) / (2 * step)
            assert forces[atom, axis].item() == pytest.approx(numeric, abs=1e-7, rel=1e-6)


def test_gradcheck_energy_forces_and_force_parameter_gradients() -> None:
    model = tiny_model()
    graph = to_graph(ethanol()[:4])

    def energy(pos: torch.Tensor) -> torch.Tensor:
        return model.energy_model(graph.replace(pos=pos))

    def forces(pos: torch.Tensor) -> torch.Tensor:
        out = model(graph.replace(pos=pos), training=True)
        return out.forces

    pos = graph.pos.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(energy, (pos,))
    assert torch.autograd.gradcheck(forces, (pos,))  # the Hessian, by double backward
    names = (
        "energy_model.interactions.0.mlp.0.bias",
        "energy_model.interactions.1.conv.lin1.weight",
    )
    params = {name: p.detach() for name, p in model.named_parameters()}

    def forces_of(*values: torch.Tensor) -> torch.Tensor:
        state = {**params, **dict(zip(names, values, strict=True))}
        out = torch.func.functional_call(model, state, (graph,), {"training": True})
        return out.forces

    values = tuple(params[name].clone().requires_grad_(True) for name in names)
    assert torch.autograd.gradcheck(forces_of, values)  # what a force loss backpropagates


def test_forces_sum_to_zero_for_an_isolated_molecule() -> None:
    out = predict(tiny_model(), to_graph(ethanol()))
    assert out.forces.abs().max() > 1e-3
    torch.testing.assert_close(out.forces.sum(0), torch.zeros(3, dtype=torch.float64))


# --- invariances -------------------------------------------------------------------------------


def test_rotation_invariance_of_a_molecule() -> None:
    model = tiny_model(otf_graph=True)
    graph = to_graph(ethanol(), edges=False)
    rotation = random_rotation(0)
    out = predict(model, graph)
    turned = predict(model, graph.replace(pos=graph.pos @ rotation.T))
    torch.testing.assert_close(turned.energy, out.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(turned.forces, out.forces @ rotation.T, rtol=0, atol=1e-10)


def test_rotation_invariance_of_a_periodic_cell_rotated_with_its_atoms() -> None:
    model = tiny_model()
    graph = to_graph(slab())
    rotation = random_rotation(1)
    rotated = graph.replace(pos=graph.pos @ rotation.T, cell=graph.cell @ rotation.T)
    out, turned = predict(model, graph), predict(model, rotated)
    torch.testing.assert_close(turned.energy, out.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(turned.forces, out.forces @ rotation.T, rtol=0, atol=1e-10)
    rebuilt = predict(
        model,
        radius_graph_pbc(
            rotated.replace(edge_index=None, cell_offsets=None, neighbors=None), CUTOFF, 50
        ),
    )
    torch.testing.assert_close(rebuilt.energy, out.energy, rtol=0, atol=1e-10)


def test_translation_invariance_including_wrapping_through_the_boundary() -> None:
    model = tiny_model()
    atoms = slab()
    out = predict(model, to_graph(atoms))
    shifted = to_graph(atoms).replace(pos=to_graph(atoms).pos + torch.tensor([0.3, -1.1, 0.7]))
    moved = predict(model, shifted)  # same edges, every vector unchanged
    torch.testing.assert_close(moved.energy, out.energy, rtol=0, atol=1e-10)
    atoms.translate(0.37 * atoms.cell[0] + 0.61 * atoms.cell[1])
    atoms.wrap()  # atoms cross the boundary; new graph from the wrapped positions
    wrapped = predict(model, to_graph(atoms))
    torch.testing.assert_close(wrapped.energy, out.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(wrapped.forces, out.forces, rtol=0, atol=1e-10)


def test_permutation_invariance_and_equivariance() -> None:
    model = tiny_model()
    atoms = slab()
    order = np.random.default_rng(0).permutation(len(atoms))
    out = predict(model, to_graph(atoms))
    permuted = predict(model, to_graph(atoms[order]))
    torch.testing.assert_close(permuted.energy, out.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(permuted.forces, out.forces[order], rtol=0, atol=1e-10)


def test_a_batch_equals_each_structure_alone() -> None:
    model = tiny_model()
    structures = [slab(0), ethanol(), crystal(), slab(1)]
    graphs = [to_graph(atoms) for atoms in structures]
    batched = predict(model, collate(graphs))
    alone = [predict(model, graph) for graph in graphs]
    torch.testing.assert_close(batched.energy, torch.cat([out.energy for out in alone]))
    torch.testing.assert_close(batched.forces, torch.cat([out.forces for out in alone]))


def test_supercell_has_four_times_the_energy_and_the_same_forces() -> None:
    model = tiny_model()
    atoms = crystal()
    big = make_supercell(atoms, np.diag([2, 2, 1]))
    small_out, big_out = predict(model, to_graph(atoms)), predict(model, to_graph(big))
    assert big_out.energy.item() == pytest.approx(4 * small_out.energy.item(), rel=1e-12)
    torch.testing.assert_close(big_out.forces, small_out.forces.repeat(4, 1), rtol=0, atol=1e-10)


# --- graph handling ----------------------------------------------------------------------------


def test_otf_graph_and_missing_edges_equal_precomputed_edges() -> None:
    graph = to_graph(slab())
    expected = predict(tiny_model(), graph).energy
    torch.testing.assert_close(predict(tiny_model(otf_graph=True), graph).energy, expected)
    bare = graph.replace(edge_index=None, cell_offsets=None, neighbors=None)
    torch.testing.assert_close(predict(tiny_model(), bare).energy, expected)


def test_use_pbc_false_ignores_periodic_images() -> None:
    atoms = ethanol()
    expected = predict(tiny_model(), to_graph(atoms)).energy
    atoms.set_cell([4.0, 4.0, 4.0])  # a box smaller than the cutoff: images would interact
    atoms.pbc = True
    boxed = to_graph(atoms)
    assert predict(tiny_model(), boxed).energy.item() != pytest.approx(expected.item())
    torch.testing.assert_close(predict(tiny_model(use_pbc=False), boxed).energy, expected)


def test_zero_length_edges_are_ignored_like_ocp() -> None:
    model = tiny_model()
    graph = to_graph(slab())
    loops = torch.arange(3)
    looped = graph.replace(
        edge_index=torch.cat([graph.edge_index, loops.expand(2, 3)], dim=1),
        cell_offsets=torch.cat([graph.cell_offsets, torch.zeros(3, 3, dtype=torch.long)]),
        neighbors=graph.neighbors + 3,
    )
    out, with_loops = predict(model, graph), predict(model, looped)
    assert torch.isfinite(with_loops.forces).all()
    torch.testing.assert_close(with_loops.energy, out.energy)
    torch.testing.assert_close(with_loops.forces, out.forces)


def drop_edges(graph: AtomicGraph, keep: torch.Tensor) -> AtomicGraph:
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
    representative, n_both = symmetric_pairs(graph.edge_index, graph.cell_offsets)
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
            torch.testing.assert_close(a.energy, b.energy, rtol=0, atol=1e-12)
            torch.testing.assert_close(a.forces, b.forces, rtol=0, atol=1e-12)


def test_a_lone_atom_has_zero_forces() -> None:
    out = predict(tiny_model(), to_graph(Atoms("Cu", positions=[[0.0, 0.0, 0.0]])))
    assert out.energy.shape == (1,) and torch.equal(out.forces, torch.zeros(1, 3, dtype=float))


# --- autograd modes ----------------------------------------------------------------------------


def test_forces_inside_no_grad_and_create_graph_only_when_training() -> None:
    model = tiny_model()
    graph = to_graph(slab())
    model.eval()
    with torch.no_grad():
        out = model(graph)
    assert out.forces is not None and out.forces.abs().max() > 0
    assert not out.energy.requires_grad and not out.forces.requires_grad
    assert not graph.pos.requires_grad and graph.pos.grad is None
    model.train()
    out = model(graph)
    assert out.forces.requires_grad and out.forces.grad_fn is not None
    with torch.no_grad():
        explicit = model(graph, training=True)
    assert explicit.forces.grad_fn is not None and explicit.energy.requires_grad
    evaluated = model(graph, training=False)
    assert evaluated.forces.grad_fn is None and not evaluated.energy.requires_grad
    torch.testing.assert_close(evaluated.forces, explicit.forces.detach())
    (explicit.energy.sum() + explicit.forces.square().sum()).backward()
    assert all(
        p.grad is not None
        for p in model.parameters()
        if p is not model.energy_model.embedding.weight
    )


def test_energy_only_model_follows_the_training_flag() -> None:
    model = tiny_model(regress_forces=False)
    graph = to_graph(slab())
    assert model(graph, training=True).energy.requires_grad
    assert not model(graph, training=False).energy.requires_grad
    with torch.no_grad():
        assert model(graph, training=True).energy.requires_grad


# --- cross-implementation: PyG's SchNet with the same weights ----------------------------------


def pyg_energy(reference: torch.nn.Module, graph: AtomicGraph) -> torch.Tensor:
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
    model = build_schnet(**TINY, num_atoms=None, bond_feat_dim=50, num_targets=1).to(dtype)
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    graphs = [to_graph(atoms) for atoms in (ethanol(), slab(), crystal())]
    batch = collate(graphs).to("cpu", dtype)
    assert batch.cell_offsets.abs().sum() > 0  # periodic images take part
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    model = tiny_model().to(dtype)
    batch = collate([to_graph(atoms, edges=False) for atoms in (slab(0), ethanol(), crystal())])
    on_cpu = predict(model, batch.to("cpu", dtype))
    on_gpu = predict(model.to("cuda"), batch.to("cuda", dtype))
    tolerance = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {}
    torch.testing.assert_close(on_gpu.energy.cpu(), on_cpu.energy, **tolerance)
    torch.testing.assert_close(on_gpu.forces.cpu(), on_cpu.forces, **tolerance)
