"""LMDB writer and dataset: round trips, sharding, metadata, workers and failure modes."""

from __future__ import annotations

import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from catforge.data.atoms import atoms_to_graph, fixed_mask, graph_to_atoms
from catforge.data.collate import collate
from catforge.data.lmdb import LmdbDataset, LmdbWriter, write_lmdb, write_shards
from catforge.errors import ConfigError, DataError
from catforge.registry import DATASETS
from tests.factories import graphs, structures


def assert_same_graph(a, b) -> None:
    assert a.present() == b.present()
    for name in a.present():
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_atoms_lmdb_graph_atoms_round_trip(tmp_path: Path) -> None:
    originals = structures()
    path = tmp_path / "data.lmdb"
    count = write_lmdb((atoms_to_graph(a, sid=i, fid=0) for i, a in enumerate(originals)), path)
    dataset = LmdbDataset(path, float_dtype=torch.float64)
    assert count == len(dataset) == len(originals)
    for index, original in enumerate(originals):
        atoms = graph_to_atoms(dataset[index])
        # stored as float32: positions to 1e-5 A, energies to float32 precision
        np.testing.assert_allclose(atoms.positions, original.positions, atol=1e-5)
        np.testing.assert_allclose(atoms.cell.array, original.cell.array, atol=1e-5)
        assert (atoms.numbers == original.numbers).all()
        assert (atoms.get_tags() == original.get_tags()).all()
        assert (fixed_mask(atoms) == fixed_mask(original)).all()
        np.testing.assert_allclose(
            atoms.get_potential_energy(), original.get_potential_energy(), rtol=1e-6
        )
        np.testing.assert_allclose(
            atoms.get_forces(apply_constraint=False),
            original.get_forces(apply_constraint=False),
            atol=1e-5,
        )
        assert atoms.info["sid"] == index


def test_shards_concatenate_with_stable_index(tmp_path: Path) -> None:
    items = graphs() * 3  # 15 structures
    items = [g.replace(sid=torch.tensor([i])) for i, g in enumerate(items)]
    paths = write_shards(items, tmp_path / "s2ef", n_shards=4)
    assert [p.name for p in paths] == [f"data.{i:04d}.lmdb" for i in range(4)]
    dataset = LmdbDataset(tmp_path / "s2ef")
    assert len(dataset) == 15
    seen = sorted(dataset[i].sid.item() for i in range(len(dataset)))
    assert seen == list(range(15))
    # round-robin: shard k holds items k, k+4, ...; the global index walks the shards in order
    assert [dataset[i].sid.item() for i in range(4)] == [0, 4, 8, 12]
    assert dataset.locate(4) == (1, 0) and dataset[-1].sid.item() == 11
    with pytest.raises(IndexError):
        dataset[15]


def test_length_and_metadata_keys(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    items = [
        g.replace(
            edge_index=torch.zeros(2, 3 + i, dtype=torch.long),
            cell_offsets=torch.zeros(3 + i, 3, dtype=torch.long),
            neighbors=torch.tensor([3 + i]),
        )
        for i, g in enumerate(graphs())
    ]
    write_lmdb(items, path)
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        assert pickle.loads(txn.get(b"length")) == len(items)
        assert txn.get(b"0") is not None
    env.close()
    metadata = LmdbDataset(path).metadata
    assert metadata["natoms"].tolist() == [g.n_atoms for g in items]
    assert metadata["neighbors"].tolist() == [3, 4, 5, 6, 7]


def test_metadata_by_scan_for_files_without_it(shared_data: Path) -> None:
    dataset = LmdbDataset(shared_data / "legacy_lmdb" / "is2re_custom.lmdb")
    assert len(dataset) == 32  # no "length" key: counted from the entries
    expected = [dataset[i].n_atoms for i in range(len(dataset))]
    assert dataset.metadata["natoms"].tolist() == expected
    assert dataset[0].y_relaxed is not None and dataset[0].has_edges


def test_dataloader_workers_open_their_own_environments(tmp_path: Path) -> None:
    items = [g.replace(sid=torch.tensor([i])) for i, g in enumerate(graphs() * 4)]
    write_shards(items, tmp_path / "d", n_shards=2)
    dataset = LmdbDataset(tmp_path / "d")
    dataset[0]  # open an environment in the parent before forking
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate)
    sids = torch.cat([batch.sid for batch in loader]).tolist()
    assert sorted(sids) == list(range(len(items)))


def test_writer_failure_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    with pytest.raises(RuntimeError), LmdbWriter(path) as writer:
        writer.write(graphs()[0])
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_registered_names() -> None:
    for name in ("lmdb", "single_point_lmdb", "trajectory_lmdb"):
        assert DATASETS.load(name) is LmdbDataset
    with pytest.raises(ConfigError, match="Did you mean 'trajectory_lmdb'"):
        DATASETS.lookup("trajectory_lmbd")


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        LmdbDataset(tmp_path / "nope")
    with pytest.raises(DataError, match=r"holds no \*.lmdb files"):
        LmdbDataset(tmp_path)


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    write_lmdb(graphs() * 40, path)
    truncated = tmp_path / "truncated.lmdb"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"truncated\.lmdb: LMDB file is truncated"):
        LmdbDataset(truncated)
    garbage = tmp_path / "garbage.lmdb"
    garbage.write_bytes(b"not an lmdb file" * 1000)
    with pytest.raises(DataError, match=r"garbage\.lmdb: not a readable LMDB file"):
        LmdbDataset(garbage)


def test_bad_entries_name_file_entry_and_field(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
    fields = graphs()[0].to_fields()
    nan_pos = dict(fields, pos=np.full_like(fields["pos"], np.nan))
    no_numbers = {k: v for k, v in fields.items() if k != "atomic_numbers"}
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(nan_pos, protocol=5))
        txn.put(b"1", pickle.dumps(no_numbers, protocol=5))
        txn.put(b"2", b"\x80\x05garbage")
        txn.put(b"length", pickle.dumps(4))
    env.close()
    dataset = LmdbDataset(path)
    with pytest.raises(DataError, match=r"data.lmdb entry 0 \(sid 0\): field 'pos' contains NaN"):
        dataset[0]
    with pytest.raises(DataError, match=r"data.lmdb entry 1 \(sid 0\): required field 'atomic"):
        dataset[1]
    with pytest.raises(DataError, match=r"data.lmdb entry 2: corrupt or truncated pickle"):
        dataset[2]
    with pytest.raises(DataError, match=r"data.lmdb entry 3: missing \(truncated or corrupt"):
        dataset[3]


def test_two_datasets_over_one_file(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    write_lmdb(graphs(), path)
    first, second = LmdbDataset(path), LmdbDataset(path)
    assert_same_graph(first[2], second[2])
