"""Ingestion of ASE files, ASE databases and OC20's raw S2EF layout into LMDB datasets."""

from __future__ import annotations

import logging
import lzma
import shutil
import sys
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.trajectory import Trajectory
from ase.optimize import BFGS

from catforge.data.atoms import atoms_to_graph, fixed_mask
from catforge.data.graph import AtomicGraph
from catforge.data.ingest import format_stats_yaml, ingest
from catforge.data.lmdb import LmdbDataset
from catforge.errors import DataError
from catforge.runtime import progress as progress_module
from tests.factories import emt_slab

# ase warns when writing the slabs' adsorbate_info (a dict) to extxyz; irrelevant here
pytestmark = pytest.mark.filterwarnings("ignore:Skipping unhashable information:UserWarning")


def relax(path: Path, metal: str, adsorbate: str, seed: int, steps: int) -> list[Atoms]:
    """A short EMT relaxation written as .traj; returns its frames as read back."""
    slab = emt_slab(metal, adsorbate, seed=seed)
    with BFGS(slab, trajectory=str(path), logfile=None) as optimizer:
        optimizer.run(fmax=1e-6, steps=steps)
    return ase.io.read(path, index=":")


@pytest.fixture(scope="module")
def trajs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with three relaxations: random11 (5 frames), random12 (4), plain (3)."""
    folder = tmp_path_factory.mktemp("trajs")
    relax(folder / "random11.traj", "Cu", "O", seed=1, steps=4)
    relax(folder / "random12.traj", "Pt", "CO", seed=2, steps=3)
    relax(folder / "plain.traj", "Ag", "H", seed=3, steps=2)
    return folder


def read(path: Path) -> list[Atoms]:
    return ase.io.read(path, index=":")


def entries(out: Path) -> list[AtomicGraph]:
    dataset = LmdbDataset(out)
    return [dataset[index] for index in range(len(dataset))]


def by_id(graphs: list[AtomicGraph]) -> dict[tuple[int, int], AtomicGraph]:
    return {(int(g.sid.item()), int(g.fid.item())): g for g in graphs}


def assert_frame(graph: AtomicGraph, atoms: Atoms, ref: float = 0.0) -> None:
    """An S2EF entry equals its frame (float32 storage)."""
    np.testing.assert_allclose(graph.y.item(), atoms.get_potential_energy() - ref, rtol=1e-6)
    np.testing.assert_allclose(graph.pos.numpy(), atoms.positions, atol=1e-5)
    np.testing.assert_allclose(
        graph.force.numpy(), atoms.get_forces(apply_constraint=False), atol=1e-5
    )
    assert graph.fixed.numpy().tolist() == fixed_mask(atoms).tolist()
    assert graph.tags.numpy().tolist() == atoms.get_tags().tolist()
    assert graph.atomic_numbers.numpy().tolist() == atoms.numbers.tolist()


def write_raw(folder: Path, name: str, frames: list[tuple[int, int, float, Atoms]]) -> None:
    """OC20's raw S2EF layout: <name>.extxyz and <name>.txt with random<sid>,frame<fid>,<ref>."""
    folder.mkdir(parents=True, exist_ok=True)
    ase.io.write(folder / f"{name}.extxyz", [atoms for *_, atoms in frames])
    lines = [f"random{sid},frame{fid},{ref!r}" for sid, fid, ref, _ in frames]
    (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")


def test_s2ef_from_a_folder_of_traj(trajs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(trajs, folder)
    (folder / "README.md").write_text("notes")
    summary = ingest([folder], tmp_path / "out", "s2ef", progress=False)
    graphs = by_id(entries(tmp_path / "out"))
    # sid: OC20 file names give their digits, other files their position in the sorted inputs
    expected = {11: read(trajs / "random11.traj"), 12: read(trajs / "random12.traj")}
    expected[0] = read(trajs / "plain.traj")
    assert summary.entries == len(graphs) == sum(map(len, expected.values())) == 12
    assert summary.files_read == 3
    assert summary.outputs == [tmp_path / "out" / "data.0000.lmdb"]
    assert summary.skipped == [(folder / "README.md", "not a supported file type")]
    for sid, frames in expected.items():
        for fid, atoms in enumerate(frames):
            assert_frame(graphs[sid, fid], atoms)
    # forces are stored unconstrained: fixed atoms keep their (non-zero) forces
    graph = graphs[11, 0]
    assert graph.fixed.any() and graph.force[graph.fixed].abs().sum() > 0


def test_s2ef_extxyz_with_and_without_reference_energy(trajs: Path, tmp_path: Path) -> None:
    frames = read(trajs / "random11.traj")
    for index, atoms in enumerate(frames):
        atoms.info["ref_energy"] = 0.25 * index - 1.0
    ase.io.write(tmp_path / "random77.extxyz", frames)
    plain = by_id(entries(ingest([tmp_path / "random77.extxyz"], tmp_path / "a", "s2ef").out))
    refd = ingest([tmp_path / "random77.extxyz"], tmp_path / "b", "s2ef", ref_energy=True)
    referenced = by_id(entries(refd.out))
    assert sorted(plain) == sorted(referenced) == [(77, fid) for fid in range(len(frames))]
    for fid, atoms in enumerate(frames):
        assert_frame(plain[77, fid], atoms)
        assert_frame(referenced[77, fid], atoms, ref=atoms.info["ref_energy"])


def test_ase_db_rows_grouped_by_relaxation_id(trajs: Path, tmp_path: Path) -> None:
    relaxations = {21: read(trajs / "random11.traj"), 22: read(trajs / "random12.traj")}
    with ase.db.connect(tmp_path / "set.db") as db:
        for rid, frames in relaxations.items():
            for atoms in frames:
                db.write(atoms, relaxation_id=rid)
    graphs = by_id(entries(ingest([tmp_path / "set.db"], tmp_path / "s2ef", "s2ef").out))
    assert len(graphs) == 9
    for rid, frames in relaxations.items():
        for fid, atoms in enumerate(frames):
            assert_frame(graphs[rid, fid], atoms)
    relaxed = entries(ingest([tmp_path / "set.db"], tmp_path / "is2re", "is2re").out)
    assert [g.sid.item() for g in relaxed] == [21, 22]
    for graph, frames in zip(relaxed, relaxations.values(), strict=True):
        np.testing.assert_allclose(graph.y_init.item(), frames[0].get_potential_energy())
        np.testing.assert_allclose(graph.y_relaxed.item(), frames[-1].get_potential_energy())


def test_ase_json_db_with_string_sid_and_fid(trajs: Path, tmp_path: Path) -> None:
    frames = read(trajs / "random12.traj")
    with ase.db.connect(tmp_path / "set.json") as db:
        for fid in reversed(range(len(frames))):  # stored out of order, fid says which is which
            db.write(frames[fid], sid="random5", fid=fid, ref_energy=2.0)
    out = ingest([tmp_path / "set.json"], tmp_path / "o", "is2rs", ref_energy=True).out
    (graph,) = entries(out)
    assert graph.sid.item() == 5
    np.testing.assert_allclose(graph.y_init.item(), frames[0].get_potential_energy() - 2.0)
    np.testing.assert_allclose(graph.y_relaxed.item(), frames[-1].get_potential_energy() - 2.0)
    np.testing.assert_allclose(graph.pos_relaxed.numpy(), frames[-1].positions, atol=1e-5)


@pytest.mark.parametrize("compressed", [False, True])
def test_raw_oc20_layout(trajs: Path, tmp_path: Path, compressed: bool) -> None:
    a, b = read(trajs / "random11.traj"), read(trajs / "random12.traj")
    rows = [(100, fid, -0.5 * fid, atoms) for fid, atoms in enumerate(a)]
    rows += [(200, fid, 3.0, atoms) for fid, atoms in enumerate(b)]
    rows = rows[::2] + rows[1::2]  # frames of both systems interleaved, as in OC20's files
    write_raw(tmp_path / "raw", "0", rows)
    if compressed:
        for name in ("0.extxyz", "0.txt"):
            path = tmp_path / "raw" / name
            path.with_name(name + ".xz").write_bytes(lzma.compress(path.read_bytes()))
            path.unlink()
    plain = by_id(entries(ingest([tmp_path / "raw"], tmp_path / "a", "s2ef").out))
    refd = by_id(entries(ingest([tmp_path / "raw"], tmp_path / "b", "s2ef", ref_energy=True).out))
    assert len(plain) == len(refd) == len(rows)  # sid_fid unique
    for sid, fid, ref, atoms in rows:
        assert_frame(plain[sid, fid], atoms)
        assert_frame(refd[sid, fid], atoms, ref=ref)
    txt = next((tmp_path / "raw").glob("0.txt*"))  # naming the txt means its extxyz
    assert ingest([txt], tmp_path / "t", "s2ef").entries == len(rows)
    relaxed = entries(ingest([tmp_path / "raw"], tmp_path / "c", "is2re", ref_energy=True).out)
    assert [g.sid.item() for g in relaxed] == [100, 200]
    np.testing.assert_allclose(relaxed[0].y_init.item(), a[0].get_potential_energy())
    last = len(a) - 1
    np.testing.assert_allclose(
        relaxed[0].y_relaxed.item(), a[-1].get_potential_energy() + 0.5 * last
    )
    np.testing.assert_allclose(relaxed[1].y_relaxed.item(), b[-1].get_potential_energy() - 3.0)


@pytest.mark.parametrize("task", ["is2re", "is2rs"])
def test_relaxation_fields(trajs: Path, tmp_path: Path, task: str) -> None:
    inputs = [trajs / "random12.traj", trajs / "random11.traj"]
    summary = ingest(inputs, tmp_path / "out", task, progress=False)
    assert summary.outputs == [tmp_path / "out" / "data.lmdb"]
    assert (tmp_path / "out" / "data.lmdb").is_file()
    graphs = entries(tmp_path / "out" / "data.lmdb")
    assert [g.sid.item() for g in graphs] == [11, 12]  # sorted inputs
    for graph, name in zip(graphs, ["random11.traj", "random12.traj"], strict=True):
        frames = read(trajs / name)
        first, last = frames[0], frames[-1]
        assert graph.y is None and graph.force is None and graph.fid is None
        np.testing.assert_allclose(graph.y_init.item(), first.get_potential_energy(), rtol=1e-6)
        np.testing.assert_allclose(graph.y_relaxed.item(), last.get_potential_energy(), rtol=1e-6)
        np.testing.assert_allclose(graph.pos.numpy(), first.positions, atol=1e-5)
        np.testing.assert_allclose(graph.pos_relaxed.numpy(), last.positions, atol=1e-5)
        assert graph.tags.tolist() == first.get_tags().tolist()
        assert graph.fixed.tolist() == fixed_mask(first).tolist()
        assert not np.allclose(first.positions, last.positions)


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_off_a_terminal_is_a_heartbeat_log(
    trajs: Path,
    tmp_path: Path,
    workers: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Like every progress loop: no bar off a terminal, a log line per heartbeat (here each file),
    and nothing with progress=False."""
    monkeypatch.setattr(progress_module, "HEARTBEAT_SECONDS", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with caplog.at_level(logging.INFO, logger=progress_module.__name__):
        ingest([trajs], tmp_path / "a", "s2ef", workers=workers)
        lines = [r.getMessage() for r in caplog.records if r.name == progress_module.__name__]
        caplog.clear()
        ingest([trajs], tmp_path / "b", "is2re", workers=workers, progress=False)
        assert not [r for r in caplog.records if r.name == progress_module.__name__]
    assert [line.split(",")[0] for line in lines] == [
        "ingest s2ef: 1 of 3 (33%)",
        "ingest s2ef: 2 of 3 (67%)",
        "ingest s2ef: 3 of 3 (100%)",
    ]


def test_two_workers_write_the_same_entries(trajs: Path, tmp_path: Path) -> None:
    one = ingest([trajs], tmp_path / "one", "s2ef", workers=1, progress=False)
    two = ingest([trajs], tmp_path / "two", "s2ef", workers=2, progress=False)
    assert [p.name for p in two.outputs] == ["data.0000.lmdb", "data.0001.lmdb"]
    assert one.entries == two.entries == len(LmdbDataset(tmp_path / "two"))
    a, b = by_id(entries(one.out)), by_id(entries(two.out))
    assert sorted(a) == sorted(b)
    for key, graph in a.items():
        for name in graph.present():
            assert np.array_equal(getattr(graph, name), getattr(b[key], name)), name
    assert one.stats == pytest.approx(two.stats)
    r1 = entries(ingest([trajs], tmp_path / "r1", "is2re", progress=False).out)
    r2 = entries(ingest([trajs], tmp_path / "r2", "is2re", workers=2, progress=False).out)
    assert [g.to_fields().keys() for g in r1] == [g.to_fields().keys() for g in r2]
    for g1, g2 in zip(r1, r2, strict=True):
        assert all(np.array_equal(v, g2.to_fields()[k]) for k, v in g1.to_fields().items())


def test_statistics_equal_numpy(trajs: Path, tmp_path: Path) -> None:
    frames = [f for name in sorted(trajs.iterdir()) for f in read(name)]
    energies = np.array([f.get_potential_energy() for f in frames])
    forces = np.concatenate([f.get_forces(apply_constraint=False).ravel() for f in frames])
    stats = ingest([trajs], tmp_path / "s", "s2ef").stats
    assert stats["target_mean"] == pytest.approx(energies.mean(), rel=1e-12)
    assert stats["target_std"] == pytest.approx(energies.std(), rel=1e-9)
    assert stats["grad_target_mean"] == 0.0
    assert stats["grad_target_std"] == stats["target_std"]
    assert stats["force_std"] == pytest.approx(forces.std(), rel=1e-5)
    parsed = yaml.safe_load(format_stats_yaml(stats))
    assert parsed == {
        "normalize_labels": True,
        "target_mean": stats["target_mean"],
        "target_std": stats["target_std"],
        "grad_target_mean": 0.0,
        "grad_target_std": stats["target_std"],
    }
    relaxed = ingest([trajs], tmp_path / "r", "is2re")
    last = np.array([read(p)[-1].get_potential_energy() for p in sorted(trajs.iterdir())])
    assert relaxed.stats == pytest.approx({"target_mean": last.mean(), "target_std": last.std()})
    assert "grad_target_std" not in yaml.safe_load(format_stats_yaml(relaxed.stats))
    assert relaxed.format().endswith(format_stats_yaml(relaxed.stats))


def test_get_edges(trajs: Path, tmp_path: Path) -> None:
    from catforge.data.neighbors import with_edges

    out = ingest(
        [trajs / "plain.traj"], tmp_path / "e", "s2ef", get_edges=True, cutoff=4.0, max_neighbors=8
    ).out
    for graph, atoms in zip(entries(out), read(trajs / "plain.traj"), strict=True):
        expected = with_edges(atoms_to_graph(atoms), 4.0, 8)
        assert graph.n_edges > 0
        assert np.array_equal(graph.edge_index, expected.edge_index)
        assert np.array_equal(graph.cell_offsets, expected.cell_offsets)


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_leaves_no_partial_output(trajs: Path, tmp_path: Path, workers: int) -> None:
    folder = tmp_path / "in"
    shutil.copytree(trajs, folder)
    (folder / "zzz.traj").write_bytes(b"not a trajectory at all" * 10)
    with pytest.raises(DataError, match=r"zzz\.traj"):
        ingest([folder], tmp_path / "out", "s2ef", workers=workers, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_overwrite(trajs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder is fine
    ingest([trajs / "plain.traj"], out, "s2ef")
    with pytest.raises(DataError, match=r"out: output exists.*--overwrite"):
        ingest([trajs / "random11.traj"], out, "s2ef")
    ingest([trajs / "random11.traj"], out, "s2ef", overwrite=True)
    assert {g.sid.item() for g in entries(out)} == {11}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    folder = tmp_path / "in"
    shutil.copytree(trajs, folder)
    with pytest.raises(DataError, match="would replace the input"):
        ingest([folder], folder, "s2ef", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in trajs.iterdir())


def _atoms_without(what: str) -> list[Atoms]:
    atoms = emt_slab(labelled=False)
    if what == "forces":
        atoms.calc = SinglePointCalculator(atoms, energy=1.0)
    return [atoms]


def _bad_inputs(tmp_path: Path, trajs: Path, case: str) -> tuple[list[Path], str, str]:
    """Inputs for one error case, the task, and a pattern the message must match."""
    frames = read(trajs / "plain.traj")
    rows = [(1, fid, 0.0, atoms) for fid, atoms in enumerate(frames)]
    if case == "missing":
        return [tmp_path / "nope.traj"], "s2ef", r"nope\.traj: no such file"
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.md").write_text("x")
        return [tmp_path / "empty"], "s2ef", r"empty: folder holds no supported files"
    if case in ("corrupt traj", "corrupt db"):
        path = tmp_path / ("bad.traj" if case == "corrupt traj" else "bad.db")
        path.write_bytes(b"\x00garbage" * 50)
        return [path], "s2ef", rf"{path.name}: cannot be read"
    if case in ("no energy", "no forces"):
        ase.io.write(tmp_path / "x.extxyz", _atoms_without(case.split()[1]))
        return [tmp_path / "x.extxyz"], "s2ef", rf"x\.extxyz frame 0: {case}"
    if case == "short txt":
        write_raw(tmp_path / "raw", "7", rows)
        lines = (tmp_path / "raw" / "7.txt").read_text().splitlines()
        (tmp_path / "raw" / "7.txt").write_text("\n".join(lines[:-1]))
        return [tmp_path / "raw"], "s2ef", r"7\.txt: has 2 lines but .*7\.extxyz has more frames"
    if case == "long txt":
        write_raw(tmp_path / "raw", "7", rows)
        with (tmp_path / "raw" / "7.txt").open("a") as handle:
            handle.write("random1,frame9,0.0\n")
        return [tmp_path / "raw"], "s2ef", r"7\.txt: has 4 lines but .*7\.extxyz has 3 frames"
    if case == "malformed txt":
        write_raw(tmp_path / "raw", "7", rows)
        text = (tmp_path / "raw" / "7.txt").read_text().replace("frame1,", "frame1;")
        (tmp_path / "raw" / "7.txt").write_text(text)
        return [tmp_path / "raw"], "s2ef", r"7\.txt line 2: expected 'random<sid>,frame<fid>"
    if case == "nan positions":
        frames[1].positions[3, 0] = np.nan
        with Trajectory(tmp_path / "nan.traj", "w") as traj:
            for atoms in frames:
                traj.write(atoms)
        return [tmp_path / "nan.traj"], "s2ef", r"nan\.traj frame 1: positions contain NaN"
    if case in ("nan forces", "nan relaxed energy", "no atoms", "atomic number 0"):
        return _invalid_frames(tmp_path, case)
    if case == "no ref energy":
        return [trajs / "plain.traj"], "s2ef", r"plain\.traj frame 0: --ref-energy needs"
    if case == "db partial key":
        with ase.db.connect(tmp_path / "p.db") as db:
            db.write(frames[0], sid=3)
            db.write(frames[1])
        return [tmp_path / "p.db"], "is2re", r"p\.db row id 2: has no 'sid' key-value pair"
    assert case == "mixed relaxation"
    ase.io.write(tmp_path / "mix.extxyz", [frames[0], emt_slab("Pt", "CO")])
    return [tmp_path / "mix.extxyz"], "is2re", r"mix\.extxyz frame 1: atoms differ .*relaxation_id"


def _invalid_frames(tmp_path: Path, case: str) -> tuple[list[Path], str, str]:
    """An extxyz whose frame 1 is invalid in the way ``case`` says."""
    frames = [emt_slab(seed=1), emt_slab(seed=2)]
    bad = frames[1]
    energy, forces = bad.get_potential_energy(), bad.get_forces(apply_constraint=False)
    task, pattern = "s2ef", r"x\.extxyz frame 1: field 'force' contains NaN or infinite values"
    if case == "nan forces":
        forces[3, 1] = np.nan
    elif case == "nan relaxed energy":
        energy, task, pattern = np.nan, "is2re", r"x\.extxyz frame 1: energy is NaN or infinite"
    elif case == "no atoms":
        bad = Atoms(cell=bad.cell, pbc=True)
        forces = np.zeros((0, 3))
        pattern = r"x\.extxyz frame 1: structure has no atoms; every structure needs at least one"
    else:
        bad.numbers[4] = 0
        pattern = r"x\.extxyz frame 1: 'atomic_numbers' holds 0 at atom 4; atomic numbers must"
    bad.calc = SinglePointCalculator(bad, energy=energy, forces=forces)
    ase.io.write(tmp_path / "x.extxyz", [frames[0], bad])
    return [tmp_path / "x.extxyz"], task, pattern


ERROR_CASES = [
    *("missing", "empty folder", "corrupt traj", "corrupt db", "no energy", "no forces"),
    *("short txt", "long txt", "malformed txt", "nan positions", "no ref energy"),
    *("db partial key", "mixed relaxation", "nan forces", "nan relaxed energy", "no atoms"),
    "atomic number 0",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_name_the_file(trajs: Path, tmp_path: Path, case: str) -> None:
    inputs, task, pattern = _bad_inputs(tmp_path, trajs, case)
    ref = case == "no ref energy"
    with pytest.raises(DataError, match=pattern) as error:
        ingest(inputs, tmp_path / "out", task, ref_energy=ref, progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


REAL = {"random1000100.traj": (126, 33), "random1000142.traj": (59, 73)}
REAL["random1447590.traj"] = (47, 17)


def test_real_oc20_trajectories_as_s2ef(shared_data: Path, tmp_path: Path) -> None:
    inputs = [shared_data / "oc20" / name for name in REAL]
    summary = ingest(inputs, tmp_path / "s2ef", "s2ef", progress=False)
    graphs = by_id(entries(tmp_path / "s2ef"))
    assert summary.entries == len(graphs) == sum(n for n, _ in REAL.values())
    for name, (n_frames, n_atoms) in REAL.items():
        sid = int(name.removeprefix("random").removesuffix(".traj"))
        frames = read(shared_data / "oc20" / name)
        assert len(frames) == n_frames
        for fid, atoms in enumerate(frames):
            graph = graphs[sid, fid]
            assert graph.n_atoms == n_atoms
            assert_frame(graph, atoms)
    assert int(graphs[1447590, 0].fixed.sum()) == 10


def test_real_oc20_trajectories_as_is2re(shared_data: Path, tmp_path: Path) -> None:
    inputs = [shared_data / "oc20" / name for name in REAL]
    graphs = entries(ingest(inputs, tmp_path / "is2re", "is2re", progress=False).out)
    assert [g.sid.item() for g in graphs] == [1000100, 1000142, 1447590]
    for graph, name in zip(graphs, REAL, strict=True):
        frames = read(shared_data / "oc20" / name)
        np.testing.assert_allclose(graph.y_init.item(), frames[0].get_potential_energy(), rtol=1e-6)
        np.testing.assert_allclose(
            graph.y_relaxed.item(), frames[-1].get_potential_energy(), rtol=1e-6
        )
        np.testing.assert_allclose(graph.pos_relaxed.numpy(), frames[-1].positions, atol=1e-4)
        assert graph.fixed.tolist() == fixed_mask(frames[0]).tolist()


def test_real_oc20_atoms_json(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / "oc20" / "atoms.json"
    (graph,) = entries(ingest([path], tmp_path / "j", "s2ef", progress=False).out)
    (atoms,) = read(path)
    assert graph.n_atoms == 34 and int(graph.fixed.sum()) == 24
    assert set(graph.tags.tolist()) == {0, 1}
    assert (graph.sid.item(), graph.fid.item()) == (0, 0)
    assert_frame(graph, atoms)
