"""The one progress helper: a tqdm bar on an interactive main process, log lines elsewhere.

Off a terminal (a batch job, a pipe) a bar would be noise, but a silent terminal for minutes
looks like a hang: :func:`progress` then logs one line at least every
:data:`HEARTBEAT_SECONDS` (``"predict: 1200 of 5000 (24%), 38.1/s"``), and loops that draw their
own bar use :class:`Heartbeat` for the same rhythm.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from tqdm import tqdm

from catforge.distributed import is_main

T = TypeVar("T")
HEARTBEAT_SECONDS = 30.0

log = logging.getLogger(__name__)


def progress_enabled(requested: bool = True) -> bool:
    """Show bars only when asked, on rank 0 (:func:`catforge.distributed.is_main`, the one rank
    source), and when stderr is a terminal."""
    return requested and is_main() and sys.stderr.isatty()


class Heartbeat:
    """Says when the next progress line is due: at most every ``interval`` seconds."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = HEARTBEAT_SECONDS if interval is None else interval
        self.start = self.last = time.monotonic()

    def due(self) -> bool:
        """True (and the clock restarts) when ``interval`` seconds passed since the last line."""
        now = time.monotonic()
        if now - self.last < self.interval:
            return False
        self.last = now
        return True

    def reset(self) -> None:
        """A line was just written another way: the next one is due ``interval`` from now."""
        self.last = time.monotonic()

    def rate(self, count: int) -> float:
        """``count`` items per second since the start."""
        return count / max(time.monotonic() - self.start, 1e-9)


def progress_bar(
    total: int,
    *,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    leave: bool = False,
    enabled: bool = True,
) -> tqdm:
    """A bar advanced by hand (``bar.update(n)``), shown where :func:`progress_enabled` says;
    elsewhere a disabled bar (``bar.disable``), and the loop logs its own :class:`Heartbeat`."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(enabled),
        dynamic_ncols=True,
        leave=leave,
    )


def progress(
    items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True
) -> Iterator[T]:
    """``items`` with a tqdm bar (:func:`progress_enabled`), else with a heartbeat log line;
    ``enabled=False`` shows nothing at all. ``total`` defaults to ``len(items)`` when it has one."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    if progress_enabled(enabled):
        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True, leave=False)
        return
    if not enabled:
        yield from items
        return
    heartbeat = Heartbeat()
    for count, item in enumerate(items, start=1):
        yield item
        if heartbeat.due():
            share = f" ({100 * count / total:.0f}%)" if total else ""
            of = f" of {total}" if total is not None else ""
            log.info("%s: %d%s%s, %.3g/s", desc, count, of, share, heartbeat.rate(count))
