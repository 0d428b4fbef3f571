"""Stop requests by signal, honoured at the end of the current step.

Shared clusters stop jobs with a signal before killing them: Slurm sends SIGTERM on preemption and
the signal chosen with ``--signal`` (SIGUSR1 by convention, SIGUSR2 under submitit) before the time
limit; a person at a terminal presses Ctrl-C (SIGINT). While :func:`stop_requests` is active, those
signals only set a flag; the training loop reads it after each optimizer step (agreed by every
rank), writes ``checkpoint.pt`` atomically and raises :class:`Preempted` (relaxations stop after
their current step the same way). The command then prints how to resume and exits with
:func:`exit_status`: 130 (``128 + SIGINT``, the shell's convention) after Ctrl-C, else
:data:`RESUME_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again"). A second Ctrl-C while the first is
pending aborts at once (``KeyboardInterrupt``); a repeated cluster signal is ignored. SIGKILL
cannot be caught, and a run resumed after one loses at most ``optim.checkpoint_every`` steps.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

RESUME_EXIT_CODE = 75
INTERRUPT_EXIT_CODE = 128 + signal.SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""Signals a cluster sends before it stops a job."""
HANDLED_SIGNALS = (signal.SIGINT, *STOP_SIGNALS)
"""Every signal :func:`stop_requests` turns into a stop request (DataLoader workers ignore them)."""


def exit_status(signal_number: int | None) -> int:
    """The exit status of a command stopped by ``signal_number``: 130 for SIGINT, else 75."""
    return INTERRUPT_EXIT_CODE if signal_number == signal.SIGINT else RESUME_EXIT_CODE


def signal_name(signal_number: int | None) -> str:
    """``SIGTERM``, ``SIGINT (Ctrl-C)``, ... for messages."""
    if signal_number is None:
        return "a signal"
    name = signal.Signals(signal_number).name
    return f"{name} (Ctrl-C)" if signal_number == signal.SIGINT else name


class Preempted(Exception):
    """Work stopped on request after saving what it had; ``resume`` says how to continue.

    ``signal_number`` is the signal that asked for the stop (None when unknown).
    """

    def __init__(self, message: str, resume: str, signal_number: int | None) -> None:
        super().__init__(message)
        self.resume = resume
        self.signal_number = signal_number

    @property
    def exit_status(self) -> int:
        return exit_status(self.signal_number)


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
        elif signal_number == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait


@contextmanager
def stop_requests(signals: tuple[signal.Signals, ...] = HANDLED_SIGNALS) -> Iterator[StopRequest]:
    """Turn ``signals`` into a :class:`StopRequest` for the duration of the block.

    When :class:`Preempted` leaves the block, the handler that was installed before (if it is a
    Python function other than Python's own SIGINT handler) is called with the received signal:
    submitit's, for example, requeues the job. Outside the main thread (where Python cannot
    install handlers) the request never fires.
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
        # Hand the signal on to the handler it displaced now that the work is saved; default,
        # ignore and Python's KeyboardInterrupt handlers are left alone.
        restore()
        number = request.signal_number
        chained = None if number is None else previous.get(signal.Signals(number))
        if callable(chained) and chained is not signal.default_int_handler and number is not None:
            chained(number, None)
        raise
    finally:
        restore()
