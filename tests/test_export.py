"""Tests for catforge.data.export: OCP-format LMDB files that OCP's own readers accept."""

from __future__ import annotations

import bisect
import itertools
import pickle
import pickletools
import sys
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
import torch

from catforge.cli.main import main
from catforge.data.export import export_ocp
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb import LmdbDataset, write_lmdb, write_shards
from catforge.data.neighbors import with_edges
from catforge.data.pickles import dumps_entry
from catforge.errors import CatforgeError, DataError
from tests.factories import graphs

pyg = pytest.importorskip("torch_geometric.data")

OCP_DTYPES = {
    "pos": torch.float32,
    "cell": torch.float32,
    "atomic_numbers": torch.float32,
    "fixed": torch.float32,
    "force": torch.float32,
    "pos_relaxed": torch.float32,
    "tags": torch.long,
    "edge_index": torch.long,
    "cell_offsets": torch.long,
    "pbc": torch.bool,
}
OCP_SCALARS = {
    "natoms": int,
    "sid": int,
    "fid": int,
    "y": float,
    "y_init": float,
    "y_relaxed": float,
}


def _s2ef_graphs(edges: bool) -> list[AtomicGraph]:
    out = []
    for index, graph in enumerate(graphs()):
        graph = graph.replace(fid=torch.tensor([index + 3]))
        if index == 0:  # a slab that is not periodic along z: pbc must survive
            graph = graph.replace(pbc=torch.tensor([[True, True, False]]))
        out.append(with_edges(graph, 6.0, 50) if edges else graph)
    return out


def _is2re_graphs(edges: bool) -> list[AtomicGraph]:
    out = []
    for graph in _s2ef_graphs(edges):
        shift = torch.full_like(graph.pos, 0.125)
        out.append(
            graph.replace(
                y=None,
                force=None,
                fid=None,
                pos_relaxed=graph.pos + shift,
                y_init=graph.y + 1.0,
                y_relaxed=graph.y - 0.5,
            )
        )
    return out


def _source(tmp_path: Path, layout: str, edges: bool) -> tuple[Path, list[AtomicGraph]]:
    """A dataset written by catforge: s2ef shards, an is2re file, or an is2re folder."""
    if layout == "s2ef":
        items = _s2ef_graphs(edges)
        write_shards(items, tmp_path / "src", 2)
        order = [*items[0::2], *items[1::2]]  # round-robin: shard 0 first, then shard 1
        return tmp_path / "src", order
    items = _is2re_graphs(edges)
    path = tmp_path / "src" / "data.lmdb"
    write_lmdb(items, path)
    return (path if layout == "is2re-file" else path.parent), items


def _raw_entries(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(key): bytes(value) for key, value in txn.cursor()}
    finally:
        env.close()


def _pyg2_data_transform(data: Any) -> Any:
    """OCP's ``pyg2_data_transform``: rebuild a Data from the unpickled object's store."""
    source = data.__dict__
    if "_store" in source:
        source = source["_store"]
    return pyg.Data(**{key: value for key, value in source.items() if value is not None})


def _ocp_lmdb_dataset(src: Path) -> list[Any]:
    """OCP's ``LmdbDataset``: a file or a folder; ``length`` key if present, else the key count."""
    paths = [src] if src.is_file() else sorted(src.glob("*.lmdb"))
    lengths, envs = [], []
    for path in paths:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_readers=1)
        raw = env.begin().get(b"length")
        lengths.append(pickle.loads(raw) if raw is not None else env.stat()["entries"])
        envs.append(env)
    cumulative = np.cumsum(lengths).tolist()
    items = []
    for index in range(sum(lengths)):
        db = bisect.bisect(cumulative, index)
        local = index - (cumulative[db - 1] if db else 0)
        items.append(_pyg2_data_transform(pickle.loads(envs[db].begin().get(str(local).encode()))))
    for env in envs:
        env.close()
    return items


def _ocp_single_point(path: Path) -> list[Any]:
    """OCP's ``SinglePointLmdbDataset``: a file; keys ``0 .. env.stat()["entries"] - 1``."""
    assert path.is_file()
    entries = _raw_entries(path)
    return [
        _pyg2_data_transform(pickle.loads(entries[str(i).encode()])) for i in range(len(entries))
    ]


def _ocp_trajectory(src: Path) -> list[Any]:
    """OCP's ``TrajectoryLmdbDataset``: a folder; every file must hold the ``length`` key."""
    items = []
    for path in sorted(src.glob("*.lmdb")):
        entries = _raw_entries(path)
        length = pickle.loads(entries[b"length"])
        items += [
            _pyg2_data_transform(pickle.loads(entries[str(i).encode()])) for i in range(length)
        ]
    return items


