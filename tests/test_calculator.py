"""CatforgeCalculator: equality with --mode predict, checkpoint-only loading, forces = -dE/dpos,
ASE optimisers and MD, caching, energy-only models and bad input."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.md.verlet import VelocityVerlet
from ase.optimize import LBFGS

from catforge.assemble.models import build_model, energy_field, load_potential
from catforge.calculator import CatforgeCalculator
from catforge.cli.modes import run
from catforge.config import Config, RunOptions, load_config
from catforge.data.atoms import fixed_mask, graph_to_atoms
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb import LmdbDataset
from catforge.errors import CheckpointError
from catforge.models.forces import ModelOutput
from catforge.potential.checkpoint import save_checkpoint
from catforge.potential.targets import Normalizer, TargetTransform
from catforge.potential.trained import Potential
from tests.factories import SMALL_MODEL, emt_slab

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "s2ef": ROOT / "configs" / "demo" / "s2ef_schnet.yml",
    "is2re": ROOT / "configs" / "demo" / "is2re_schnet.yml",
}


def missing_data_config(task: str, missing: Path) -> Config:
    """The small demo model of ``task`` whose dataset paths (under ``missing``) do not exist."""
    overrides = [f"--dataset.{split}.src={missing / split}" for split in ("train", "val", "test")]
    return load_config(CONFIGS[task], [*SMALL_MODEL, *overrides])


def write_checkpoint(config: Config, path: Path) -> Path:
    """A trainer-like checkpoint: random weights, normalisers (mean -0.3, std 0.5), config."""
    torch.manual_seed(0)
    model = build_model(config)
    transform = TargetTransform(Normalizer(-0.3, 0.5), field=energy_field(config))
    state = {
        "state_dict": model.state_dict(),
        "normalizers": transform.state_dict(),
        "config": config.to_dict(),
    }
    return save_checkpoint(state, path)


@dataclass(frozen=True)
class Written:
    """A checkpoint and the (non-existent) folder its stored config's datasets point at."""

    path: Path
    missing_data: Path


@pytest.fixture(scope="module")
def s2ef_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Written:
    folder = tmp_path_factory.mktemp("s2ef_checkpoint")
    missing = folder / "no_such_data"
    path = write_checkpoint(missing_data_config("s2ef", missing), folder / "checkpoint.pt")
    return Written(path, missing)


@pytest.fixture
def slab() -> Atoms:
    """Cu(111) 2x2x3 with O on top: 13 atoms, bottom layer fixed, rattled, no calculator."""
    return emt_slab("Cu", "O", seed=3, labelled=False)


class CountingPotential(Potential):
    """A Potential that counts its calls and keeps the last graph it was given."""

    def __init__(self, potential: Potential) -> None:
        super().__init__(potential.model, potential.transform, potential.device)
        self.calls = 0
        self.last_graph: AtomicGraph | None = None

    def __call__(self, graph: AtomicGraph) -> ModelOutput:
        self.calls += 1
        self.last_graph = graph
        return super().__call__(graph)


