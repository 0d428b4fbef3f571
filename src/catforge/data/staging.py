"""All-or-nothing outputs: write into a hidden temporary folder or file, rename it into place.

:func:`staged_output` is how the demo generator, ingest and export write a dataset folder
(:func:`staged_file` a single file): the target either ends up complete or is left untouched,
and nothing temporary is left behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from catforge.errors import DataError

__all__ = ["is_empty", "staged_file", "staged_output"]


def is_empty(path: Path) -> bool:
    """True for an empty folder or an empty file."""
    return not any(path.iterdir()) if path.is_dir() else path.stat().st_size == 0


def _sibling(out: Path, kind: str) -> Path:
    """A fresh hidden path beside ``out``, e.g. ``.data.tmp-1a2b3c4d``."""
    return out.with_name(f".{out.name}.{kind}-{uuid.uuid4().hex[:8]}")


def _check(out: Path, overwrite: bool, may_replace: Callable[[Path], str | None] | None) -> None:
    """Refuse a non-empty ``out`` without ``overwrite``, or when ``may_replace`` gives a reason."""
    if not out.exists() or is_empty(out):
        return
    if not overwrite:
        raise DataError(
            f"{out}: output exists and is not empty; pass --overwrite to replace what already "
            "exists there, or choose another --out"
        )
    reason = may_replace(out) if may_replace is not None else None
    if reason is not None:
        raise DataError(reason)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _publish(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    _remove(old)


@contextmanager
def staged_file(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden temporary path beside the file ``out``; on success it replaces ``out``.

    The same rules as :func:`staged_output`, for one file.
    """
    _check(out, overwrite, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_output(
    out: Path,
    *,
    overwrite: bool,
    may_replace: Callable[[Path], str | None] | None = None,
) -> Iterator[Path]:
    """Yield a new temporary folder beside ``out``; on success it replaces ``out``.

    An existing non-empty ``out`` is refused (DataError) unless ``overwrite``, and then also when
    ``may_replace(out)`` returns a reason (the error message). The check runs on entry, so before
    any work, and again before publishing. On any error the temporary folder is removed.
    """
    _check(out, overwrite, may_replace)
    tmp = _sibling(out, "tmp")
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _check(out, overwrite, may_replace)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
