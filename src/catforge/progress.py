"""The one progress-bar helper: tqdm on an interactive main process, silent elsewhere."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_enabled(requested: bool = True) -> bool:
    """Show bars only when asked, on rank 0, and when stderr is a terminal."""
    is_main = os.environ.get("RANK", "0") == "0"
    return requested and is_main and sys.stderr.isatty()


def progress(
    items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True
) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar when :func:`progress_enabled`, else return them unchanged."""
    if not progress_enabled(enabled):
        yield from items
        return
    yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True, leave=False)
