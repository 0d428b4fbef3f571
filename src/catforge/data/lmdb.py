"""LMDB storage of atomic graphs: a validating batched writer and a lazily opened, concatenating,
checksum-verifying reader.

Layout (OCP's keys): keys are ASCII decimals ``b"0".. b"N-1"``, each value one structure
(a pickled dict of numpy arrays; OC20's pickled torch_geometric ``Data`` values are read too), plus
``b"length"`` (the entry count), ``b"metadata"`` (per-entry ``natoms`` and ``neighbors``, for
load balancing) and ``b"checksums"``: N + 2 little-endian uint32, the ``zlib.crc32`` of each
entry's value in key order, of the ``metadata`` value, and of the preceding 4 (N + 1) bytes.
LMDB keeps no checksums of its own; files without the key (OCP's, older catforge files) are read
unverified. A dataset is one ``.lmdb`` file or a folder of them, concatenated in sorted order.

Every error about one entry is a DataError whose message starts ``<file> entry <N>: `` or
``<file> entry <N> (sid <sid>): `` (N counts within that file); LMDB's own errors on a damaged
file become a DataError naming the file.
"""

from __future__ import annotations

import bisect
import logging
import os
import pickle
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from catforge.data import keys
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb_store import (
    CHECKSUMS_KEY,
    LENGTH_KEY,
    METADATA_KEY,
    corrupt,
    corruption_named,
    lmdb_files,
    pack_checksums,
    read_checksums,
    read_length,
    reader,
)
from catforge.data.pickles import dumps_entry, loads_entry
from catforge.errors import DataError
from catforge.runtime.progress import progress

log = logging.getLogger(__name__)

_MAP_SIZE = 1 << 40  # 1 TiB of address space; the file only grows as data is written


class LmdbWriter:
    """Write structures to one ``.lmdb`` file in batched transactions.

    Data goes to ``<path>.partial`` and is renamed to ``path`` by :meth:`close`, so an interrupted
    write never leaves a file that looks complete. Used as a context manager, an exception discards
    the partial file. Each value's CRC32 is kept and stored under ``checksums`` by :meth:`close`.
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
        self._checksums: list[int] = []

    def __len__(self) -> int:
        return len(self._natoms)

    def write(self, graph: AtomicGraph) -> None:
        """Validate and append one structure (a graph with ``n_graphs == 1``).

        An invalid graph (NaN/inf, Z outside 1..118, no atoms, bad shapes) raises DataError
        ``<path> entry <N> (sid <sid>): <reason>`` and is not written; the writer stays usable.
        """
        index = len(self._natoms)
        graph.validate(_entry_name(str(self.path), index, _sid(graph.sid)))
        value = dumps_entry(graph.to_fields())
        self._txn.put(str(index).encode("ascii"), value)
        self._checksums.append(zlib.crc32(value))
        self._natoms.append(graph.n_atoms)
        self._neighbors.append(graph.n_edges)
        self._pending += 1
        if self._pending >= self._commit_every:
            self._txn.commit()
            self._txn = self._env.begin(write=True)
            self._pending = 0

    def close(self) -> None:
        """Write the length, metadata and checksums keys, flush, and move the file into place."""
        metadata = dumps_entry(
            {
                "natoms": np.asarray(self._natoms, dtype=np.int64),
                "neighbors": np.asarray(self._neighbors, dtype=np.int64),
            }
        )
        self._txn.put(LENGTH_KEY, pickle.dumps(len(self._natoms), protocol=5))
        self._txn.put(METADATA_KEY, metadata)
        self._txn.put(CHECKSUMS_KEY, pack_checksums(self._checksums, metadata))
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


@dataclass(frozen=True)
class BadEntry:
    """An entry that cannot be used: its file, index in that file, sid (when readable), why."""

    file: str
    entry: int
    sid: int | None
    reason: str

    def __str__(self) -> str:
        return f"{_entry_name(self.file, self.entry, self.sid)}: {self.reason}"


def _entry_name(file: str, entry: int, sid: int | None) -> str:
    return f"{file} entry {entry}" + ("" if sid is None else f" (sid {sid})")


def _sid(value: Any) -> int | None:
    """An entry's ``sid`` when it is one integer (array, tensor or scalar), else None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value) if value is not None else np.zeros(0)
    return int(array.reshape(-1)[0]) if array.size == 1 and array.dtype.kind in "iu" else None


