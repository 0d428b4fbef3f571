"""Safe (de)serialisation of LMDB values: catforge dicts and OCP's pickled torch_geometric ``Data``.

catforge writes each value as ``pickle.dumps(dict_of_numpy_arrays, protocol=5)``. OCP/OC20 files
hold pickled ``torch_geometric.data.Data`` objects instead, in the PyG >= 2 layout (attributes in
``Data._store._mapping``) or the PyG 1.x layout (attributes directly in ``Data.__dict__``).

Both are read with a restricted unpickler: ``find_class`` resolves only an explicit allow-list
(numpy array rebuilders, torch tensor rebuilders and storage classes, ``OrderedDict``,
``torch.Size``), and PyG classes map to small shim classes here, so torch_geometric is never
imported. Nested torch storages (``torch.storage._load_from_bytes``, a legacy ``torch.save``) are
decoded directly when they have the plain one-storage layout, else by
``torch.load(..., weights_only=True)``. Any other global raises :class:`DataError` unexecuted.
"""

from __future__ import annotations

import codecs
import io
import logging
import pickle
import re
import sys
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catforge.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["dumps_entry", "loads_entry", "loads_pickle_file", "normalize_id"]

PROTOCOL = 5
"""Pickle protocol of the values catforge writes."""

_DROPPED_KEYS = frozenset({"__num_nodes__", "_parent", "_edge_attr_cls", "_tensor_attr_cls"})
_ID_KEYS = ("sid", "fid")
_ID_PATTERN = re.compile(r"\s*[A-Za-z_]*(\d+)\s*")
_INT64_MAX = 2**63 - 1
_warned: set[str] = set()


