"""Preemption safety: a stop request by signal, honoured at the end of the current step.

Shared clusters stop jobs with a signal before killing them: Slurm sends SIGTERM on preemption and
the signal chosen with ``--signal`` (SIGUSR1 by convention, SIGUSR2 under submitit) before the time
limit. While :func:`stop_requests` is active, those signals only set a flag; the training loop
reads it after each optimizer step (agreed by every rank), writes ``checkpoint.pt`` atomically
and raises :class:`Preempted`. The command then exits with :data:`RESUME_EXIT_CODE` (75,
``EX_TEMPFAIL``: "try again"), and rerunning it with ``--checkpoint`` (or the Slurm requeue)
continues the run. A second signal while the first is pending is ignored; SIGKILL cannot be
caught, and a run resumed after one loses at most ``optim.checkpoint_every`` steps.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

RESUME_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """Training stopped on request after writing ``checkpoint`` (resume from it)."""

    def __init__(self, checkpoint: Path | None, step: int) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (debug)"
        super().__init__(f"stopped by a signal at step {step}; {where}")
        self.checkpoint = checkpoint
        self.step = step


class StopRequest:
    """Whether a stop signal arrived (``signal_number`` says which)."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        # Only set the flag: writing to a stream here could re-enter one being written.
        if self.signal_number is None:
            self.signal_number = signal_number


@contextmanager
def stop_requests(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Turn ``signals`` into a :class:`StopRequest` for the duration of the block.

    When :class:`Preempted` leaves the block, the handler that was installed before (if it is a
    Python function) is called with the received signal. Outside the main thread (where Python
    cannot install handlers) the request never fires.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {number: signal.signal(number, request._handle) for number in signals}

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    try:
        yield request
    except Preempted:
        # Hand the signal on to the handler it displaced (e.g. submitit's, which requeues the
        # job) now that the checkpoint is written; default and ignore handlers are left alone.
        restore()
        number = request.signal_number
        chained = None if number is None else previous.get(signal.Signals(number))
        if callable(chained) and number is not None:
            chained(number, None)
        raise
    finally:
        restore()
