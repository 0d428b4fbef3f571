"""Atomic file writes: a temporary sibling, flushed to disk, then renamed into place."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` only if the block finishes.

    A failure or kill at any moment leaves the previous ``path`` (if any) intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(path: Path, data: Any, *, indent: int | None = None) -> Path:
    """``data`` as JSON in ``path``, written atomically; returns ``path``."""
    text = json.dumps(data, indent=indent) + ("\n" if indent is not None else "")
    with atomic_write(path) as handle:
        handle.write(text.encode())
    return path


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    """``arrays`` as a compressed ``.npz`` in ``path``, written atomically; returns ``path``."""
    with atomic_write(path) as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
    return path
