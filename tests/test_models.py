"""The suite every registered model passes: derivatives, invariances, batching, dtypes, state
dicts and graphs, run on each name of :data:`catforge.registry.MODELS` with a tiny config.

A model is composed as :func:`catforge.assemble.models.build_model` composes it: the energy model,
its graph step ``EdgeBuilder(energy_model.graph_spec)`` and the forces wrapper. Model-specific
tests live in ``test_schnet.py`` and ``test_pairwise.py``.
"""

from __future__ import annotations

import copy
import inspect
import io
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, make_supercell, molecule
from torch import nn

from catforge.assemble.models import build_model
from catforge.config import Config, parse_config
from catforge.config.parameters import model_parameters
from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate
from catforge.data.edges import EdgeBuilder, provide_edges
from catforge.data.graph import AtomicGraph
from catforge.data.graph_spec import GraphSpec
from catforge.data.lmdb import LmdbDataset, write_lmdb
from catforge.data.neighbors import with_edges
from catforge.errors import ConfigError
from catforge.models import EnergyModel, ForceModel, ModelOutput
from catforge.registry import MODELS
from tests.factories import emt_slab, structures

TINY: dict[str, dict[str, object]] = {
    "schnet": {
        "hidden_channels": 16,
        "num_filters": 16,
        "num_interactions": 2,
        "num_gaussians": 12,
        "cutoff": 5.0,
        "max_neighbors": 50,
    },
    "morse": {"cutoff": 5.0, "switch_width": 1.5},
}
"""A small, fast ``model:`` block (without ``name``) of every registered model."""

SIMPLE_TYPES = {int, float, bool, str, type(None)}


