"""Normalizer, element references, label statistics and the shared target transform."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb import LmdbDataset, write_lmdb
from catforge.errors import ConfigError, DataError
from catforge.potential.label_stats import fit_statistics
from catforge.potential.targets import N_ELEMENTS, ElementReferences, Normalizer, TargetTransform
from tests.factories import emt_slab

SLABS = [
    ("Cu", "O", "111", (2, 2, 3)),
    ("Pt", "CO", "100", (2, 2, 3)),
    ("Ag", "H", "111", (3, 2, 2)),
    ("Ni", "N", "100", (2, 2, 2)),
    ("Cu", "CO", "100", (3, 2, 2)),
    ("Pt", "O", "111", (2, 2, 2)),
    ("Au", "H", "100", (2, 2, 3)),
    ("Ag", "N", "111", (2, 2, 2)),
    ("Ni", "O", "111", (3, 2, 2)),
    ("Pd", "CO", "111", (2, 2, 2)),
    ("Pd", "H", "100", (3, 2, 2)),
    ("Au", "O", "111", (2, 2, 2)),
]


@pytest.fixture(scope="module")
def emt_graphs() -> list[AtomicGraph]:
    return [
        atoms_to_graph(emt_slab(metal, ads, facet=facet, size=size, seed=i), sid=i)
        for i, (metal, ads, facet, size) in enumerate(SLABS)
    ]


@pytest.fixture(scope="module")
def emt_lmdb(emt_graphs: list[AtomicGraph], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stats") / "train.lmdb"
    write_lmdb(emt_graphs, path)
    return path


def _numpy_arrays(graphs: list[AtomicGraph]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.stack([np.bincount(g.atomic_numbers.numpy(), minlength=119) for g in graphs])
    energies = np.array([float(g.y) for g in graphs], dtype=np.float64)  # type: ignore[arg-type]
    forces = np.concatenate([g.force.numpy() for g in graphs])  # type: ignore[union-attr]
    return counts.astype(np.float64), energies, forces


def test_normalizer_round_trip_and_state_dict() -> None:
    norm = Normalizer(-3.5, 2.0)
    x = torch.tensor([1.0, -2.0, 0.25])
    torch.testing.assert_close(norm.norm(x), (x + 3.5) / 2.0)
    torch.testing.assert_close(norm.denorm(norm.norm(x)), x)
    state = norm.state_dict()
    assert set(state) == {"mean", "std"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = Normalizer()
    other.load_state_dict({"mean": torch.tensor(-3.5), "std": torch.tensor(2.0)})  # OCP layout
    torch.testing.assert_close(other.denorm(x), norm.denorm(x))
    with pytest.raises(ConfigError, match="std"):
        Normalizer(0.0, 0.0)


def test_element_references_recover_known_energies() -> None:
    rng = np.random.default_rng(0)
    elements = [1, 6, 8, 29, 78]
    true = np.zeros(N_ELEMENTS)
    true[elements] = [-3.4, -7.1, -4.9, -3.7, -6.1]
    counts = np.zeros((200, N_ELEMENTS))
    counts[:, elements] = rng.integers(0, 20, size=(200, len(elements)))
    energies = counts @ true + rng.normal(0.0, 1e-3, size=200)
    refs = ElementReferences.fit(torch.from_numpy(counts), torch.from_numpy(energies))
    np.testing.assert_allclose(refs.energies.numpy()[elements], true[elements], atol=1e-4)
    absent = np.setdiff1d(np.arange(N_ELEMENTS), elements)
    assert np.all(refs.energies.numpy()[absent] == 0.0)
    assert set(refs.to_mapping()) == set(elements)


def test_element_references_collinear_elements_predict_exactly() -> None:
    """C and O only ever appear together as CO: their split is not determined, their sum is."""
    rng = np.random.default_rng(1)
    n_co, n_cu = rng.integers(0, 4, size=50), rng.integers(4, 30, size=50)
    counts = np.zeros((50, N_ELEMENTS))
    counts[:, 6] = counts[:, 8] = n_co
    counts[:, 29] = n_cu
    energies = -3.7 * n_cu - 14.8 * n_co
    refs = ElementReferences.fit(torch.from_numpy(counts), torch.from_numpy(energies))
    e = refs.energies.numpy()
    assert e[6] + e[8] == pytest.approx(-14.8)
    assert e[6] == pytest.approx(e[8])  # minimum-norm split
    assert e[29] == pytest.approx(-3.7)
    ridge = ElementReferences.fit(torch.from_numpy(counts), torch.from_numpy(energies), ridge=1.0)
    assert ridge.energies[29].item() == pytest.approx(-3.7, abs=1e-2)


def test_energy_offset_per_graph() -> None:
    refs = ElementReferences.from_mapping({"H": -1.0, 8: -2.0, "29": -0.5})
    z = torch.tensor([1, 8, 29, 29, 1])
    batch = torch.tensor([0, 0, 1, 1, 1])
    torch.testing.assert_close(
        refs.energy_offset(z, batch, 3), torch.tensor([-3.0, -2.0, 0.0], dtype=torch.float64)
    )


def test_element_references_from_files(tmp_path: Path) -> None:
    (tmp_path / "refs.yml").write_text("H: -3.4\n8: -7.2\n")
    (tmp_path / "refs.json").write_text(json.dumps({"1": -3.4, "O": -7.2}))
    for name in ("refs.yml", "refs.json"):
        refs = ElementReferences.from_file(tmp_path / name)
        assert refs.to_mapping() == {1: -3.4, 8: -7.2}
    (tmp_path / "bad.yml").write_text("Xx: 1.0\n")
    with pytest.raises(ConfigError, match="Xx"):
        ElementReferences.from_file(tmp_path / "bad.yml")
    (tmp_path / "nobelium.yml").write_text("No: -1.0\n")
    with pytest.raises(ConfigError, match="quote"):
        ElementReferences.from_file(tmp_path / "nobelium.yml")
    with pytest.raises(ConfigError, match="mapping"):
        (tmp_path / "list.yml").write_text("- 1.0\n")
        ElementReferences.from_file(tmp_path / "list.yml")
    state = refs.state_dict()
    loaded = ElementReferences(torch.zeros(N_ELEMENTS))
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded.energies, refs.energies)


def test_fit_statistics_matches_numpy(emt_lmdb: Path, emt_graphs: list[AtomicGraph]) -> None:
    dataset = LmdbDataset(emt_lmdb)
    counts, energies, forces = _numpy_arrays(emt_graphs)
    stats = fit_statistics(dataset, "y", with_forces=True, progress=False)
    assert stats.count == len(emt_graphs)
    assert stats.target_mean == pytest.approx(energies.mean(), rel=1e-6)
    assert stats.target_std == pytest.approx(energies.std(), rel=1e-6)
    assert stats.grad_target_mean == 0.0
    assert stats.grad_target_std == stats.target_std
    assert stats.force_std == pytest.approx(forces.reshape(-1).std(), rel=1e-5)
    assert stats.element_references is None

    fitted = fit_statistics(dataset, "y", fit_references=True, progress=False)
    present = counts.sum(axis=0) > 0
    solution = np.zeros(N_ELEMENTS)
    solution[present] = np.linalg.lstsq(counts[:, present], energies, rcond=None)[0]
    assert fitted.element_references is not None
    np.testing.assert_allclose(fitted.element_references.energies.numpy(), solution, atol=1e-6)
    residual = energies - counts @ solution
    assert fitted.target_mean == pytest.approx(residual.mean(), abs=1e-6)
    assert fitted.target_std == pytest.approx(residual.std(), rel=1e-4)
    assert fitted.target_std < 0.5 * stats.target_std  # references remove composition spread

    given = fit_statistics(
        dataset, "y", element_references=fitted.element_references, with_forces=False
    )
    assert given.target_mean == pytest.approx(fitted.target_mean, abs=1e-6)
    assert given.target_std == pytest.approx(fitted.target_std, rel=1e-4)
    assert given.force_std is None


def test_fit_statistics_subsample_and_errors(emt_lmdb: Path, emt_graphs: list[AtomicGraph]) -> None:
    dataset = LmdbDataset(emt_lmdb)
    stats = fit_statistics(dataset, "y", with_forces=False, max_samples=4, progress=False)
    picked = [0, 4, 7, 11]  # evenly spaced over 12 entries
    _, energies, _ = _numpy_arrays([emt_graphs[i] for i in picked])
    assert stats.count == 4
    assert stats.target_mean == pytest.approx(energies.mean(), rel=1e-6)
    with pytest.raises(DataError, match="y_relaxed"):
        fit_statistics(dataset, "y_relaxed", with_forces=False, progress=False)
    with pytest.raises(ConfigError, match="target"):
        fit_statistics(dataset, "energy", progress=False)


def test_fit_statistics_on_graph_list_and_zero_spread(
    emt_graphs: list[AtomicGraph], caplog: pytest.LogCaptureFixture
) -> None:
    """A plain list of graphs works (no ``fields``); one structure falls back to std 1."""
    with caplog.at_level(logging.WARNING):
        stats = fit_statistics(emt_graphs[:1], "y", progress=False)
    assert stats.target_std == 1.0 and "no spread" in caplog.text


def _transform() -> TargetTransform:
    refs = ElementReferences.from_mapping({"Cu": -3.0, "O": -5.0, "Pt": -6.0, "C": -7.0})
    return TargetTransform(Normalizer(0.7, 2.5), element_references=refs, field="y")


def test_target_transform_round_trip(emt_graphs: list[AtomicGraph]) -> None:
    batch = collate(emt_graphs[:3])
    transform = _transform()
    energy_norm, forces_norm = transform.normalize_batch(batch)
    assert energy_norm.shape == (3,) and forces_norm is not None
    energy, forces = transform.denormalize(energy_norm, forces_norm, batch)
    torch.testing.assert_close(energy, batch.y)
    torch.testing.assert_close(forces, batch.force)
    offset = transform.energy_offset(batch)
    assert offset is not None
    expected = (batch.y.double() - offset - 0.7) / 2.5  # type: ignore[union-attr]
    torch.testing.assert_close(energy_norm, expected.float())
    torch.testing.assert_close(forces_norm, batch.force / 2.5)  # type: ignore[operator]
    with pytest.raises(DataError, match="y_relaxed"):
        TargetTransform(field="y_relaxed").normalize_batch(batch)


def test_denormalized_forces_are_minus_gradient_of_denormalized_energy(
    emt_graphs: list[AtomicGraph],
) -> None:
    batch = collate(emt_graphs[:2]).to("cpu", torch.float64)
    pos = batch.pos.clone().requires_grad_(True)
    graph = batch.replace(pos=pos)
    # a smooth analytic "model" energy in normalised units, per graph
    per_atom = (torch.sin(pos) * pos.square()).sum(dim=1) + 0.3 * pos[:, 2]
    e_norm = torch.zeros(2, dtype=torch.float64).index_add(0, graph.batch, per_atom)
    (grad,) = torch.autograd.grad(e_norm.sum(), pos, create_graph=True)
    f_norm = -grad
    energy, forces = _transform().denormalize(e_norm, f_norm, graph)
    (denorm_grad,) = torch.autograd.grad(energy.sum(), pos)
    assert forces is not None
    torch.testing.assert_close(forces, -denorm_grad)


def test_target_transform_state_dict(emt_graphs: list[AtomicGraph]) -> None:
    transform = _transform()
    state = transform.state_dict()
    assert set(state) == {"target", "grad_target", "element_references"}
    assert set(state["target"]) == {"mean", "std"}
    loaded = TargetTransform()
    loaded.load_state_dict(state)
    batch = collate(emt_graphs[:2])
    for a, b in zip(loaded.normalize_batch(batch), transform.normalize_batch(batch), strict=True):
        torch.testing.assert_close(a, b)
    ocp_only = {k: v for k, v in state.items() if k != "element_references"}
    loaded.load_state_dict(ocp_only)  # an OCP checkpoint's normalizers
    assert loaded.element_references is None


def test_target_transform_from_stats(emt_lmdb: Path) -> None:
    stats = fit_statistics(LmdbDataset(emt_lmdb), "y", fit_references=True, progress=False)
    transform = TargetTransform.from_stats(stats)
    assert transform.grad_target.std.item() == pytest.approx(stats.target_std)
    dataset = LmdbDataset(emt_lmdb)
    batch = collate([dataset[i] for i in range(len(dataset))])
    energy_norm, _ = transform.normalize_batch(batch)
    assert energy_norm.double().mean().item() == pytest.approx(0.0, abs=1e-4)
    assert energy_norm.double().std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)
