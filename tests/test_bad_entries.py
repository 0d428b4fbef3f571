"""Bad entries (NaN/inf, Z out of range, no atoms): refused on write, named on read, reported by
``data info`` and optionally skipped by the dataset."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
import torch

from catforge.data.graph import AtomicGraph
from catforge.data.info import format_info, info
from catforge.data.lmdb import BadEntry, LmdbDataset, LmdbWriter, write_lmdb, write_shards
from catforge.errors import DataError
from tests.factories import graphs

NAN_FORCE = "field 'force' contains NaN or infinite values"
Z_RANGE = "atomic numbers must lie in 1..118"
NO_ATOMS = "structure has no atoms"


def empty_graph(sid: int) -> AtomicGraph:
    """A zero-atom structure built with the dataclass constructor (no validation)."""
    return AtomicGraph(
        pos=torch.zeros(0, 3),
        atomic_numbers=torch.zeros(0, dtype=torch.long),
        cell=torch.eye(3)[None] * 10,
        pbc=torch.ones(1, 3, dtype=torch.bool),
        natoms=torch.tensor([0]),
        tags=torch.zeros(0, dtype=torch.long),
        fixed=torch.zeros(0, dtype=torch.bool),
        batch=torch.zeros(0, dtype=torch.long),
        sid=torch.tensor([sid]),
    )


def spoiled(graph: AtomicGraph, how: str) -> AtomicGraph:
    """``graph`` with one defect, built without validation."""
    if how == "nan force":
        force = graph.force.clone()
        force[1, 2] = float("nan")
        return graph.replace(force=force)
    if how == "inf pos":
        pos = graph.pos.clone()
        pos[0, 0] = float("inf")
        return graph.replace(pos=pos)
    if how in ("z 0", "z 200"):
        numbers = graph.atomic_numbers.clone()
        numbers[3] = 0 if how == "z 0" else 200
        return graph.replace(atomic_numbers=numbers)
    assert how == "no atoms"
    return empty_graph(int(graph.sid))


REASONS = {
    "nan force": NAN_FORCE,
    "inf pos": "field 'pos' contains NaN or infinite values",
    "z 0": f"'atomic_numbers' holds 0 at atom 3; {Z_RANGE}",
    "z 200": f"'atomic_numbers' holds 200 at atom 3; {Z_RANGE}",
    "no atoms": NO_ATOMS,
}


@pytest.mark.parametrize("how", list(REASONS))
def test_writer_refuses_bad_graphs_naming_file_entry_sid_and_field(
    tmp_path: Path, how: str
) -> None:
    items = graphs()
    items[2] = spoiled(items[2], how)
    path = tmp_path / "data.lmdb"
    with pytest.raises(DataError) as error:
        write_lmdb(items, path)
    assert str(error.value).startswith(f"{path} entry 2 (sid 2): {REASONS[how]}")
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # the partial file is discarded


def test_write_shards_names_the_shard_and_its_entry(tmp_path: Path) -> None:
    items = graphs()
    items[3] = spoiled(items[3], "nan force")  # shard 1 (round-robin over 2), its entry 1
    with pytest.raises(DataError, match=r"data\.0001\.lmdb entry 1 \(sid 3\): field 'force'"):
        write_shards(items, tmp_path / "out", n_shards=2)
    assert not list((tmp_path / "out").glob("*.lmdb"))


def test_writer_keeps_going_after_a_refused_graph(tmp_path: Path) -> None:
    items = graphs()
    with LmdbWriter(tmp_path / "data.lmdb") as writer:
        writer.write(items[0])
        with pytest.raises(DataError, match="entry 1"):
            writer.write(spoiled(items[1], "z 0"))
        writer.write(items[1])
    dataset = LmdbDataset(tmp_path / "data.lmdb")
    assert len(dataset) == 2 and dataset[1].sid.item() == 1


def test_batches_validate_and_zero_atom_batches_do_not() -> None:
    from catforge.data.collate import collate

    batch = collate(graphs())
    assert batch.validate() is batch
    with pytest.raises(DataError, match=NO_ATOMS):
        collate([graphs()[0].replace(y=None, force=None), empty_graph(9)]).validate("batch")


def write_raw_lmdb(path: Path, entries: list[dict[str, Any] | bytes]) -> None:
    """An LMDB written without catforge's writer (so without its checks), like a foreign file."""
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        for index, entry in enumerate(entries):
            value = entry if isinstance(entry, bytes) else pickle.dumps(entry, protocol=5)
            txn.put(str(index).encode(), value)
        txn.put(b"length", pickle.dumps(len(entries)))
    env.close()


def mixed_entries() -> tuple[list[dict[str, Any] | bytes], dict[int, tuple[int | None, str]]]:
    """Ten entries (sid 100 + index); entries 2, 5, 6 and 8 are bad: (sid, reason) by index."""
    good = [g.to_fields() for g in graphs() * 2]
    entries: list[dict[str, Any] | bytes] = [
        dict(fields, sid=np.array([100 + i])) for i, fields in enumerate(good)
    ]
    entries[2] = spoiled(graphs()[0], "nan force").replace(sid=torch.tensor([102])).to_fields()
    entries[5] = spoiled(graphs()[0], "z 0").replace(sid=torch.tensor([105])).to_fields()
    entries[6] = empty_graph(106).to_fields()
    entries[8] = b"\x80\x05garbage"
    bad = {
        2: (102, NAN_FORCE),
        5: (105, REASONS["z 0"]),
        6: (106, NO_ATOMS),
        8: (None, "corrupt or truncated pickle"),
    }
    return entries, bad