class _PygData:
    """Shim for ``torch_geometric.data.data.Data`` (both pickle layouts); holds the raw state."""

    __slots__ = ("state",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
            state = state[1]  # (None, slotstate) from objects with __slots__
        self.state = state

    def mapping(self) -> dict[Any, Any] | None:
        """The attribute dict (PyG >= 2: ``_store._mapping``; PyG 1.x: the instance dict)."""
        state = getattr(self, "state", None)
        if not isinstance(state, dict):
            return None
        store = state.get("_store")
        if isinstance(store, _PygStorage):
            return getattr(store, "mapping", None)
        return None if "_store" in state else state


class _PygStorage:
    """Shim for PyG's ``GlobalStorage``: keeps ``_mapping``, drops the ``_parent`` back-link."""

    __slots__ = ("mapping",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.mapping: dict[Any, Any] | None = None

    def __setstate__(self, state: Any) -> None:
        mapping = state.get("_mapping") if isinstance(state, dict) else None
        self.mapping = mapping if isinstance(mapping, dict) else None


class _PygPlaceholder:
    """Shim for PyG classes that pickles only reference (``DataEdgeAttr``, ``TensorAttr``, ...)."""

    __slots__ = ()


def _load_storage_bytes(data: bytes) -> Any:
    """Safe stand-in for ``torch.storage._load_from_bytes`` (a nested legacy ``torch.save``).

    The plain one-storage layout is decoded directly (several times faster); anything else goes
    to ``torch.load(..., weights_only=True)``.
    """
    if not isinstance(data, bytes | bytearray):
        raise DataError(f"a nested tensor storage must be bytes, got {type(data).__name__}")
    try:
        return _read_legacy_storage(data)
    except Exception:
        pass
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(
            f"nested tensor storage is corrupt or not allowed ({_brief(error)})"
        ) from None


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _brief(error: Exception) -> str:
    """``Type: the most informative line`` of an exception message (torch's are long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_BOILERPLATE)]
    detail = (useful or lines or [""])[0][:200]
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_VERSION = 1001
_STORAGE_DTYPES = {
    ("torch", f"{kind}Storage"): getattr(torch, dtype)
    for kind, dtype in (
        ("Double", "float64"),
        ("Float", "float32"),
        ("Half", "float16"),
        ("BFloat16", "bfloat16"),
        ("Long", "int64"),
        ("Int", "int32"),
        ("Short", "int16"),
        ("Char", "int8"),
        ("Byte", "uint8"),
        ("Bool", "bool"),
        ("ComplexDouble", "complex128"),
        ("ComplexFloat", "complex64"),
    )
}


class _StorageUnpickler(pickle.Unpickler):
    """Reads the small pickles of a legacy ``torch.save`` of one typed storage, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        return _STORAGE_DTYPES[(module, name)]  # KeyError: not plain, let torch.load decide

    def persistent_load(self, pid: Any) -> Any:
        _, dtype, key, _, numel, view = pid
        if pid[0] != "storage" or not isinstance(dtype, torch.dtype) or view is not None:
            raise ValueError("not a plain typed storage")
        return ("storage", dtype, key, int(numel))


def _read_legacy_storage(data: bytes | bytearray) -> torch.storage.TypedStorage:
    """Decode magic, version, sys info, storage reference, key list, then the raw bytes."""
    stream = io.BytesIO(data)
    unpickler = _StorageUnpickler(stream)
    if unpickler.load() != _LEGACY_MAGIC or unpickler.load() != _LEGACY_VERSION:
        raise ValueError("not a legacy torch.save stream")
    info = unpickler.load()
    if sys.byteorder != "little" or not isinstance(info, dict) or not info.get("little_endian"):
        raise ValueError("not little-endian")
    ref = unpickler.load()
    if type(ref) is not tuple or unpickler.load() != [ref[2]]:
        raise ValueError("not a single storage")
    _, dtype, _, numel = ref
    start = stream.tell() + 8
    nbytes = numel * dtype.itemsize
    header = int.from_bytes(data[start - 8 : start], "little", signed=True)
    if header != numel or start + nbytes != len(data):
        raise ValueError("storage size does not match the data")
    untyped = torch.UntypedStorage.from_buffer(
        data, byte_order="little", offset=start, count=nbytes, dtype=torch.uint8
    )
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """numpy's array/scalar/dtype rebuilders under both the numpy 1.x and 2.x module names."""
    numpy2 = int(np.__version__.split(".")[0]) >= 2
    core = np._core if numpy2 else np.core  # type: ignore[attr-defined]
    multiarray, numeric = core.multiarray, core.numeric
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for prefix in ("numpy.core", "numpy._core"):
        table[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


_DTYPE_NAMES = (
    *("float64", "float32", "float16", "bfloat16", "double", "float", "half", "bool"),
    *("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "long", "int"),
    *("short", "complex64", "complex128", "cfloat", "cdouble"),
)


def _torch_globals() -> dict[tuple[str, str], Any]:
    """Tensor rebuilders, storage classes, dtypes and ``torch.Size``."""
    utils = torch._utils
    table: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): utils._rebuild_tensor_v3,
        ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
        ("torch", "Size"): torch.Size,
        ("torch", "UntypedStorage"): torch.UntypedStorage,
        ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
        ("torch.storage", "TypedStorage"): torch.storage.TypedStorage,
    }
    for module, name in _STORAGE_DTYPES:
        table[(module, name)] = getattr(torch, name)
    for name in _DTYPE_NAMES:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            table[("torch", name)] = dtype
    return table


def _pyg_globals() -> dict[tuple[str, str], Any]:
    """torch_geometric classes found in OCP pickles, mapped to the shims above."""
    return {
        ("torch_geometric.data.data", "Data"): _PygData,
        ("torch_geometric.data.storage", "GlobalStorage"): _PygStorage,
        ("torch_geometric.data.data", "DataEdgeAttr"): _PygPlaceholder,
        ("torch_geometric.data.data", "DataTensorAttr"): _PygPlaceholder,
        ("torch_geometric.data.graph_store", "EdgeAttr"): _PygPlaceholder,
        ("torch_geometric.data.feature_store", "TensorAttr"): _PygPlaceholder,
    }


ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles
    ("builtins", "bytearray"): bytearray,
    **_numpy_globals(),
    **_torch_globals(),
    **_pyg_globals(),
}
"""Every ``(module, name)`` a pickled value may reference, and what it resolves to."""


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and has no persistent ids."""

    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise DataError(
                f"{self.source}: refusing to unpickle forbidden global '{module}.{name}' "
                "(not a catforge or OCP data entry?)"
            )
        return found


def _unpickle(raw: bytes | bytearray | memoryview, source: str) -> Any:
    """Run the restricted unpickler; any failure becomes a one-line DataError."""
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), source).load()
    except DataError as error:
        if str(error).startswith(source):
            raise
        raise DataError(f"{source}: {error}") from None
    except Exception as error:  # corrupt input can raise nearly anything
        raise DataError(f"{source}: corrupt or truncated pickle ({_brief(error)})") from None


def loads_entry(raw: bytes | bytearray | memoryview, source: str) -> dict[str, Any]:
    """Decode one LMDB value (a catforge dict or a pickled PyG ``Data``) to a plain dict.

    Values are numpy arrays or Python scalars (tensors become numpy arrays); PyG bookkeeping
    keys and ``None`` values are dropped; string ``sid``/``fid`` become ints (see
    :func:`normalize_id`). Raises :class:`DataError` naming ``source`` on any problem.
    """
    return _to_fields(_unpickle(raw, source), source)


def loads_pickle_file(path: str | Path) -> list[dict[str, Any]]:
    """Decode a pickled list of PyG ``Data`` (or dicts), the legacy OCP in-memory layout."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read pickle file ({error.strerror or error})") from None
    value = _unpickle(raw, str(path))
    if not isinstance(value, list | tuple):
        raise DataError(
            f"{path}: expected a pickled list of Data objects, got {type(value).__name__}"
        )
    return [_to_fields(item, f"{path} item {index}") for index, item in enumerate(value)]


