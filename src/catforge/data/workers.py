"""Worker processes for data generation and conversion: spawned, one compute thread each.

Children are started with the ``spawn`` method (safe with torch and LMDB handles) while
:func:`single_threaded_env` pins the BLAS/OpenMP thread variables to 1, because a spawned child
copies the environment at start; :func:`init_worker` pins torch's own threads. This module
imports no torch, so children that never need it start fast.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.context import SpawnContext

__all__ = ["THREAD_VARS", "init_worker", "single_threaded_env", "spawn_context"]

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables that size the BLAS/OpenMP thread pools of a new process."""


def spawn_context() -> SpawnContext:
    """The multiprocessing context every worker process is started with."""
    return multiprocessing.get_context("spawn")


@contextmanager
def single_threaded_env() -> Iterator[None]:
    """Set the BLAS/OpenMP thread variables to 1 while worker processes are spawned."""
    saved = {name: os.environ.get(name) for name in THREAD_VARS}
    os.environ.update(dict.fromkeys(THREAD_VARS, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def init_worker() -> None:
    """Worker initialiser: one thread for torch too, if the child has imported it.

    BLAS threads are pinned by the environment the worker was started with.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
