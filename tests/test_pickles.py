"""Tests for catforge.data.pickles: catforge dicts, PyG Data pickles, restricted loading."""

from __future__ import annotations

import ast
import io
import logging
import os
import pickle
import subprocess
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from catforge.data import pickles
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb import LmdbDataset
from catforge.data.pickles import dumps_entry, loads_entry, loads_pickle_file, normalize_id
from catforge.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LEGACY_LMDB = DATA / "legacy_lmdb" / "is2re_custom.lmdb"
OC22_PICKLE = DATA / "oc22" / "oc22_pickle16_train.pkl"


class _Reduce:
    """Pickles as ``func(*args)``: how malicious pickles run code."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _ocp_tensors(n_atoms: int = 6, n_edges: int = 10, seed: int = 0) -> dict[str, Any]:
    """Fields as OCP's AtomsToGraphs stores them (float atomic numbers and fixed, int natoms)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "pos": torch.rand(n_atoms, 3, generator=gen) * 5,
        "cell": (torch.eye(3) * 7.5).view(1, 3, 3),
        "atomic_numbers": torch.tensor([8.0, 1.0, 29.0, 29.0, 29.0, 78.0])[:n_atoms],
        "natoms": n_atoms,
        "y": -1.25,
        "force": torch.randn(n_atoms, 3, generator=gen),
        "fixed": torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])[:n_atoms],
        "tags": torch.tensor([2, 2, 0, 0, 1, 0])[:n_atoms],
        "sid": 1234,
        "fid": 7,
        "edge_index": torch.randint(0, n_atoms, (2, n_edges), generator=gen),
        "cell_offsets": torch.randint(-1, 2, (n_edges, 3), generator=gen),
    }


def _assert_graph_matches(graph: AtomicGraph, original: dict[str, Any]) -> None:
    """Field-by-field comparison of a decoded graph with OCP-style originals."""
    assert torch.equal(graph.pos, original["pos"])
    assert graph.atomic_numbers.dtype == torch.long
    assert torch.equal(graph.atomic_numbers, original["atomic_numbers"].long())
    assert graph.fixed.dtype == torch.bool
    assert torch.equal(graph.fixed, original["fixed"] != 0)
    assert graph.cell.shape == (1, 3, 3)
    assert torch.equal(graph.cell, original["cell"])
    assert torch.equal(graph.tags, original["tags"].long())
    assert graph.natoms.tolist() == [original["natoms"]]
    assert graph.y.tolist() == pytest.approx([original["y"]])
    assert torch.equal(graph.force, original["force"])
    assert graph.sid.tolist() == [original["sid"]]
    assert graph.fid.tolist() == [original["fid"]]
    assert torch.equal(graph.edge_index, original["edge_index"])
    assert torch.equal(graph.cell_offsets, original["cell_offsets"])


def _assert_same_as_pyg(fields: dict[str, Any], reference: dict[str, Any]) -> None:
    """Decoded fields equal what real torch_geometric unpickling gives (None values dropped)."""
    expected = {key: value for key, value in reference.items() if value is not None}
    assert set(fields) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(fields[key], np.ndarray), key
            assert fields[key].dtype == value.numpy().dtype, key
            np.testing.assert_array_equal(fields[key], value.numpy(), err_msg=key)
        else:
            assert fields[key] == value, key


@pytest.fixture(scope="module")
def pyg_data() -> type:
    return pytest.importorskip("torch_geometric.data").Data


# --- catforge's own layout -------------------------------------------------------------------


def test_round_trip_catforge_dict() -> None:
    original = AtomicGraph.from_fields(_ocp_tensors(), source="test")
    raw = dumps_entry(original.to_fields())
    fields = loads_entry(raw, source="mem entry 0")
    assert all(type(value) is np.ndarray and value.flags.writeable for value in fields.values())
    decoded = AtomicGraph.from_fields(fields, source="mem entry 0")
    assert decoded.present() == original.present()
    for name in original.present():
        assert torch.equal(getattr(decoded, name), getattr(original, name)), name
    assert pickle.loads(raw).keys() == fields.keys()  # plain protocol-5 pickle of a dict


def test_dumps_entry_converts_tensors() -> None:
    fields = loads_entry(dumps_entry({"pos": torch.ones(2, 3), "sid": np.array([5])}), "mem")
    assert fields["pos"].dtype == np.float32 and fields["pos"].shape == (2, 3)
    assert fields["sid"].tolist() == [5]