def dumps_entry(fields: Mapping[str, Any]) -> bytes:
    """Encode a dict of field name -> numpy array (tensors are converted) as catforge stores it."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        out[name] = value
    return pickle.dumps(out, protocol=PROTOCOL)


def _to_fields(value: Any, source: str) -> dict[str, Any]:
    """Turn an unpickled dict or Data shim into field name -> numpy array / Python scalar."""
    if isinstance(value, _PygData):
        mapping = value.mapping()
        if mapping is None:
            raise DataError(f"{source}: pickled Data object has no readable attributes")
    elif type(value) is dict:
        mapping = value
    else:
        kind = type(value).__name__
        raise DataError(
            f"{source}: expected a dict of arrays or a torch_geometric Data, got {kind}"
        )
    fields: dict[str, Any] = {}
    for name, item in mapping.items():
        if type(item) is np.ndarray and type(name) is str:  # fast path: catforge values
            fields[name] = item
            continue
        if not isinstance(name, str):
            raise DataError(f"{source}: field names must be strings, got {name!r}")
        if item is None or name in _DROPPED_KEYS:
            continue
        converted = _convert(item)
        if converted is not None:
            fields[name] = converted
        else:
            log.debug("%s: dropping field '%s' of type %s", source, name, type(item).__name__)
    for name in _ID_KEYS:
        if isinstance(fields.get(name), str):
            fields[name] = normalize_id(fields[name], name)
    return fields


def _convert(item: Any) -> Any:
    """One attribute value as a numpy array or Python scalar, or ``None`` to drop it."""
    if isinstance(item, torch.Tensor):
        tensor = item.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError:  # no numpy dtype (e.g. bfloat16)
            return tensor.float().numpy()
    if isinstance(item, bool | int | float | str | np.ndarray):
        return item
    if isinstance(item, np.generic):
        return item.item()
    if isinstance(item, list | tuple):
        array = np.asarray(item) if item else np.zeros(0)
        return None if array.dtype == object else array
    return None


def normalize_id(value: str, name: str = "sid") -> int:
    """An integer id from a string id.

    ``"1234"`` and prefixed ids like ``"random1234"`` give the digits as an int. Any other string
    (or digits beyond int64) gives ``zlib.crc32`` of its UTF-8 bytes, a stable but non-unique
    hash; a warning is logged once per field name.
    """
    match = _ID_PATTERN.fullmatch(value)
    if match is not None and int(match.group(1)) <= _INT64_MAX:
        return int(match.group(1))
    if name not in _warned:
        _warned.add(name)
        log.warning(
            "'%s' value %r is not an integer or 'random<digits>'; using zlib.crc32 of the string "
            "(stable, but distinct ids may collide). Further such ids are converted silently.",
            name,
            value,
        )
    return zlib.crc32(value.encode("utf-8"))
