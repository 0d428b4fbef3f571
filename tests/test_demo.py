"""The EMT demo dataset: determinism, labels, constraints, splits, anomalies, stats, atomicity."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.build import add_adsorbate, molecule
from ase.calculators.emt import EMT
from ase.optimize import BFGS

from catforge.data import demo, demo_systems
from catforge.data.atoms import fixed_mask, graph_to_atoms
from catforge.data.demo import SIZES, SPLITS, generate_demo, resolve_size, split_systems
from catforge.data.demo_anomalies import (
    classify,
    is_desorbed,
    is_dissociated,
    is_intercalated,
    top_layer,
)
from catforge.data.demo_systems import (
    SlabSpec,
    build_slab,
    label_system,
    make_systems,
    relax_system,
)
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb import LmdbDataset
from catforge.errors import ConfigError, DataError

ADSORBATE_Z = {1, 6, 7, 8}


def read_all(path: Path) -> list[AtomicGraph]:
    dataset = LmdbDataset(path)
    return [dataset[index] for index in range(len(dataset))]


def raw_entries(root: Path) -> list[bytes]:
    entries = []
    for split in SPLITS:
        for src in (root / "s2ef" / split, root / "is2re" / split / "data.lmdb"):
            dataset = LmdbDataset(src)
            entries.extend(dataset.raw(index) for index in range(len(dataset)))
    return entries


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, demo.DemoSummary]:
    out = tmp_path_factory.mktemp("demo") / "tiny"
    return out, generate_demo(out, size="tiny", seed=0, progress=False)


@pytest.fixture(scope="module")
def frames_by_sid(tiny) -> dict[int, list[AtomicGraph]]:
    """Every S2EF frame of every split, grouped by sid and sorted by fid."""
    grouped: dict[int, list[AtomicGraph]] = defaultdict(list)
    for split in SPLITS:
        for graph in read_all(tiny[0] / "s2ef" / split):
            grouped[int(graph.sid)].append(graph)
    return {sid: sorted(frames, key=lambda g: int(g.fid)) for sid, frames in grouped.items()}


def test_layout_and_summary(tiny) -> None:
    root, summary = tiny
    assert sorted(p.name for p in root.iterdir()) == ["is2re", "s2ef", "stats.yml"]
    for split in SPLITS:
        shards = sorted(p.name for p in (root / "s2ef" / split).iterdir())
        assert shards == [f"data.{i:04d}.lmdb" for i in range(len(shards))] and shards
        assert [p.name for p in (root / "is2re" / split).iterdir()] == ["data.lmdb"]
        assert len(LmdbDataset(root / "s2ef" / split)) == summary.frames[split]
        assert len(LmdbDataset(root / "is2re" / split / "data.lmdb")) == summary.systems[split]
    assert summary.generated == SIZES["tiny"]
    assert sum(summary.systems.values()) + sum(summary.anomalies.values()) == SIZES["tiny"]
    assert all(count > 0 for count in summary.systems.values())


def test_same_seed_is_identical_for_any_worker_count(tiny, tmp_path: Path) -> None:
    again = generate_demo(tmp_path / "again", size="tiny", seed=0, workers=2, progress=False)
    assert raw_entries(tmp_path / "again") == raw_entries(tiny[0])
    assert again.stats == tiny[1].stats
    other = generate_demo(tmp_path / "other", size="tiny", seed=1, progress=False)
    assert other.stats != tiny[1].stats
    first, second = make_systems(4, 0), make_systems(4, 0)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.positions, b.positions) and a.info == b.info
    assert not all(
        len(a) == len(b) and np.array_equal(a.positions, b.positions)
        for a, b in zip(first, make_systems(4, 1), strict=True)
    )


def test_fields_tags_and_fixed_atoms(frames_by_sid) -> None:
    for frames in frames_by_sid.values():
        first = frames[0]
        assert [int(frame.fid) for frame in frames] == list(range(len(frames)))
        for name in ("tags", "fixed", "sid", "fid", "y", "force"):
            assert getattr(first, name) is not None
        tags, fixed = first.tags.numpy(), first.fixed.numpy()
        is_adsorbate = np.isin(first.atomic_numbers.numpy(), list(ADSORBATE_Z))
        assert fixed.any() and np.array_equal(tags == 0, fixed)
        assert np.array_equal(tags == 2, is_adsorbate)
        assert set(np.unique(tags[~is_adsorbate])) == {0, 1}
        for frame in frames[1:]:
            assert np.array_equal(frame.pos[first.fixed], first.pos[first.fixed])
        moved = (frames[-1].pos - first.pos).abs().amax(dim=1)
        assert bool((moved[~first.fixed] > 0).any())


def test_forces_are_raw_emt_forces(frames_by_sid) -> None:
    for frames in list(frames_by_sid.values())[:3]:
        for frame in (frames[0], frames[len(frames) // 2], frames[-1]):
            atoms = graph_to_atoms(frame)
            atoms.calc = EMT()
            expected = atoms.get_forces(apply_constraint=False)
            assert np.allclose(frame.force.numpy(), expected, atol=2e-3)
        assert bool((frames[0].force[frames[0].fixed].abs() > 1e-4).any())


def test_energies_are_adsorption_energies(tiny, frames_by_sid) -> None:
    graph = read_all(tiny[0] / "is2re" / "train" / "data.lmdb")[0]
    sid = int(graph.sid)
    system = make_systems(SIZES["tiny"], 0)[sid]
    relaxed = relax_system(system)[-1]
    slab = build_slab(SlabSpec(system.info["metal"], system.info["facet"], system.info["size"]))
    slab.calc = EMT()
    BFGS(slab, logfile=None).run(fmax=0.01, steps=500)
    gas = {}
    for name in ("H2", "H2O", "CO", "N2"):
        mol = molecule(name, cell=(12.0, 12.0, 12.0))
        mol.center()
        mol.calc = EMT()
        BFGS(mol, logfile=None).run(fmax=0.005, steps=500)
        gas[name] = mol.get_potential_energy()
    refs = {
        "H": gas["H2"] / 2,
        "O": gas["H2O"] - gas["H2"],
        "C": gas["CO"] - gas["H2O"] + gas["H2"],
        "N": gas["N2"] / 2,
    }
    symbols = np.array(system.get_chemical_symbols())[system.get_tags() == 2]
    reference = slab.get_potential_energy() + sum(refs[s] for s in symbols)
    assert float(graph.y_relaxed) == pytest.approx(
        relaxed.get_potential_energy() - reference, abs=2e-3
    )
    frame = frames_by_sid[sid][1]
    atoms = graph_to_atoms(frame)
    atoms.calc = EMT()
    assert float(frame.y) == pytest.approx(atoms.get_potential_energy() - reference, abs=2e-3)


def test_is2re_entries_match_their_trajectories(tiny, frames_by_sid) -> None:
    for split in SPLITS:
        for entry in read_all(tiny[0] / "is2re" / split / "data.lmdb"):
            frames = frames_by_sid[int(entry.sid)]
            assert entry.y is None and entry.force is None
            assert float(entry.y_relaxed) == float(frames[-1].y)
            assert float(entry.y_init) == float(frames[0].y)
            assert np.array_equal(entry.pos_relaxed, frames[-1].pos)
            assert np.array_equal(entry.pos, frames[0].pos)
            assert np.array_equal(entry.tags, frames[0].tags)


def test_no_system_in_two_splits(tiny) -> None:
    root, summary = tiny
    seen: dict[int, str] = {}
    for split in SPLITS:
        is2re = {int(g.sid) for g in read_all(root / "is2re" / split / "data.lmdb")}
        s2ef = {int(g.sid) for g in read_all(root / "s2ef" / split)}
        assert s2ef == is2re and len(is2re) == summary.systems[split]
        for sid in is2re:
            assert seen.setdefault(sid, split) == split
    parts = split_systems(list(range(20)), np.random.default_rng(0))
    assert [len(parts[s]) for s in SPLITS] == [14, 3, 3]
    assert sorted(sid for part in parts.values() for sid in part) == list(range(20))


def test_stats_equal_numpy_on_written_data(tiny) -> None:
    root, summary = tiny
    train = read_all(root / "s2ef" / "train")
    energies = np.array([float(g.y) for g in train], dtype=np.float64)
    forces = np.concatenate([g.force.double().numpy().ravel() for g in train])
    relaxed = np.array([float(g.y_relaxed) for g in read_all(root / "is2re/train/data.lmdb")])
    stats = yaml.safe_load((root / "stats.yml").read_text())
    s2ef, is2re = stats["s2ef"]["dataset"][0], stats["is2re"]["dataset"][0]
    assert s2ef["src"] == str((root / "s2ef" / "train").resolve())
    expected = {
        "target_mean": energies.mean(),
        "target_std": energies.std(),
        "grad_target_mean": 0.0,
        "grad_target_std": energies.std(),
    }
    for key, value in expected.items():
        assert s2ef[key] == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert summary.stats["s2ef"][key] == s2ef[key]
    assert stats["s2ef"]["force_std"] == pytest.approx(forces.std(), rel=1e-9)
    assert is2re["target_mean"] == pytest.approx(relaxed.mean(), rel=1e-9)
    assert is2re["target_std"] == pytest.approx(relaxed.std(), rel=1e-9)
    assert stats["systems"] == summary.systems and stats["frames"] == summary.frames
    assert stats["anomalies"] == summary.anomalies


def _slab_with(adsorbate: str, height: float, site: str = "fcc") -> Atoms:
    slab = build_slab(SlabSpec("Cu", "fcc111", (2, 2, 4)))
    chain = Atoms(adsorbate, positions=[(0, 0, 1.15 * i) for i in range(len(adsorbate))])
    chain.set_tags(2)
    add_adsorbate(slab, chain, height, site)
    return slab


def test_anomaly_detectors_on_hand_made_cases() -> None:
    normal = _slab_with("CO", 1.3)
    assert not is_desorbed(normal) and not is_intercalated(normal, normal)
    assert not is_dissociated(normal, normal) and classify(normal, normal) is None

    desorbed = _slab_with("O", 6.0)
    assert is_desorbed(desorbed) and classify(desorbed, desorbed) == "desorbed"

    split_co = normal.copy()
    split_co.positions[-1] += (2.5, 0.0, 0.5)  # the O of CO leaves its C behind
    assert is_dissociated(normal, split_co) and classify(normal, split_co) == "dissociated"

    oxygen = _slab_with("O", 1.2)
    sunk = oxygen.copy()
    surface_z = oxygen.positions[top_layer(oxygen), 2].mean()
    sunk.positions[-1, 2] = surface_z - 1.0
    assert is_intercalated(oxygen, sunk) and classify(oxygen, sunk) == "intercalated"

    assert classify(normal, normal, converged=False) == "not_converged"
    assert classify(normal, normal, adsorption_energy=-12.0) == "energy_outlier"


def test_relax_system_frames_and_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    system = make_systems(1, 3)[0]
    frames = relax_system(system)
    assert len(frames) > 1 and frames[-1].info["converged"]
    assert np.array_equal(frames[0].positions, system.positions)
    assert frames[-1].get_potential_energy() < frames[0].get_potential_energy()
    assert np.array_equal(fixed_mask(frames[-1]), fixed_mask(system))
    result = label_system(system)
    assert result.positions.shape == (len(frames), len(system), 3)

    def broken(atoms: Atoms) -> list[Atoms]:
        raise RuntimeError("EMT exploded")

    monkeypatch.setattr(demo_systems, "relax_system", broken)
    assert label_system(system).anomaly == "failed"


def test_output_is_complete_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data"
    real_write_lmdb = demo.write_lmdb

    def fail_late(graphs, path):
        real_write_lmdb(graphs, path)
        if "val" in str(path):
            raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "write_lmdb", fail_late)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_demo(out, size=6, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    generate_demo(out, size=6, progress=False)
    assert (out / "stats.yml").is_file()
    with pytest.raises(DataError, match="already exists"):
        generate_demo(out, size=6, seed=1, progress=False)
    generate_demo(out, size=6, seed=1, progress=False, overwrite=True)
    assert "seed: 1" in (out / "stats.yml").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a demo dataset"):
        generate_demo(tmp_path / "mine", size=6, progress=False, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_sizes() -> None:
    assert resolve_size("small") == SIZES["small"] and resolve_size(7) == 7
    assert resolve_size("32") == 32  # --size N as the command line passes it
    for bad in ("huge", 2, "2", "-5", True):
        with pytest.raises(ConfigError):
            resolve_size(bad)