def test_calculator_equals_mode_predict(
    s2ef_checkpoint: Written, demo: Path, tmp_path: Path
) -> None:
    test_src = demo / "s2ef" / "test"
    options = RunOptions(
        mode="predict",
        run_dir=tmp_path,
        checkpoint=s2ef_checkpoint.path,
        timestamp_id="t",
        cpu=True,
    )
    config = load_config(CONFIGS["s2ef"], [*SMALL_MODEL, f"--dataset.test.src={test_src}"], options)
    run(config)
    npz_path = tmp_path / "results" / "t" / "s2ef_predictions.npz"
    with np.load(npz_path) as npz:
        energies, blocks = npz["energy"], np.split(npz["forces"], npz["chunk_idx"])
    dataset = LmdbDataset(test_src)
    assert len(dataset) == len(energies) > 4
    calc = CatforgeCalculator(s2ef_checkpoint.path, device="cpu")
    for index, (energy, free_forces) in enumerate(zip(energies, blocks, strict=True)):
        atoms = graph_to_atoms(dataset[index])
        atoms.calc = calc
        free = ~fixed_mask(atoms)
        np.testing.assert_allclose(atoms.get_potential_energy(), energy, rtol=1e-5, atol=1e-5)
        assert atoms.get_potential_energy() == calc.results["free_energy"]
        raw = atoms.get_forces(apply_constraint=False)
        assert raw.dtype == np.float64 and raw.shape == (len(atoms), 3)
        np.testing.assert_allclose(raw[free], free_forces, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(atoms.get_forces()[~free], 0.0)  # FixAtoms, applied by ASE


def test_checkpoint_is_loaded_alone(
    s2ef_checkpoint: Written, slab: Atoms, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not s2ef_checkpoint.missing_data.exists()

    def no_dataset(*args: object, **kwargs: object) -> None:
        raise AssertionError("the calculator opened a dataset")

    monkeypatch.setattr(LmdbDataset, "__init__", no_dataset)
    slab.calc = CatforgeCalculator(checkpoint=str(s2ef_checkpoint.path), device="cpu")
    assert isinstance(slab.get_potential_energy(), float)
    assert np.isfinite(slab.get_forces()).all()


def test_default_device_and_explicit_device_checks(s2ef_checkpoint: Written) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert CatforgeCalculator(s2ef_checkpoint.path).potential.device.type == expected
    potential = load_potential(s2ef_checkpoint.path, device="cpu")
    assert CatforgeCalculator(potential=potential, device="cpu").potential is potential
    with pytest.raises(ValueError, match="runs on cpu"):
        CatforgeCalculator(potential=potential, device="meta")


def test_forces_are_minus_the_energy_gradient(tmp_path: Path, slab: Atoms) -> None:
    # float64, and no max_neighbors cut: with the demo's 50 of ~80 neighbours within 6 A in Cu,
    # the energy jumps where the 50th and 51st neighbour swap, which breaks finite differences.
    config = load_config(CONFIGS["s2ef"], [*SMALL_MODEL, "--model.max_neighbors=1000"])
    path = write_checkpoint(config, tmp_path / "checkpoint.pt")
    potential = load_potential(path, config=config, device="cpu")
    potential.model.double()
    assert potential.dtype == torch.float64
    slab.calc = CatforgeCalculator(potential=potential)
    forces = slab.get_forces(apply_constraint=False)
    assert np.abs(forces).max() > 1e-2  # a non-trivial check
    step = 1e-4
    for atom in (0, 5, len(slab) - 1):  # fixed, free slab and adsorbate atoms
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                moved = slab.copy()
                moved.positions[atom, axis] += sign * step  # bypasses FixAtoms on purpose
                moved.calc = slab.calc
                energies.append(moved.get_potential_energy())
            numeric = -(energies[0] - energies[1]) / (2 * step)
            assert numeric == pytest.approx(forces[atom, axis], abs=1e-6)


def test_lbfgs_lowers_the_energy_and_keeps_fixed_atoms(
    s2ef_checkpoint: Written, slab: Atoms
) -> None:
    slab.calc = CatforgeCalculator(s2ef_checkpoint.path, device="cpu")
    fixed = fixed_mask(slab)
    assert fixed.any()
    start_positions = slab.get_positions()
    start_energy = slab.get_potential_energy()
    LBFGS(slab, logfile=os.devnull).run(fmax=0.01, steps=5)
    assert slab.get_potential_energy() < start_energy
    np.testing.assert_array_equal(slab.positions[fixed], start_positions[fixed])
    assert not np.allclose(slab.positions[~fixed], start_positions[~fixed])


def test_velocity_verlet_conserves_energy(s2ef_checkpoint: Written, slab: Atoms) -> None:
    slab.calc = CatforgeCalculator(s2ef_checkpoint.path, device="cpu")
    thermal = np.sqrt(slab.get_masses()[:, None] * units.kB * 300.0)  # 300 K, momenta in ASE units
    slab.set_momenta(np.random.default_rng(0).normal(size=(len(slab), 3)) * thermal)
    start_positions = slab.get_positions()
    dynamics = VelocityVerlet(slab, timestep=0.5 * units.fs, logfile=None)
    totals = [slab.get_potential_energy() + slab.get_kinetic_energy()]
    for _ in range(5):
        dynamics.run(1)
        totals.append(slab.get_potential_energy() + slab.get_kinetic_energy())
    assert np.ptp(totals) < 5e-3  # eV (measured ~6e-4, float32), kinetic energy ~0.2 eV
    assert not np.allclose(slab.positions, start_positions)


def test_results_are_cached_until_the_atoms_change(s2ef_checkpoint: Written, slab: Atoms) -> None:
    counting = CountingPotential(load_potential(s2ef_checkpoint.path, device="cpu"))
    slab.calc = CatforgeCalculator(potential=counting)
    energy = slab.get_potential_energy()
    assert slab.get_potential_energy() == energy
    slab.get_forces()
    assert counting.calls == 1
    graph = counting.last_graph
    assert graph is not None and graph.edge_index is None  # the model builds fresh edges
    np.testing.assert_allclose(graph.pos.numpy(), slab.positions, atol=1e-6)

    slab.positions[-1, 2] += 0.5
    moved_energy = slab.get_potential_energy()
    assert counting.calls == 2 and moved_energy != energy
    fresh = slab.copy()
    fresh.calc = CatforgeCalculator(s2ef_checkpoint.path, device="cpu")
    assert moved_energy == pytest.approx(fresh.get_potential_energy(), abs=1e-6)

    slab.set_tags(np.zeros(len(slab), dtype=int))  # tags are a model input ASE does not compare
    slab.get_potential_energy()
    assert counting.calls == 3


def test_energy_only_checkpoint(tmp_path: Path, slab: Atoms) -> None:
    config = missing_data_config("is2re", tmp_path / "no_such_data")
    assert config.trainer == "energy" and not config.model.attributes["regress_forces"]
    path = write_checkpoint(config, tmp_path / "is2re.pt")
    slab.calc = CatforgeCalculator(path, device="cpu")
    assert np.isfinite(slab.get_potential_energy())
    assert slab.calc.get_property("free_energy", slab) == slab.get_potential_energy()
    with pytest.raises(PropertyNotImplementedError, match="predicts energies only") as error:
        slab.get_forces()
    assert str(path) in str(error.value)


def test_bad_arguments(s2ef_checkpoint: Written, tmp_path: Path) -> None:
    missing = tmp_path / "runs" / "checkpoint.pt"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        CatforgeCalculator(missing)
    potential = load_potential(s2ef_checkpoint.path)
    with pytest.raises(ValueError, match="both"):
        CatforgeCalculator(s2ef_checkpoint.path, potential=potential)
    with pytest.raises(ValueError, match="needs a model"):
        CatforgeCalculator()
