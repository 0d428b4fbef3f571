"""LMDB files damaged in place (same size, bytes overwritten): per-entry checksums catch flipped
bytes inside values, and damaged page structure is a DataError naming the file."""

from __future__ import annotations

import pickle
import random
import shutil
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from catforge.data.graph import AtomicGraph
from catforge.data.info import info
from catforge.data.lmdb import CHECKSUMS_KEY, LmdbDataset, write_lmdb
from catforge.errors import DataError
from tests.factories import graphs

MISMATCH = "stored bytes do not match their checksum (the file is corrupt; copy or regenerate it)"
FIELDS = ("pos", "force", "atomic_numbers", "cell", "y", "tags", "fixed", "sid")


def overwrite_everywhere(data: bytes, marker: bytes, offset: int, new: bytes) -> bytes:
    """``data`` with ``new`` written at ``offset`` inside every copy of ``marker``.

    LMDB may leave stale copies of a value in freed pages, so every copy is changed.
    """
    out = bytearray(data)
    start = data.find(marker)
    assert start >= 0, "marker not found in the file"
    while start >= 0:
        out[start + offset : start + offset + len(new)] = new
        start = data.find(marker, start + 1)
    assert len(out) == len(data)
    return bytes(out)


def test_checksums_key_layout(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    items = graphs()
    write_lmdb(items, path)
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        stored = txn.get(CHECKSUMS_KEY)
        values = [txn.get(str(i).encode()) for i in range(len(items))]
        metadata = txn.get(b"metadata")
    env.close()
    sums = np.frombuffer(stored, dtype="<u4")
    assert sums.tolist() == [
        *(zlib.crc32(value) for value in values),
        zlib.crc32(metadata),
        zlib.crc32(stored[:-4]),
    ]


def test_flipped_bytes_inside_a_value_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    items = graphs()
    marker = np.arange(300, dtype=np.float32) * 0.25 + 1234.5  # recognisable bytes
    pos = torch.from_numpy(marker.reshape(100, 3))
    special = AtomicGraph.from_fields(
        {"pos": pos, "atomic_numbers": np.full(100, 29), "cell": np.eye(3) * 20, "sid": 77}
    )
    write_lmdb([*items[:3], special, *items[3:]], path)
    data = path.read_bytes()
    damaged = tmp_path / "damaged.lmdb"
    damaged.write_bytes(overwrite_everywhere(data, marker.tobytes(), 400, b"\x00\x01\x02"))
    dataset = LmdbDataset(damaged)
    with pytest.raises(DataError) as error:
        dataset[3]
    assert str(error.value) == f"{damaged} entry 3: {MISMATCH}"
    with pytest.raises(DataError, match="do not match their checksum"):
        dataset.fields(3)
    assert dataset[4].sid.item() == 3  # the other entries still read
    summary = info(damaged, progress=False)
    assert summary["bad_entries"]["count"] == 1
    assert summary["bad_entries"]["first"][0] == {
        "file": str(damaged), "entry": 3, "sid": None, "reason": MISMATCH,
    }  # fmt: skip
    # without verification the damage reads back silently: the check is what catches it
    silent = LmdbDataset(damaged, verify_checksums=False)[3]
    assert not torch.equal(silent.pos, special.pos)


def test_random_flips_inside_values_are_all_detected(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    items = graphs()
    write_lmdb(items, path)
    data = path.read_bytes()
    # values whose bytes occur at most twice (the live copy and a stale one) and not in the
    # two meta pages, so that overwriting them changes exactly that entry
    candidates = [
        (index, name, marker)
        for index, graph in enumerate(items)
        for name in FIELDS
        if (marker := getattr(graph, name).numpy().tobytes()) in data[8192:]
        and data.count(marker) <= 2
        and marker not in data[:8192]
    ]
    assert len({name for _, name, _ in candidates}) >= 4
    rng = random.Random(0)
    silent = 0
    for trial in range(12):
        index, name, marker = rng.choice(candidates)
        offset = rng.randrange(len(marker))
        new = bytes([marker[offset] ^ rng.randrange(1, 256)])
        damaged = tmp_path / f"trial{trial}.lmdb"
        damaged.write_bytes(overwrite_everywhere(data, marker, offset, new))
        try:
            graph = LmdbDataset(damaged, verify_checksums=False)[index]
        except DataError:
            pass  # the damage happened to make the value unreadable or invalid
        else:
            silent += not torch.equal(getattr(graph, name), getattr(items[index], name))
        with pytest.raises(DataError, match=rf"{damaged.name} entry {index}: stored bytes"):
            LmdbDataset(damaged)[index]
    assert silent >= 6  # most of these flips read back silently without the checksums


def page_damaged_copies(tmp_path: Path) -> list[Path]:
    """Copies of an LMDB file with the header of one page (2, 3, ...) overwritten each; every
    page past the two meta pages is in use (branch or leaf)."""
    path = tmp_path / "data.lmdb"
    write_lmdb(graphs() * 8, path)
    data = path.read_bytes()
    psize = 4096
    copies = []
    for page in range(2, len(data) // psize):
        damaged = bytearray(data)
        damaged[page * psize : page * psize + 16] = b"\xff" * 16
        copy = tmp_path / f"page{page}.lmdb"
        copy.write_bytes(damaged)
        copies.append(copy)
    assert len(copies) >= 5
    return copies


def test_damaged_pages_are_a_data_error_naming_the_file(tmp_path: Path) -> None:
    failures = 0
    copies = page_damaged_copies(tmp_path)
    for copy in copies:
        try:
            dataset = LmdbDataset(copy)
            for index in range(len(dataset)):
                dataset[index]
            _ = dataset.metadata
        except DataError as error:
            assert str(error).startswith(str(copy)) and "corrupt" in str(error)
            failures += 1
    assert failures == len(copies)


def test_info_on_damaged_pages_names_the_file(tmp_path: Path) -> None:
    reported = 0
    copies = page_damaged_copies(tmp_path)
    for copy in copies:
        try:
            summary = info(copy, progress=False)
        except DataError as error:
            assert str(error).startswith(str(copy)) and "corrupt" in str(error)
            reported += 1
            continue
        for bad in summary["bad_entries"]["first"]:
            assert bad["file"] == str(copy) and "the LMDB file is corrupt" in bad["reason"]
        reported += summary["bad_entries"]["count"] > 0
    assert reported == len(copies)


def test_corrupt_checksums_key(tmp_path: Path) -> None:
    path = tmp_path / "data.lmdb"
    write_lmdb(graphs(), path)
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        stored = bytearray(txn.get(CHECKSUMS_KEY))
        stored[0] ^= 0xFF
        txn.put(CHECKSUMS_KEY, bytes(stored))
    env.close()
    with pytest.raises(DataError, match=rf"{path}: the 'checksums' key is corrupt"):
        LmdbDataset(path)


def test_files_without_checksums_or_length_read_as_before(tmp_path: Path) -> None:
    items = graphs()
    write_lmdb(items, tmp_path / "data.lmdb")
    for deleted in ([b"length"], [CHECKSUMS_KEY], [b"length", CHECKSUMS_KEY]):
        path = tmp_path / f"without-{len(deleted)}-{deleted[0].decode()}.lmdb"
        shutil.copy(tmp_path / "data.lmdb", path)
        env = lmdb.open(str(path), subdir=False, lock=False)
        with env.begin(write=True) as txn:  # no length: the count comes from the keys
            for key in deleted:
                assert txn.delete(key)
        env.close()
        dataset = LmdbDataset(path)
        assert len(dataset) == len(items), deleted
        assert [dataset[i].sid.item() for i in range(len(items))] == list(range(len(items)))
        assert dataset.metadata["natoms"].tolist() == [g.n_atoms for g in items]
        assert pickle.loads(dataset.raw(0))["sid"].tolist() == [0]