_MISMATCH = "stored bytes do not match their checksum (the file is corrupt; copy or regenerate it)"


class LmdbDataset(Dataset[AtomicGraph]):
    """Structures from one ``.lmdb`` file or a folder of them, with a stable global index.

    Environments are opened lazily in each process (checked by pid) and shared by all datasets of
    that process, so the dataset works in DataLoader workers and under DDP without using LMDB
    handles across ``fork``.

    ``verify_checksums`` checks every value read against the file's stored CRC32 (files without
    a ``checksums`` key are read unverified). ``skip_bad_entries`` reads and validates every
    entry once here (a progress bar), leaves out those that fail (:attr:`skipped`, one warning)
    and indexes the rest: ``len``, indices, :meth:`locate`, :meth:`raw`, :meth:`fields` and
    :attr:`metadata` then cover the good entries only. Off, nothing is read in advance and a
    bad entry raises DataError when it is read.
    """

    def __init__(
        self,
        src: str | Path,
        *,
        float_dtype: torch.dtype = torch.float32,
        skip_bad_entries: bool = False,
        verify_checksums: bool = True,
    ) -> None:
        self.src = Path(src)
        self.files = lmdb_files(self.src)
        self.float_dtype = float_dtype
        self._names = [str(path) for path in self.files]
        lengths = [read_length(reader(path), path) for path in self.files]
        self._checksums = [
            read_checksums(reader(path), path, length) if verify_checksums else None
            for path, length in zip(self.files, lengths, strict=True)
        ]
        self._offsets = np.cumsum([0, *lengths]).tolist()
        self._metadata: dict[str, np.ndarray] | None = None
        self._index: np.ndarray | None = None
        self.skipped: list[BadEntry] = []
        """The entries ``skip_bad_entries`` left out, in file order (empty when off)."""
        if skip_bad_entries:
            self._skip_bad_entries()

    def __len__(self) -> int:
        return int(self._offsets[-1]) if self._index is None else len(self._index)

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, index within that file) of a dataset index."""
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for {length} entries in {self.src}")
        index %= length
        return self._split(index if self._index is None else int(self._index[index]))

    def _split(self, position: int) -> tuple[int, int]:
        """(file number, index within that file) of a position among all stored entries."""
        file_index = bisect.bisect_right(self._offsets, position) - 1
        return file_index, position - self._offsets[file_index]

    def _env(self, file_index: int) -> lmdb.Environment:
        return reader(self.files[file_index])

    def raw(self, index: int) -> bytes:
        """The stored bytes of one entry (checksum verified)."""
        return _raise_bad(self._stored(*self.locate(index)))

    def fields(self, index: int) -> dict[str, Any]:
        """One entry as a dict of field name -> array or scalar (no validation)."""
        return _raise_bad(self._decoded(*self.locate(index)))

    def __getitem__(self, index: int) -> AtomicGraph:
        return _raise_bad(self._checked(*self.locate(index)))[1]

    def check(self, index: int) -> tuple[dict[str, Any], AtomicGraph] | BadEntry:
        """One entry read, verified and validated: its fields and graph, or what is wrong."""
        return self._checked(*self.locate(index))

    def _stored(self, file_index: int, local: int) -> bytes | BadEntry:
        try:
            with self._env(file_index).begin() as txn:
                raw = txn.get(str(local).encode("ascii"))
        except lmdb.Error as error:
            return BadEntry(self._names[file_index], local, None, corrupt(error))
        if raw is None:
            reason = "missing (truncated or corrupt file?); copy or regenerate it"
            return BadEntry(self._names[file_index], local, None, reason)
        sums = self._checksums[file_index]
        if sums is not None and zlib.crc32(raw) != sums[local]:
            return BadEntry(self._names[file_index], local, None, _MISMATCH)
        return bytes(raw)

    def _decoded(self, file_index: int, local: int) -> dict[str, Any] | BadEntry:
        raw = self._stored(file_index, local)
        if isinstance(raw, BadEntry):
            return raw
        try:
            return loads_entry(raw, source=_entry_name(self._names[file_index], local, None))
        except DataError as error:
            return self._bad(file_index, local, None, error)

    def _checked(
        self, file_index: int, local: int
    ) -> tuple[dict[str, Any], AtomicGraph] | BadEntry:
        fields = self._decoded(file_index, local)
        if isinstance(fields, BadEntry):
            return fields
        source = _entry_name(self._names[file_index], local, None)
        try:
            graph = AtomicGraph.from_fields(fields, source=source, float_dtype=self.float_dtype)
        except Exception as error:  # a damaged or foreign entry can fail in unforeseen ways
            return self._bad(file_index, local, _sid(fields.get(keys.SID)), error)
        return fields, graph

    def _bad(self, file_index: int, local: int, sid: int | None, error: Exception) -> BadEntry:
        """``error`` (whose message starts with ``<file> entry <N>: ``) as a BadEntry."""
        prefix = f"{_entry_name(self._names[file_index], local, None)}: "
        if isinstance(error, DataError):
            reason = str(error).removeprefix(prefix)
        else:
            reason = f"cannot be read ({type(error).__name__}: {_first_line(error)})"
        return BadEntry(self._names[file_index], local, sid, reason)

    def _skip_bad_entries(self) -> None:
        """Read and validate every stored entry; index the good ones, record the bad ones."""
        good: list[int] = []
        natoms: list[int] = []
        neighbors: list[int] = []
        total = int(self._offsets[-1])
        for position in progress(range(total), total=total, desc=f"checking {self.src.name}"):
            result = self._checked(*self._split(position))
            if isinstance(result, BadEntry):
                self.skipped.append(result)
                continue
            good.append(position)
            natoms.append(result[1].n_atoms)
            neighbors.append(result[1].n_edges)
        self._index = np.asarray(good, dtype=np.int64)
        self._metadata = {
            "natoms": np.asarray(natoms, dtype=np.int64),
            "neighbors": np.asarray(neighbors, dtype=np.int64),
        }
        if self.skipped:
            log.warning(
                "%s: skipped %d bad entries of %d (skip_bad_entries); the first: %s",
                self.src,
                len(self.skipped),
                total,
                "; ".join(str(bad) for bad in self.skipped[:5]),
            )

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
        with corruption_named(path), self._env(file_index).begin() as txn:
            raw = txn.get(METADATA_KEY)
        if raw is not None:
            sums = self._checksums[file_index]
            if sums is not None and zlib.crc32(raw) != sums[-1]:
                raise DataError(f"{path}: the 'metadata' key's {_MISMATCH}")
            return loads_entry(bytes(raw), source=f"{path} metadata")
        log.info("%s has no stored metadata; scanning its entries for natoms/neighbors", path)
        count = self._offsets[file_index + 1] - self._offsets[file_index]
        graphs = [_raise_bad(self._checked(file_index, local))[1] for local in range(count)]
        return {
            "natoms": np.array([graph.n_atoms for graph in graphs], dtype=np.int64),
            "neighbors": np.array([graph.n_edges for graph in graphs], dtype=np.int64),
        }


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


_T = TypeVar("_T")


def _raise_bad(result: _T | BadEntry) -> _T:
    """``result``, or a DataError ``<file> entry <N> (sid <sid>): <reason>`` for a bad entry."""
    if isinstance(result, BadEntry):
        raise DataError(str(result))
    return result
