"""The file side of catforge's LMDB datasets (layout: :mod:`catforge.data.lmdb`): key names,
per-process read-only environments, the entry count, the ``checksums`` key, and LMDB's own errors
on a damaged file as a DataError naming it."""

from __future__ import annotations

import os
import pickle
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np

from catforge.errors import DataError

LENGTH_KEY = b"length"
METADATA_KEY = b"metadata"
CHECKSUMS_KEY = b"checksums"


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


_READERS: dict[Path, lmdb.Environment] = {}  # by resolved path
_BY_NAME: dict[Path, lmdb.Environment] = {}  # by the path as given (resolving costs syscalls)
_READERS_PID = os.getpid()


def reader(path: Path) -> lmdb.Environment:
    """This process's read-only environment of ``path``, opened on first use and then shared.

    LMDB allows one environment per file and process, so every dataset over the same file shares
    it; after a ``fork`` the child drops the inherited handles and opens its own.
    """
    global _READERS_PID
    if os.getpid() != _READERS_PID:
        _READERS.clear()
        _BY_NAME.clear()
        _READERS_PID = os.getpid()
    env = _BY_NAME.get(path)
    if env is None:
        key = path.resolve()
        env = _READERS.get(key)
        if env is None:
            env = _READERS[key] = _open_env(path)
        _BY_NAME[path] = env
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
    with corruption_named(path):
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if path.stat().st_size < needed:
        env.close()
        raise DataError(
            f"{path}: LMDB file is truncated ({path.stat().st_size} of {needed} bytes); "
            "copy or regenerate it"
        )
    return env


def corrupt(error: lmdb.Error) -> str:
    """Why a read failed inside LMDB, for an error message."""
    return f"the LMDB file is corrupt ({error}); copy or regenerate it"


@contextmanager
def corruption_named(path: Path) -> Iterator[None]:
    """Turn LMDB's own errors (damaged pages, e.g. ``lmdb.CorruptedError``) into a DataError."""
    try:
        yield
    except lmdb.Error as error:
        raise DataError(f"{path}: {corrupt(error)}") from None


def read_length(env: lmdb.Environment, path: Path) -> int:
    """Entry count: the ``length`` key if present (OCP S2EF, catforge), else the key count less
    the ``metadata`` and ``checksums`` keys."""
    with corruption_named(path), env.begin() as txn:
        raw = txn.get(LENGTH_KEY)
        if raw is None:
            extra = sum(txn.get(key) is not None for key in (METADATA_KEY, CHECKSUMS_KEY))
            return int(env.stat()["entries"]) - extra
    try:
        length = pickle.loads(raw)
    except Exception as error:
        raise DataError(f"{path}: the 'length' key is unreadable: {error}") from error
    if not isinstance(length, int) or length < 0:
        raise DataError(f"{path}: the 'length' key holds {length!r}, expected a count")
    return length


def read_checksums(env: lmdb.Environment, path: Path, length: int) -> np.ndarray | None:
    """The CRC32s of the ``checksums`` key (entries, then metadata), None if the file has none."""
    with corruption_named(path), env.begin() as txn:
        raw = txn.get(CHECKSUMS_KEY)
    if raw is None:
        return None
    body, tail = raw[:-4], raw[-4:]
    if len(raw) != 4 * (length + 2) or zlib.crc32(body) != int.from_bytes(tail, "little"):
        raise DataError(
            f"{path}: the 'checksums' key is corrupt or does not match the {length} entries "
            "(the file is corrupt; copy or regenerate it)"
        )
    return np.frombuffer(body, dtype="<u4")


def pack_checksums(entries: Sequence[int], metadata: bytes) -> bytes:
    """The ``checksums`` value: the entries' CRC32s, the metadata value's, then their own."""
    body = np.asarray([*entries, zlib.crc32(metadata)], dtype="<u4").tobytes()
    return body + zlib.crc32(body).to_bytes(4, "little")
