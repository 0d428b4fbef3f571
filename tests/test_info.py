"""``info``/``format_info``: dataset summaries checked against numpy on the input frames."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.data import chemical_symbols

from catforge.data.atoms import atoms_to_graph
from catforge.data.info import format_info, info
from catforge.data.ingest import ingest
from catforge.data.lmdb import LmdbWriter
from catforge.data.stats import Moments
from catforge.errors import DataError
from tests.factories import structures

KEYS = {"path", "entries", "fields", "natoms", "elements", "energy_mean", "energy_std", "force_std"}
KEYS |= {"bad_entries"}
S2EF_FIELDS = ["pos", "atomic_numbers", "cell", "pbc", "natoms", "tags", "fixed", "y", "force"]
S2EF_FIELDS += ["sid", "fid"]
REAL = ["random1000100.traj", "random1000142.traj", "random1447590.traj"]


def expected_summary(frames: list, energies: list[float], with_forces: bool) -> dict:
    """What info() must report, computed with numpy from ASE frames."""
    natoms = [len(atoms) for atoms in frames]
    numbers = sorted({int(z) for atoms in frames for z in atoms.numbers})
    forces = [atoms.get_forces(apply_constraint=False).ravel() for atoms in frames]
    return {
        "entries": len(frames),
        "natoms": {"min": min(natoms), "mean": float(np.mean(natoms)), "max": max(natoms)},
        "elements": [chemical_symbols[z] for z in numbers],
        "energy_mean": float(np.mean(energies)),
        "energy_std": float(np.std(energies)),
        "force_std": float(np.std(np.concatenate(forces))) if with_forces else None,
    }


def check(summary: dict, expected: dict) -> None:
    assert set(summary) == KEYS
    assert summary["bad_entries"] == {"count": 0, "first": []}
    assert json.loads(json.dumps(summary)) == summary  # JSON-serialisable as is
    for key, value in expected.items():
        if isinstance(value, float):
            assert summary[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert summary[key] == value, key


def test_info_on_ingested_real_oc20_s2ef(shared_data: Path, tmp_path: Path) -> None:
    inputs = [shared_data / "oc20" / name for name in REAL]
    out = ingest(inputs, tmp_path / "s2ef", "s2ef", workers=2, progress=False).out
    frames = [atoms for path in inputs for atoms in ase.io.read(path, index=":")]
    summary = info(out, progress=False)
    energies = [atoms.get_potential_energy() for atoms in frames]
    check(summary, expected_summary(frames, energies, with_forces=True))
    assert summary["fields"] == dict.fromkeys(S2EF_FIELDS, len(frames))
    assert summary["path"] == str(out)
    text = format_info(summary)
    assert "entries: 232" in text and "energy (y)" in text and "missing" not in text


def test_info_on_ingested_is2re_uses_y_relaxed(shared_data: Path, tmp_path: Path) -> None:
    inputs = [shared_data / "oc20" / name for name in REAL]
    out = ingest(inputs, tmp_path / "is2re", "is2re", progress=False).out
    first = [ase.io.read(path, index=0) for path in inputs]
    relaxed = [ase.io.read(path, index=-1).get_potential_energy() for path in inputs]
    summary = info(out / "data.lmdb", progress=False)
    check(summary, expected_summary(first, relaxed, with_forces=False))
    assert "y" not in summary["fields"] and summary["fields"]["y_relaxed"] == 3
    assert "energy (y_relaxed)" in format_info(summary)
    assert "forces: absent" in format_info(summary)


def test_info_reports_fields_some_entries_lack(tmp_path: Path) -> None:
    frames = structures()
    graphs = [atoms_to_graph(atoms, sid=index) for index, atoms in enumerate(frames)]
    graphs[1] = graphs[1].replace(y=None, force=None)
    with LmdbWriter(tmp_path / "data.lmdb") as writer:
        for graph in graphs:
            writer.write(graph)
    summary = info(tmp_path / "data.lmdb", progress=False)
    labelled = [atoms for index, atoms in enumerate(frames) if index != 1]
    energies = [atoms.get_potential_energy() for atoms in labelled]
    expected = expected_summary(frames, energies, with_forces=False)  # sizes, elements: all
    expected["force_std"] = expected_summary(labelled, energies, with_forces=True)["force_std"]
    check(summary, expected)
    assert summary["fields"]["y"] == summary["fields"]["force"] == len(frames) - 1
    assert summary["fields"]["pos"] == len(frames)
    assert "missing in some entries: y (4 of 5), force (4 of 5)" in format_info(summary)


def test_info_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothing\.lmdb"):
        info(tmp_path / "nothing.lmdb")


def test_moments_merge_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0, 2.0, size) for size in (1, 7, 100, 0)]
    merged, single = Moments(), Moments()
    for part in parts:
        other = Moments()
        other.add(part)
        merged.merge(other)
        single.add(part)
    values = np.concatenate(parts)
    assert merged.count == single.count == values.size
    assert merged.std == pytest.approx(values.std()) and single.std == pytest.approx(values.std())
    assert Moments().std is None