# --- real torch_geometric pickles ------------------------------------------------------------


def test_pyg2_layout_from_real_torch_geometric(pyg_data: type) -> None:
    original = _ocp_tensors()
    raw = pickle.dumps(pyg_data(**original, nads=1, id="0_0"), protocol=pickle.HIGHEST_PROTOCOL)
    fields = loads_entry(raw, source="pyg2")
    assert fields["nads"] == 1 and fields["id"] == "0_0"
    assert "_store" not in fields and "_edge_attr_cls" not in fields
    _assert_graph_matches(AtomicGraph.from_fields(fields, source="pyg2"), original)


def test_pyg1_layout(pyg_data: type) -> None:
    original = _ocp_tensors()
    state = {"x": None, "edge_attr": None, "normal": None, "face": None, "__num_nodes__": None}
    state.update(original)
    data = pyg_data.__new__(pyg_data)
    data.__dict__.update(state)  # the instance dict of a PyG 1.x Data
    raw = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
    fields = loads_entry(raw, source="pyg1")
    assert set(fields) == set(original)
    _assert_graph_matches(AtomicGraph.from_fields(fields, source="pyg1"), original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bool])
def test_pyg_extra_dtypes(pyg_data: type, dtype: torch.dtype) -> None:
    value = (torch.arange(6).reshape(2, 3) % 2).to(dtype)
    fields = loads_entry(pickle.dumps(pyg_data(extra=value, empty=value[:0])), source="dtypes")
    np.testing.assert_array_equal(fields["extra"], value.numpy())
    assert fields["extra"].dtype == value.numpy().dtype
    assert fields["empty"].shape == (0, 3)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
     torch.uint8, torch.bool],
)  # fmt: skip
@pytest.mark.parametrize("numel", [0, 1, 7])
def test_fast_storage_path_matches_torch_load(dtype: torch.dtype, numel: int) -> None:
    tensor = (torch.randn(numel) * 10).to(dtype)
    nested = tensor._typed_storage().__reduce__()[1][0]  # legacy torch.save bytes, as in pickles
    fast = pickles._read_legacy_storage(nested)
    slow = torch.load(io.BytesIO(nested), weights_only=True)
    assert fast.dtype == slow.dtype == dtype
    as_tensor = [torch.empty(0, dtype=dtype).set_(s._untyped_storage) for s in (fast, slow)]
    assert torch.equal(*as_tensor)


# --- real files ------------------------------------------------------------------------------


def _legacy_lmdb_values() -> list[tuple[bytes, bytes]]:
    if not LEGACY_LMDB.exists():
        pytest.skip(f"{LEGACY_LMDB} is absent")
    # Through the dataset's shared environment: LMDB allows one open environment per file and
    # process, and other tests of this process may hold it already.
    dataset = LmdbDataset(LEGACY_LMDB)
    return [(str(index).encode(), dataset.raw(index)) for index in range(len(dataset))]


def test_legacy_is2re_lmdb_decodes() -> None:
    values = _legacy_lmdb_values()
    assert sorted(int(key) for key, _ in values) == list(range(32))
    for key, raw in values:
        source = f"{LEGACY_LMDB.name} entry {key.decode()}"
        graph = AtomicGraph.from_fields(loads_entry(raw, source=source), source=source)
        assert graph.n_atoms > 0 and graph.n_edges > 0
        for name in ("y_init", "y_relaxed", "edge_index", "cell_offsets", "sid", "tags", "fixed"):
            assert getattr(graph, name) is not None, (source, name)


def test_legacy_is2re_lmdb_matches_torch_geometric(pyg_data: type) -> None:
    for key, raw in _legacy_lmdb_values():
        reference = pickle.loads(raw)  # real torch_geometric + unrestricted torch unpickling
        assert isinstance(reference, pyg_data)
        _assert_same_as_pyg(loads_entry(raw, source=key.decode()), reference.to_dict())


def test_oc22_pickle_file(pyg_data: type) -> None:
    if not OC22_PICKLE.exists():
        pytest.skip(f"{OC22_PICKLE} is absent")
    entries = loads_pickle_file(OC22_PICKLE)
    references = pickle.loads(OC22_PICKLE.read_bytes())
    assert len(entries) == len(references) == 16
    for index, (fields, reference) in enumerate(zip(entries, references, strict=True)):
        _assert_same_as_pyg(fields, reference.to_dict())
        graph = AtomicGraph.from_fields(fields, source=f"oc22 item {index}")
        assert graph.y is not None and graph.force is not None
        assert graph.fid is not None and graph.sid is not None
        assert graph.force.shape == graph.pos.shape