def _check_ocp_data(data: Any, graph: AtomicGraph) -> None:
    """A Data as OCP reads it: OCP's names, dtypes and scalar types, values equal the source."""
    expected = set(graph.present()) - {"batch", "neighbors"}
    assert set(data.keys()) == expected
    for name in expected:
        value, reference = getattr(data, name), getattr(graph, name)
        if name in OCP_SCALARS:
            assert type(value) is OCP_SCALARS[name], name
            assert value == OCP_SCALARS[name](reference.item()), name
        else:
            assert isinstance(value, torch.Tensor) and value.dtype == OCP_DTYPES[name], name
            assert torch.equal(value, reference.to(value.dtype).reshape(value.shape)), name
    assert data.cell.shape == (1, 3, 3) and data.pbc.shape == (1, 3)
    assert data.pos.shape == (graph.n_atoms, 3)
    assert torch.equal(data.fixed, graph.fixed.float())  # 1.0 = fixed


LAYOUTS = ["s2ef", "is2re-file", "is2re-folder"]


@pytest.mark.parametrize("edges", [False, True], ids=["no-edges", "edges"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_plain_pickle_loads_gives_ocp_data(tmp_path: Path, layout: str, edges: bool) -> None:
    src, items = _source(tmp_path, layout, edges)
    summary = export_ocp(src, tmp_path / "out" / src.name, progress=False)
    values: list[bytes] = []
    for file in summary.files:
        entries = _raw_entries(file.path)
        count = file.entries
        if layout == "s2ef":
            assert entries.pop(b"length") == pickle.dumps(count, protocol=4)
            assert file.length_key
        else:  # single point: the key count is the length, so no other key may exist
            assert not file.length_key
        assert sorted(entries) == sorted(str(i).encode() for i in range(count))
        values += [entries[str(i).encode()] for i in range(count)]
    assert len(values) == len(items)
    for raw, graph in zip(values, items, strict=True):
        data = pickle.loads(raw)
        assert type(data) is pyg.Data
        _check_ocp_data(data, graph)


@pytest.mark.parametrize("edges", [False, True], ids=["no-edges", "edges"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_catforge_reads_the_export_back(tmp_path: Path, layout: str, edges: bool) -> None:
    src, _ = _source(tmp_path, layout, edges)
    out = tmp_path / "out" / src.name
    export_ocp(src, out, progress=False)
    before, after = LmdbDataset(src), LmdbDataset(out)
    assert [path.name for path in after.files] == [path.name for path in before.files]
    assert len(after) == len(before)
    for index in range(len(before)):
        original, exported = before[index], after[index]
        assert exported.present() == original.present()
        for name in original.present():
            assert torch.equal(getattr(exported, name), getattr(original, name)), (index, name)
    np.testing.assert_array_equal(after.metadata["natoms"], before.metadata["natoms"])


@pytest.mark.parametrize("edges", [False, True], ids=["no-edges", "edges"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ocp_dataset_classes_read_the_export(tmp_path: Path, layout: str, edges: bool) -> None:
    src, items = _source(tmp_path, layout, edges)
    summary = export_ocp(src, tmp_path / "out" / src.name, progress=False)
    readers = [_ocp_lmdb_dataset(summary.ocp_src)]
    if layout == "s2ef":
        readers.append(_ocp_trajectory(summary.ocp_src))
        metadata = np.load(summary.out / "metadata.npz")
        np.testing.assert_array_equal(metadata["natoms"], [graph.n_atoms for graph in items])
        assert ("neighbors" in metadata) == edges
        if edges:
            np.testing.assert_array_equal(metadata["neighbors"], [g.n_edges for g in items])
    else:
        readers.append(_ocp_single_point(summary.ocp_src))
    for dataset in readers:
        assert len(dataset) == len(items)
        for data, graph in zip(dataset, items, strict=True):
            _check_ocp_data(data, graph)
        batch = pyg.Batch.from_data_list(dataset)  # OCP's data_list_collater
        assert batch.natoms.tolist() == [graph.n_atoms for graph in items]
        assert batch.pos.shape == (sum(graph.n_atoms for graph in items), 3)
        assert batch.cell.shape == (len(items), 3, 3)
        if edges:
            offsets = np.cumsum([0, *(graph.n_atoms for graph in items[:-1])])
            expected = torch.cat(
                [g.edge_index + int(o) for g, o in zip(items, offsets, strict=True)], dim=1
            )
            assert torch.equal(batch.edge_index, expected)


def test_pickles_name_only_old_pyg_classes(tmp_path: Path) -> None:
    src, _ = _source(tmp_path, "is2re-file", edges=True)
    export_ocp(src, tmp_path / "out.lmdb", progress=False)
    raw = _raw_entries(tmp_path / "out.lmdb")[b"0"]
    assert raw[:2] == b"\x80\x04"  # protocol 4: readable by Python 3.4+
    strings = [arg for op, arg, _ in pickletools.genops(raw) if isinstance(arg, str)]
    pyg_names = {(m, n) for m, n in itertools.pairwise(strings) if m.startswith("torch_geometric")}
    expected = {
        ("torch_geometric.data.data", "Data"),
        ("torch_geometric.data.storage", "GlobalStorage"),
    }
    assert pyg_names == expected


def test_real_ocp_is2re_file_exports_as_it_was(tmp_path: Path, shared_data: Path) -> None:
    copy, out = tmp_path / "legacy.lmdb", tmp_path / "data.lmdb"
    copy.write_bytes((shared_data / "legacy_lmdb" / "is2re_custom.lmdb").read_bytes())
    original = _raw_entries(copy)  # before catforge's reader holds the file open
    export_ocp(copy, out, progress=False)
    exported = _raw_entries(out)
    assert sorted(exported) == sorted(original)  # same keys, none added
    for key, raw in original.items():
        before, after = pickle.loads(raw).to_dict(), pickle.loads(exported[key]).to_dict()
        assert set(after) == set(before) | {"pbc"}
        for name, value in before.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after[name], value.to(after[name].dtype)), (key, name)
                expected_dtype = torch.long if name == "tags" else value.dtype  # OCP: LongTensor
                assert after[name].dtype == expected_dtype, (key, name)
            else:
                assert after[name] == value and type(after[name]) is type(value), (key, name)


def test_cli_prints_the_summary_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, items = _source(tmp_path, "s2ef", edges=False)
    out = tmp_path / "ocp"
    assert main(["data", "export", str(src), "--format", "ocp", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"ocp: wrote {len(items)} entries") == 1
    assert f"dataset src: {out}" in printed
    assert sorted(path.name for path in out.iterdir()) == [
        "data.0000.lmdb", "data.0001.lmdb", "metadata.npz"
    ]  # fmt: skip


def test_missing_torch_geometric_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = _source(tmp_path, "is2re-file", edges=False)
    for name in [name for name in sys.modules if name.startswith("torch_geometric")]:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(CatforgeError, match="pip install torch_geometric"):
        export_ocp(src, tmp_path / "out.lmdb", progress=False)
    argv = ["data", "export", str(src), "--format", "ocp", "--out", str(tmp_path / "o.lmdb")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install torch_geometric" in err
    assert not (tmp_path / "out.lmdb").exists() and not (tmp_path / "o.lmdb").exists()


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    src, items = _source(tmp_path, "s2ef", edges=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(DataError, match="--overwrite"):
        export_ocp(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "old"
    assert export_ocp(src, out, overwrite=True, progress=False).entries == len(items)
    assert not (out / "keep.txt").exists()
    file_src, _ = _source(tmp_path / "single", "is2re-file", edges=False)
    (tmp_path / "x.lmdb").write_bytes(b"old")
    with pytest.raises(DataError, match="--overwrite"):
        export_ocp(file_src, tmp_path / "x.lmdb", progress=False)
    assert (tmp_path / "x.lmdb").read_bytes() == b"old"
    export_ocp(file_src, tmp_path / "x.lmdb", overwrite=True, progress=False)
    assert len(LmdbDataset(tmp_path / "x.lmdb")) == 5


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_output_never_replaces_the_input(tmp_path: Path, where: str) -> None:
    src, _ = _source(tmp_path, "s2ef", edges=False)
    out = {"same": src, "parent": src.parent, "inside": src / "ocp"}[where]
    before = {path.name: path.read_bytes() for path in src.iterdir()}
    with pytest.raises(DataError, match="input"):
        export_ocp(src, out, overwrite=True, progress=False)
    assert {path.name: path.read_bytes() for path in src.iterdir()} == before


def test_single_file_to_a_folder_is_refused(tmp_path: Path) -> None:
    src, _ = _source(tmp_path, "is2re-file", edges=False)
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match=r"data\.lmdb"):
        export_ocp(src, tmp_path / "dir", progress=False)


@pytest.mark.parametrize("layout", ["s2ef", "is2re-file"])
def test_bad_entry_leaves_no_output(tmp_path: Path, layout: str) -> None:
    src, _ = _source(tmp_path, layout, edges=False)
    bad = src if src.is_file() else sorted(src.glob("*.lmdb"))[-1]
    env = lmdb.open(str(bad), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        fields = pickle.loads(txn.get(b"0"))
        fields["pos"] = np.full_like(fields["pos"], np.nan)
        txn.put(b"0", dumps_entry(fields))
    env.close()
    out = tmp_path / "out" / src.name
    with pytest.raises(DataError, match=rf"{bad.name} entry 0"):
        export_ocp(src, out, progress=False)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