@dataclass(frozen=True)
class ModelCase:
    """One registered model under test: its name and class."""

    name: str
    cls: type[nn.Module]

    def energy_model(self, **options: object) -> Any:
        """The energy model of the tiny block with ``options``, as the registry builds it."""
        return self.cls(**{**TINY[self.name], **options})

    def build(self, seed: int = 0, *, regress_forces: bool = True, **options: object) -> ForceModel:
        """A float64 model with seeded weights, every parameter moved off its initial value."""
        torch.manual_seed(seed)
        energy_model = self.energy_model(**options).double()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in energy_model.parameters():
                noise = torch.rand(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(0.4 * noise - 0.2)
        return compose(energy_model, regress_forces)


def compose(energy_model: Any, regress_forces: bool = True) -> ForceModel:
    """Energy model + its graph step + forces, as :func:`catforge.assemble.models.build_model`."""
    assert isinstance(energy_model, EnergyModel)
    edges = EdgeBuilder(energy_model.graph_spec)
    return ForceModel(energy_model, regress_forces, edges=edges)


@pytest.fixture(params=sorted(MODELS), scope="module")
def case(request: pytest.FixtureRequest) -> ModelCase:
    name = request.param
    return ModelCase(name, MODELS.load(name))


def to_graph(atoms: Atoms) -> AtomicGraph:
    """A float64 graph without edges (the model's graph step builds them)."""
    return atoms_to_graph(atoms, float_dtype=torch.float64, with_labels=False)


def slab(seed: int = 0) -> Atoms:
    """Cu(111) 2x2x3 + O, rattled, periodic: atoms sit on and near the cell boundary."""
    return emt_slab("Cu", "O", seed=seed, labelled=False)


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


def forces_of(output: ModelOutput) -> torch.Tensor:
    assert output.forces is not None
    return output.forces


def assert_same(a: ModelOutput, b: ModelOutput, atol: float = 1e-10) -> None:
    torch.testing.assert_close(a.energy, b.energy, rtol=0, atol=atol)
    torch.testing.assert_close(forces_of(a), forces_of(b), rtol=0, atol=atol)


# --- interface ---------------------------------------------------------------------------------


def test_every_registered_model_has_a_tiny_config() -> None:
    assert set(TINY) == set(MODELS)


def test_init_takes_simple_keywords_with_defaults_as_the_config_reads_them(
    case: ModelCase,
) -> None:
    signature = inspect.signature(case.cls.__init__)
    hints = typing.get_type_hints(case.cls.__init__)
    parameters = [p for p in signature.parameters.values() if p.name != "self"]
    for parameter in parameters:
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, parameter.name
        assert parameter.default is not inspect.Parameter.empty, parameter.name
        allowed = set(typing.get_args(hints[parameter.name])) or {hints[parameter.name]}
        assert allowed <= SIMPLE_TYPES, (parameter.name, hints[parameter.name])
    read = model_parameters(case.name)
    assert {name: p.default for name, p in read.items()} == {p.name: p.default for p in parameters}


def test_graph_spec_follows_the_block(case: ModelCase) -> None:
    energy_model = case.energy_model(cutoff=4.0, max_neighbors=7, use_pbc=False, otf_graph=True)
    assert energy_model.graph_spec == GraphSpec(4.0, 7, use_pbc=False, otf_graph=True)
    model = compose(energy_model)
    assert (model.cutoff, model.max_neighbors) == (4.0, 7)
    assert model.graph_spec == energy_model.graph_spec


def test_build_model_composes_the_energy_model_its_graph_step_and_forces(
    case: ModelCase,
) -> None:
    def config(trainer: str, **block: object) -> Config:
        model = {"name": case.name, **TINY[case.name], **block}
        raw = {"trainer": trainer, "dataset": [{"src": "data/train"}], "model": model}
        return parse_config({**raw, "optim": {"max_epochs": 1}}, "test.yml")

    model = build_model(config("forces"))
    assert isinstance(model.energy_model, case.cls) and model.regress_forces
    assert isinstance(model.edges, EdgeBuilder)
    assert model.edges.spec == model.energy_model.graph_spec
    assert not build_model(config("energy")).regress_forces
    graph = to_graph(slab()).to("cpu", torch.float32)
    out = predict(model, graph)
    assert out.energy.shape == (1,) and forces_of(out).shape == (graph.n_atoms, 3)
    with pytest.raises(ConfigError, match=r"model\.cutoff must be a distance in A > 0"):
        build_model(config("forces", cutoff=-1.0))


# --- derivatives -------------------------------------------------------------------------------


def test_forces_match_central_finite_differences(case: ModelCase) -> None:
    model = case.build()
    graph = provide_edges(to_graph(slab()), model.graph_spec)  # fixed edges: E is smooth in pos
    forces = forces_of(predict(model, graph))
    frac = np.linalg.solve(graph.cell[0].numpy().T, graph.pos.numpy().T).T[:, :2]
    boundary = np.flatnonzero((np.abs(frac - np.round(frac)) < 0.15).any(axis=1))
    atoms = [*boundary[:3].tolist(), graph.n_atoms - 1]  # near the boundary, and the adsorbate
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


def force_parameters(model: ForceModel, graph: AtomicGraph, count: int = 2) -> list[str]:
    """The ``count`` smallest parameters that the forces depend on."""
    model.zero_grad()
    forces_of(model(graph, training=True)).square().sum().backward()
    moving = [
        (parameter.numel(), name)
        for name, parameter in model.named_parameters()
        if parameter.grad is not None and bool(parameter.grad.abs().max() > 0)
    ]
    model.zero_grad()
    return [name for _, name in sorted(moving)[:count]]


def test_gradcheck_energy_forces_and_force_parameter_gradients(case: ModelCase) -> None:
    model = case.build()
    graph = provide_edges(to_graph(ethanol()[:4]), model.graph_spec)

    def energy(pos: torch.Tensor) -> torch.Tensor:
        return model.energy_model(graph.replace(pos=pos))

    def forces(pos: torch.Tensor) -> torch.Tensor:
        return forces_of(model(graph.replace(pos=pos), training=True))

    pos = graph.pos.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(energy, (pos,))
    assert torch.autograd.gradcheck(forces, (pos,))  # the Hessian, by double backward
    names = force_parameters(model, graph)
    assert len(names) == 2
    params = {name: p.detach() for name, p in model.named_parameters()}

    def forces_given(*values: torch.Tensor) -> torch.Tensor:
        state = {**params, **dict(zip(names, values, strict=True))}
        out = torch.func.functional_call(model, state, (graph,), {"training": True})
        return forces_of(out)

    values = tuple(params[name].clone().requires_grad_(True) for name in names)
    assert torch.autograd.gradcheck(forces_given, values)  # what a force loss backpropagates


def test_forces_sum_to_zero_for_an_isolated_molecule(case: ModelCase) -> None:
    forces = forces_of(predict(case.build(), to_graph(ethanol())))
    assert forces.abs().max() > 1e-3
    torch.testing.assert_close(forces.sum(0), torch.zeros(3, dtype=torch.float64))


def test_a_lone_atom_has_zero_forces(case: ModelCase) -> None:
    out = predict(case.build(), to_graph(Atoms("Cu", positions=[[0.0, 0.0, 0.0]])))
    assert out.energy.shape == (1,) and torch.isfinite(out.energy).all()
    assert torch.equal(forces_of(out), torch.zeros(1, 3, dtype=torch.float64))


# --- invariances -------------------------------------------------------------------------------


def test_rotation_invariance_of_a_molecule(case: ModelCase) -> None:
    model = case.build()
    graph = to_graph(ethanol())
    rotation = random_rotation(0)
    out = predict(model, graph)
    turned = predict(model, graph.replace(pos=graph.pos @ rotation.T))
    torch.testing.assert_close(turned.energy, out.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(forces_of(turned), forces_of(out) @ rotation.T, rtol=0, atol=1e-10)


def test_rotation_invariance_of_a_periodic_cell_rotated_with_its_atoms(case: ModelCase) -> None:
    model = case.build()
    graph = provide_edges(to_graph(slab()), model.graph_spec)
    rotation = random_rotation(1)
    rotated = graph.replace(pos=graph.pos @ rotation.T, cell=graph.cell @ rotation.T)
    out, turned = predict(model, graph), predict(model, rotated)  # the same stored edges
    torch.testing.assert_close(turned.energy, out.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(forces_of(turned), forces_of(out) @ rotation.T, rtol=0, atol=1e-10)
    rebuilt = predict(model, rotated.replace(edge_index=None, cell_offsets=None, neighbors=None))
    torch.testing.assert_close(rebuilt.energy, out.energy, rtol=0, atol=1e-10)


def test_translation_invariance_including_wrapping_through_the_boundary(case: ModelCase) -> None:
    model = case.build()
    atoms = slab()
    out = predict(model, to_graph(atoms))
    graph = provide_edges(to_graph(atoms), model.graph_spec)
    moved = predict(model, graph.replace(pos=graph.pos + torch.tensor([0.3, -1.1, 0.7])))
    assert_same(moved, out)  # the same edges, every vector unchanged
    atoms.translate(0.37 * atoms.cell[0] + 0.61 * atoms.cell[1])
    atoms.wrap()  # atoms cross the boundary; new graph from the wrapped positions
    assert_same(predict(model, to_graph(atoms)), out)


def test_periodic_image_invariance(case: ModelCase) -> None:
    """Moving atoms by whole lattice vectors (any atom, any periodic axis) changes nothing."""
    model = case.build()
    for atoms in (slab(), crystal()):
        graph = to_graph(atoms)
        shifts = torch.from_numpy(np.random.default_rng(0).integers(-2, 3, size=(len(atoms), 3)))
        moved = graph.replace(pos=graph.pos + shifts.double() @ graph.cell[0])
        assert moved.pos.sub(graph.pos).abs().max() > 5.0
        assert_same(predict(model, moved), predict(model, graph))


def test_permutation_invariance_and_equivariance(case: ModelCase) -> None:
    model = case.build()
    atoms = slab()
    order = np.random.default_rng(0).permutation(len(atoms))
    out = predict(model, to_graph(atoms))
    permuted = predict(model, to_graph(atoms[order]))
    torch.testing.assert_close(permuted.energy, out.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(forces_of(permuted), forces_of(out)[order], rtol=0, atol=1e-10)


# --- batching and size -------------------------------------------------------------------------


def test_a_batch_equals_each_structure_alone(case: ModelCase) -> None:
    model = case.build()
    graphs = [to_graph(atoms) for atoms in [*structures(), ethanol()]]
    batched = predict(model, collate(graphs))
    alone = [predict(model, graph) for graph in graphs]
    torch.testing.assert_close(batched.energy, torch.cat([out.energy for out in alone]))
    torch.testing.assert_close(forces_of(batched), torch.cat([forces_of(out) for out in alone]))


def test_a_supercell_has_twice_the_energy_and_the_same_forces(case: ModelCase) -> None:
    model = case.build()
    assert getattr(model.energy_model, "readout", "add") in ("add", "sum")
    atoms = crystal()
    big = make_supercell(atoms, np.diag([2, 1, 1]))
    small_out, big_out = predict(model, to_graph(atoms)), predict(model, to_graph(big))
    assert big_out.energy.item() == pytest.approx(2 * small_out.energy.item(), rel=1e-12)
    torch.testing.assert_close(
        forces_of(big_out), forces_of(small_out).repeat(2, 1), rtol=0, atol=1e-10
    )


# --- dtypes and state dicts --------------------------------------------------------------------


def test_float32_agrees_with_float64(case: ModelCase) -> None:
    double = case.build()
    single = copy.deepcopy(double).float()
    assert all(p.dtype == torch.float32 for p in single.parameters())
    graph = provide_edges(collate([to_graph(slab()), to_graph(ethanol())]), double.graph_spec)
    expected = predict(double, graph)
    out = predict(single, graph.to("cpu", torch.float32))
    assert out.energy.dtype == torch.float32 and forces_of(out).dtype == torch.float32
    for got, want in ((out.energy, expected.energy), (forces_of(out), forces_of(expected))):
        scale = float(want.abs().max())  # float32 rounding of the largest terms
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * scale)


def test_state_dict_round_trip_with_strict_loading(case: ModelCase) -> None:
    model, other = case.build(seed=0), case.build(seed=1)
    graph = to_graph(slab())
    assert not torch.equal(predict(other, graph).energy, predict(model, graph).energy)
    keys = list(model.state_dict())
    assert keys == list(model.energy_model.state_dict())  # the wrapper adds no prefix
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert_same(predict(other, graph), predict(model, graph), atol=0)
    fresh = compose(case.energy_model().double())
    fresh.energy_model.load_state_dict(model.state_dict(), strict=True)
    assert_same(predict(fresh, graph), predict(model, graph), atol=0)
    incomplete = dict(model.state_dict())
    incomplete.pop(keys[0])
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict(incomplete, strict=True)


# --- graphs ------------------------------------------------------------------------------------


def test_stored_edges_from_an_lmdb_equal_edges_built_on_the_fly(
    case: ModelCase, tmp_path: Path
) -> None:
    model = case.build()
    spec = model.graph_spec
    graphs = [to_graph(atoms) for atoms in (slab(), crystal(), ethanol())]
    stored = [with_edges(graph, spec.cutoff, spec.max_neighbors) for graph in graphs]
    write_lmdb(stored, tmp_path / "edges.lmdb")
    dataset = LmdbDataset(tmp_path / "edges.lmdb", float_dtype=torch.float64)
    batch = collate([dataset[index] for index in range(len(dataset))])
    assert batch.has_edges and model.edges is not None and model.edges(batch) is batch
    from_lmdb = predict(model, batch)
    on_the_fly = case.build(otf_graph=True)
    assert on_the_fly.edges is not None and on_the_fly.edges(batch) is not batch
    assert_same(predict(on_the_fly, batch), from_lmdb)
    bare = batch.replace(edge_index=None, cell_offsets=None, neighbors=None)
    assert_same(predict(model, bare), from_lmdb)
    without_step = ForceModel(model.energy_model)
    assert_same(predict(without_step, batch), from_lmdb, atol=0)
    with pytest.raises(ValueError, match="without edges"):
        without_step(bare)


def test_use_pbc_false_ignores_periodic_images(case: ModelCase) -> None:
    atoms = ethanol()
    expected = predict(case.build(), to_graph(atoms)).energy
    atoms.set_cell([4.0, 4.0, 4.0])  # a box smaller than the cutoff: images would interact
    atoms.pbc = True
    boxed = to_graph(atoms)
    assert predict(case.build(), boxed).energy.item() != pytest.approx(expected.item())
    torch.testing.assert_close(predict(case.build(use_pbc=False), boxed).energy, expected)


def test_zero_length_edges_are_ignored(case: ModelCase) -> None:
    model = case.build()
    graph = provide_edges(to_graph(slab()), model.graph_spec)
    assert graph.edge_index is not None and graph.cell_offsets is not None
    assert graph.neighbors is not None
    loops = torch.arange(3)
    looped = graph.replace(
        edge_index=torch.cat([graph.edge_index, loops.expand(2, 3)], dim=1),
        cell_offsets=torch.cat([graph.cell_offsets, torch.zeros(3, 3, dtype=torch.long)]),
        neighbors=graph.neighbors + 3,
    )
    out, with_loops = predict(model, graph), predict(model, looped)
    assert torch.isfinite(forces_of(with_loops)).all()
    assert_same(with_loops, out, atol=1e-12)


# --- autograd modes ----------------------------------------------------------------------------


def test_forces_inside_no_grad_and_create_graph_only_when_training(case: ModelCase) -> None:
    model = case.build()
    graph = to_graph(slab())
    model.eval()
    with torch.no_grad():
        out = model(graph)
    assert forces_of(out).abs().max() > 0
    assert not out.energy.requires_grad and not forces_of(out).requires_grad
    assert not graph.pos.requires_grad and graph.pos.grad is None
    model.train()
    assert forces_of(model(graph)).grad_fn is not None
    with torch.no_grad():
        explicit = model(graph, training=True)
    assert forces_of(explicit).grad_fn is not None and explicit.energy.requires_grad
    evaluated = model(graph, training=False)
    assert forces_of(evaluated).grad_fn is None and not evaluated.energy.requires_grad
    torch.testing.assert_close(forces_of(evaluated), forces_of(explicit).detach())
    (explicit.energy.sum() + forces_of(explicit).square().sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_energy_only_model_follows_the_training_flag(case: ModelCase) -> None:
    model = case.build(regress_forces=False)
    graph = to_graph(slab())
    assert model(graph, training=True).energy.requires_grad
    assert model(graph, training=False).forces is None
    assert not model(graph, training=False).energy.requires_grad
    with torch.no_grad():
        assert model(graph, training=True).energy.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(case: ModelCase, dtype: torch.dtype) -> None:
    model = case.build().to(dtype)
    batch = collate([to_graph(atoms) for atoms in (slab(0), ethanol(), crystal())])
    on_cpu = predict(model, batch.to("cpu", dtype))
    on_gpu = predict(model.to("cuda"), batch.to("cuda", dtype))
    tolerance = 1e-9 if dtype == torch.float64 else None  # None: torch's float32 defaults
    torch.testing.assert_close(on_gpu.energy.cpu(), on_cpu.energy, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(
        forces_of(on_gpu).cpu(), forces_of(on_cpu), rtol=tolerance, atol=tolerance
    )