# --- safety and errors -----------------------------------------------------------------------


def test_module_never_imports_torch_geometric() -> None:
    tree = ast.parse(Path(pickles.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(alias.name.startswith("torch_geometric") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("torch_geometric")


def _malicious(marker: Path) -> list[tuple[bytes, str]]:
    command = f"touch {marker}"
    return [
        (f"cos\nsystem\n(S'{command}'\ntR.".encode(), "os.system"),
        (pickle.dumps(_Reduce(os.system, (command,))), "system"),
        (pickle.dumps(_Reduce(eval, (f"__import__('os').system('{command}')",))), "builtins.eval"),
        (pickle.dumps({"pos": _Reduce(subprocess.call, (["touch", str(marker)],))}), "subprocess"),
    ]


def test_malicious_globals_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for raw, name in _malicious(marker):
        with pytest.raises(DataError, match="forbidden global") as info:
            loads_entry(raw, source="evil.lmdb entry 3")
        assert name in str(info.value) and str(info.value).startswith("evil.lmdb entry 3")
        assert not marker.exists()
    (tmp_path / "evil.pkl").write_bytes(_malicious(marker)[2][0])
    with pytest.raises(DataError, match=r"evil\.pkl.*builtins\.eval"):
        loads_pickle_file(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_malicious_nested_storage_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    nested = b"".join(
        pickle.dumps(part, protocol=2)
        for part in (pickles._LEGACY_MAGIC, 1001, info, _Reduce(os.system, (f"touch {marker}",)))
    )
    good = torch.ones(4)._typed_storage().__reduce__()[1][0]
    cases = [(nested, "(os|posix).system"), (good[:-3], "nested tensor storage is corrupt")]
    for payload, pattern in cases:
        raw = pickle.dumps(_Reduce(torch.storage._load_from_bytes, (payload,)))
        with pytest.raises(DataError, match=rf"^nested\.lmdb entry 0: .*{pattern}") as error:
            loads_entry(raw, source="nested.lmdb entry 0")
        assert "\n" not in str(error.value)
    assert not marker.exists()


def test_truncated_and_garbage_bytes(pyg_data: type) -> None:
    catforge_raw = dumps_entry(AtomicGraph.from_fields(_ocp_tensors()).to_fields())
    pyg_raw = pickle.dumps(pyg_data(**_ocp_tensors()))
    cases = [catforge_raw[: len(catforge_raw) // 2], pyg_raw[:-1], pyg_raw[: len(pyg_raw) // 3]]
    for raw in [*cases, b"", b"not a pickle at all"]:
        with pytest.raises(DataError, match=r"^data\.lmdb entry 9: ") as info:
            loads_entry(raw, source="data.lmdb entry 9")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [[1, 2], 5, "text", (np.zeros(3),)])
def test_value_that_is_not_a_dict_or_data(value: Any) -> None:
    with pytest.raises(DataError, match=r"x\.lmdb entry 1: expected a dict"):
        loads_entry(pickle.dumps(value, protocol=5), source="x.lmdb entry 1")


def test_pickle_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        loads_pickle_file(tmp_path / "missing.pkl")
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"pos": np.zeros((1, 3))}))
    with pytest.raises(DataError, match="expected a pickled list"):
        loads_pickle_file(tmp_path / "dict.pkl")


# --- sid handling ----------------------------------------------------------------------------


def test_sid_strings(
    pyg_data: type, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pickles, "_warned", set())
    assert normalize_id("1234") == 1234
    assert normalize_id("random1234") == 1234
    assert normalize_id(" random0042 ") == 42
    fields = loads_entry(pickle.dumps(pyg_data(pos=torch.zeros(1, 3), sid="random77")), "s")
    assert fields["sid"] == 77
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="catforge.data.pickles"):
        assert normalize_id("mp-1234_ads") == zlib.crc32(b"mp-1234_ads")
        assert normalize_id("other") == zlib.crc32(b"other")
        assert normalize_id("9" * 30) == zlib.crc32(b"9" * 30)  # beyond int64
    assert len(caplog.records) == 1 and "crc32" in caplog.records[0].getMessage()
    fields = loads_entry(dumps_entry({"pos": np.zeros((1, 3)), "sid": np.array([3])}), "s")
    assert fields["sid"].tolist() == [3]  # arrays are left alone
