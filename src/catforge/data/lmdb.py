"""LMDB storage of atomic graphs: a batched atomic writer and a lazily opened, concatenating reader.

Layout (compatible with OCP's): keys are ASCII decimals ``b"0".. b"N-1"``, each value one structure
(a pickled dict of numpy arrays; OC20's pickled torch_geometric ``Data`` values are read too), plus
``b"length"`` (the entry count) and ``b"metadata"`` (per-entry ``natoms`` and ``neighbors``, for
load balancing). A dataset is one ``.lmdb`` file or a folder of them, concatenated in sorted order.
"""

from __future__ import annotations

import bisect
import logging
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from catforge.data.graph import AtomicGraph
from catforge.data.pickles import dumps_entry, loads_entry
from catforge.errors import DataError

log = logging.getLogger(__name__)

LENGTH_KEY = b"length"
METADATA_KEY = b"metadata"
_MAP_SIZE = 1 << 40  # 1 TiB of address space; the file only grows as data is written


class LmdbWriter:
    """Write structures to one ``.lmdb`` file in batched transactions.

    Data goes to ``<path>.partial`` and is renamed to ``path`` by :meth:`close`, so an interrupted
    write never leaves a file that looks complete. Used as a context manager, an exception discards
    the partial file.
    """

    def __init__(self, path: str | Path, *, commit_every: int = 1000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._partial.unlink(missing_ok=True)
        self._env = lmdb.open(
            str(self._partial), map_size=_MAP_SIZE, subdir=False, meminit=False, lock=False
        )
        self._commit_every = commit_every
        self._txn = self._env.begin(write=True)
        self._pending = 0
        self._natoms: list[int] = []
        self._neighbors: list[int] = []

    def __len__(self) -> int:
        return len(self._natoms)

    def write(self, graph: AtomicGraph) -> None:
        """Append one structure (a graph with ``n_graphs == 1``)."""
        index = len(self._natoms)
        self._txn.put(str(index).encode("ascii"), dumps_entry(graph.to_fields()))
        self._natoms.append(graph.n_atoms)
        self._neighbors.append(graph.n_edges)
        self._pending += 1
        if self._pending >= self._commit_every:
            self._txn.commit()
            self._txn = self._env.begin(write=True)
            self._pending = 0

    def close(self) -> None:
        """Write the length and metadata keys, flush, and move the file into place."""
        metadata = {
            "natoms": np.asarray(self._natoms, dtype=np.int64),
            "neighbors": np.asarray(self._neighbors, dtype=np.int64),
        }
        self._txn.put(LENGTH_KEY, pickle.dumps(len(self._natoms), protocol=5))
        self._txn.put(METADATA_KEY, dumps_entry(metadata))
        self._txn.commit()
        self._env.sync()
        self._env.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Discard everything written so far."""
        self._txn.abort()
        self._env.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> LmdbWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_lmdb(graphs: Iterable[AtomicGraph], path: str | Path) -> int:
    """Write structures to one ``.lmdb`` file; return how many were written."""
    with LmdbWriter(path) as writer:
        for graph in graphs:
            writer.write(graph)
        return len(writer)


def shard_path(out_dir: str | Path, index: int) -> Path:
    """The OCP shard name ``data.NNNN.lmdb`` inside ``out_dir``."""
    return Path(out_dir) / f"data.{index:04d}.lmdb"


def write_shards(graphs: Iterable[AtomicGraph], out_dir: str | Path, n_shards: int) -> list[Path]:
    """Write structures round-robin to ``n_shards`` files ``data.NNNN.lmdb`` in ``out_dir``."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, got {n_shards}")
    writers = [LmdbWriter(shard_path(out_dir, index)) for index in range(n_shards)]
    try:
        for index, graph in enumerate(graphs):
            writers[index % n_shards].write(graph)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        writer.close()
    return [writer.path for writer in writers]


def lmdb_files(src: str | Path) -> list[Path]:
    """The ``.lmdb`` files of a dataset path (one file, or a folder's ``*.lmdb`` sorted by name)."""
    path = Path(src)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the dataset 'src' path")
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.lmdb"))
    if not files:
        raise DataError(f"{path}: folder holds no *.lmdb files; run 'catforge data ingest' first")
    return files


_READERS: dict[Path, lmdb.Environment] = {}
_READERS_PID = os.getpid()


