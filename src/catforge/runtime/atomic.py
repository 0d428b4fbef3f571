"""Atomic file writes: the whole content goes to a temporary sibling, is flushed to disk, then
renamed into place, so a failure or kill at any moment leaves the previous file (if any) intact.

The content is assembled in memory first, so its size is known before anything is written: a
folder without room for it gets one :class:`~catforge.errors.OutputError` line naming the
folder, the space needed and the space free (also when the disk fills up during the write).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from catforge.errors import OutputError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def write_bytes(path: Path, data: bytes | memoryview) -> Path:
    """``data`` as the content of ``path``, written atomically; returns ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{path.parent}: cannot create the folder: {_reason(error)}") from None
    if len(data) > shutil.disk_usage(path.parent).free:
        raise _no_space(path, len(data))
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError as error:
        if error.errno in _NO_SPACE:
            raise _no_space(path, len(data)) from None
        raise OutputError(f"{path}: cannot write: {_reason(error)}") from None
    finally:
        partial.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` (:func:`write_bytes`) if the block
    finishes; nothing is written if it raises."""
    buffer = io.BytesIO()
    yield buffer
    write_bytes(path, buffer.getbuffer())


def write_json(path: Path, data: Any, *, indent: int | None = None) -> Path:
    """``data`` as JSON in ``path``, written atomically; returns ``path``."""
    text = json.dumps(data, indent=indent) + ("\n" if indent is not None else "")
    return write_bytes(path, text.encode())


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    """``arrays`` as a compressed ``.npz`` in ``path``, written atomically; returns ``path``."""
    with atomic_write(path) as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
    return path


def _no_space(path: Path, size: int) -> OutputError:
    free = shutil.disk_usage(path.parent).free
    kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
    return OutputError(
        f"{path.parent}: no space left to write {path.name} ({_size(size)} needed, "
        f"{_size(free)} free); free some space or write elsewhere (--run-dir){kept}"
    )


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _reason(error: OSError) -> str:
    return error.strerror or str(error)