def test_read_errors_name_file_entry_and_sid(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    entries, bad = mixed_entries()
    write_raw_lmdb(path, entries)
    dataset = LmdbDataset(path)
    for index, (sid, reason) in bad.items():
        with pytest.raises(DataError) as error:
            dataset[index]
        where = f"{path} entry {index}" + ("" if sid is None else f" (sid {sid})")
        assert str(error.value).startswith(f"{where}: {reason}")
    assert dataset[3].sid.item() == 103


def test_info_counts_and_lists_bad_entries(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    entries, bad = mixed_entries()
    write_raw_lmdb(path, entries)
    summary = info(path, progress=False)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["entries"] == 10
    assert summary["bad_entries"]["count"] == 4
    listed = summary["bad_entries"]["first"]
    assert [(e["file"], e["entry"], e["sid"]) for e in listed] == [
        (str(path), index, sid) for index, (sid, _) in bad.items()
    ]
    for entry, (_, reason) in zip(listed, bad.values(), strict=True):
        assert entry["reason"].startswith(reason)
    # the statistics cover the six good entries: the same as info over a file of only those
    good = [entries[i] for i in range(10) if i not in bad]
    write_raw_lmdb(tmp_path / "good.lmdb", good)
    clean = info(tmp_path / "good.lmdb", progress=False)
    assert clean["bad_entries"] == {"count": 0, "first": []}
    for key in ("fields", "natoms", "elements", "energy_mean", "energy_std", "force_std"):
        assert summary[key] == clean[key], key
    text = format_info(summary)
    assert "WARNING: 4 bad entries (of 10), left out of the statistics above" in text
    assert f"{path} entry 2 (sid 102): {NAN_FORCE}" in text
    assert "missing in some entries" not in text
    assert "WARNING" not in format_info(clean)


def test_info_lists_only_the_first_few(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    write_raw_lmdb(path, [empty_graph(i).to_fields() for i in range(30)])
    summary = info(path, progress=False)
    assert summary["bad_entries"]["count"] == 30 and len(summary["bad_entries"]["first"]) == 10
    assert summary["natoms"] == {"min": None, "mean": None, "max": None}
    assert "WARNING: 30 bad entries (of 30)" in format_info(summary)


def test_skip_bad_entries_keeps_the_good_ones_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entries, bad = mixed_entries()
    folder = tmp_path / "d"
    folder.mkdir()
    write_raw_lmdb(folder / "a.lmdb", entries[:4])  # bad: 2
    write_raw_lmdb(folder / "b.lmdb", entries[4:])  # bad: 5, 6, 8 -> local 1, 2, 4
    with caplog.at_level(logging.WARNING, logger="catforge.data.lmdb"):
        dataset = LmdbDataset(folder, skip_bad_entries=True)
    good = [i for i in range(10) if i not in bad]
    assert len(dataset) == len(good)
    assert [dataset[i].sid.item() for i in range(len(dataset))] == [100 + i for i in good]
    assert dataset[-1].sid.item() == 109
    assert [dataset.locate(i) for i in range(len(good))] == [
        (0, 0), (0, 1), (0, 3), (1, 0), (1, 3), (1, 5),
    ]  # fmt: skip
    assert dataset.fields(4)["sid"].tolist() == [107]
    assert pickle.loads(dataset.raw(4))["sid"].tolist() == [107]
    assert dataset.metadata["natoms"].tolist() == [dataset[i].n_atoms for i in range(len(good))]
    assert dataset.metadata["neighbors"].tolist() == [0] * len(good)
    with pytest.raises(IndexError):
        dataset[len(good)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 4 bad entries of 10" in message
    assert f"{folder / 'a.lmdb'} entry 2 (sid 102): {NAN_FORCE}" in message
    assert f"{folder / 'b.lmdb'} entry 4: corrupt or truncated pickle" in message
    assert [(b.file, b.entry, b.sid) for b in dataset.skipped] == [
        (str(folder / "a.lmdb"), 2, 102),
        (str(folder / "b.lmdb"), 1, 105),
        (str(folder / "b.lmdb"), 2, 106),
        (str(folder / "b.lmdb"), 4, None),
    ]
    assert dataset.skipped[0] == BadEntry(str(folder / "a.lmdb"), 2, 102, NAN_FORCE)


def test_bad_entries_raise_by_default_and_clean_files_skip_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "data.lmdb"
    entries, _ = mixed_entries()
    write_raw_lmdb(path, entries)
    dataset = LmdbDataset(path)
    assert len(dataset) == 10
    with pytest.raises(DataError, match=r"entry 2 \(sid 102\)"):
        dataset[2]
    write_lmdb(graphs(), tmp_path / "clean.lmdb")
    with caplog.at_level(logging.WARNING, logger="catforge.data.lmdb"):
        clean = LmdbDataset(tmp_path / "clean.lmdb", skip_bad_entries=True)
    assert len(clean) == 5 and clean.skipped == [] and not caplog.records
    assert clean.metadata["natoms"].tolist() == [g.n_atoms for g in graphs()]