def _reader(path: Path) -> lmdb.Environment:
    """This process's read-only environment of ``path``, opened on first use and then shared.

    LMDB allows one environment per file and process, so every dataset over the same file shares
    it; after a ``fork`` the child drops the inherited handles and opens its own.
    """
    global _READERS_PID
    if os.getpid() != _READERS_PID:
        _READERS.clear()
        _READERS_PID = os.getpid()
    key = path.resolve()
    env = _READERS.get(key)
    if env is None:
        env = _READERS[key] = _open_env(path)
    return env


def _open_env(path: Path) -> lmdb.Environment:
    """Open read-only, refusing a file shorter than its own page table says (truncated)."""
    try:
        env = lmdb.open(
            str(path),
            subdir=False,
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            max_readers=1,
        )
    except lmdb.Error as error:
        raise DataError(
            f"{path}: not a readable LMDB file (corrupt or truncated?): {error}"
        ) from error
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if path.stat().st_size < needed:
        env.close()
        raise DataError(
            f"{path}: LMDB file is truncated ({path.stat().st_size} of {needed} bytes); "
            "copy or regenerate it"
        )
    return env


def _read_length(env: lmdb.Environment, path: Path) -> int:
    """Entry count: the ``length`` key if present (OCP S2EF, catforge), else the key count."""
    with env.begin() as txn:
        raw = txn.get(LENGTH_KEY)
        if raw is None:
            return int(env.stat()["entries"]) - (txn.get(METADATA_KEY) is not None)
    try:
        length = pickle.loads(raw)
    except Exception as error:
        raise DataError(f"{path}: the 'length' key is unreadable: {error}") from error
    if not isinstance(length, int) or length < 0:
        raise DataError(f"{path}: the 'length' key holds {length!r}, expected a count")
    return length


class LmdbDataset(Dataset[AtomicGraph]):
    """Structures from one ``.lmdb`` file or a folder of them, with a stable global index.

    Environments are opened lazily in each process (checked by pid) and shared by all datasets of
    that process, so the dataset works in DataLoader workers and under DDP without using LMDB
    handles across ``fork``.
    """

    def __init__(self, src: str | Path, *, float_dtype: torch.dtype = torch.float32) -> None:
        self.src = Path(src)
        self.files = lmdb_files(self.src)
        self.float_dtype = float_dtype
        lengths = [_read_length(_reader(path), path) for path in self.files]
        self._offsets = np.cumsum([0, *lengths]).tolist()
        self._metadata: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, index within that file) of a global index."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} entries in {self.src}")
        index %= len(self)
        file_index = bisect.bisect_right(self._offsets, index) - 1
        return file_index, index - self._offsets[file_index]

    def _env(self, file_index: int) -> lmdb.Environment:
        return _reader(self.files[file_index])

    def raw(self, index: int) -> bytes:
        """The stored bytes of one entry."""
        file_index, local = self.locate(index)
        with self._env(file_index).begin() as txn:
            raw = txn.get(str(local).encode("ascii"))
        if raw is None:
            path = self.files[file_index]
            raise DataError(f"{path}: entry {local} is missing (truncated file?)")
        return bytes(raw)

    def fields(self, index: int) -> dict[str, Any]:
        """One entry as a dict of field name -> array or scalar (no validation)."""
        file_index, local = self.locate(index)
        return loads_entry(self.raw(index), source=f"{self.files[file_index]} entry {local}")

    def __getitem__(self, index: int) -> AtomicGraph:
        file_index, local = self.locate(index)
        source = f"{self.files[file_index]} entry {local}"
        fields = loads_entry(self.raw(index), source=source)
        return AtomicGraph.from_fields(fields, source=source, float_dtype=self.float_dtype)

    @property
    def metadata(self) -> dict[str, np.ndarray]:
        """Per-entry ``natoms`` and ``neighbors`` (edge counts), from the files or by a scan."""
        if self._metadata is None:
            parts = [self._file_metadata(index) for index in range(len(self.files))]
            self._metadata = {
                name: np.concatenate([part[name] for part in parts])
                for name in ("natoms", "neighbors")
            }
        return self._metadata

    def _file_metadata(self, file_index: int) -> dict[str, np.ndarray]:
        path = self.files[file_index]
        with self._env(file_index).begin() as txn:
            raw = txn.get(METADATA_KEY)
        if raw is not None:
            return loads_entry(bytes(raw), source=f"{path} metadata")
        log.info("%s has no stored metadata; scanning its entries for natoms/neighbors", path)
        start, stop = self._offsets[file_index], self._offsets[file_index + 1]
        graphs = [self[index] for index in range(start, stop)]
        return {
            "natoms": np.array([graph.n_atoms for graph in graphs], dtype=np.int64),
            "neighbors": np.array([graph.n_edges for graph in graphs], dtype=np.int64),
        }
