"""The one progress helper: a tqdm bar on an interactive main process, log lines elsewhere.

Off a terminal (a batch job, a pipe) a bar would be noise, but a silent terminal for minutes
looks like a hang: :func:`progress` (over an iterable) and :class:`ProgressCounter` (advanced
by hand) then log one line at most every :data:`HEARTBEAT_SECONDS` as items complete
(``"predict: 1200 of 5000 (24%), 38.1/s"``); loops that draw their own bar use
:class:`Heartbeat` for the same rhythm.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from tqdm import tqdm

from catforge.runtime.distributed import process_rank

T = TypeVar("T")
HEARTBEAT_SECONDS = 30.0

log = logging.getLogger(__name__)


def progress_enabled(requested: bool = True) -> bool:
    """Show bars only when asked, on rank 0 (:func:`~catforge.runtime.distributed.process_rank`:
    the process group's rank, else the launcher's) and when stderr is a terminal."""
    return requested and process_rank() == 0 and sys.stderr.isatty()


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
            _log_progress(desc, count, total, heartbeat.rate(count))


class ProgressCounter:
    """A count advanced by hand (``update(n)``, e.g. from callbacks) with the rules of
    :func:`progress`: a tqdm bar where :func:`progress_enabled` says, else a heartbeat log line;
    nothing at all with ``enabled=False``. Call :meth:`close` when done."""

    def __init__(self, total: int, *, desc: str, unit: str = "it", enabled: bool = True) -> None:
        self.total, self.desc, self.count = total, desc, 0
        self._bar = progress_bar(total, desc=desc, unit=unit, enabled=enabled)
        self._heartbeat = Heartbeat() if enabled and self._bar.disable else None

    def update(self, n: int = 1) -> None:
        """``n`` more items done."""
        self.count += n
        self._bar.update(n)
        if self._heartbeat is not None and self._heartbeat.due():
            _log_progress(self.desc, self.count, self.total, self._heartbeat.rate(self.count))

    def close(self) -> None:
        """Close the bar (a no-op when none is shown)."""
        self._bar.close()


def _log_progress(desc: str, count: int, total: int | None, rate: float) -> None:
    """One heartbeat line: ``"predict: 1200 of 5000 (24%), 38.1/s"``."""
    share = f" ({100 * count / total:.0f}%)" if total else ""
    of = f" of {total}" if total is not None else ""
    log.info("%s: %d%s%s, %.3g/s", desc, count, of, share, rate)
