"""DataLoaders of AtomicGraph batches: worker count, seeding and signal handling.

Loading never draws from the global RNG (which exact resume restores): each loader has its own
generator. Workers leave stop signals to the main process, which checkpoints and ends them.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from catforge.data.collate import collate
from catforge.data.graph import AtomicGraph
from catforge.data.samplers import ShardedEvalSampler
from catforge.runtime.distributed import get_rank, get_world_size
from catforge.runtime.preemption import HANDLED_SIGNALS

log = logging.getLogger(__name__)


def worker_error_message(message: str) -> str:
    """The original one-line message of an error raised in a DataLoader worker (the loader
    re-raises it with the worker's traceback in front), else ``message`` itself."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    _, sep, original = last.partition(": ")
    return original if sep else last


def build_loader(
    dataset: Dataset[AtomicGraph],
    *,
    num_workers: int,
    seed: int,
    batch_size: int = 1,
    batch_sampler: Sampler[list[int]] | None = None,
    sampler: Sampler[int] | None = None,
) -> DataLoader[AtomicGraph]:
    """A DataLoader collating AtomicGraphs, in dataset order, ``sampler``'s order or as
    ``batch_sampler`` says.

    Its own generator seeded by ``seed`` seeds the workers, so loading never draws from the
    global RNG (which exact resume restores).
    """
    num_workers = capped_workers(num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size if batch_sampler is None else 1,
        batch_sampler=batch_sampler,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
    )


def capped_workers(requested: int) -> int:
    """``optim.num_workers``, capped at this process's share of the CPUs (one warning).

    OCP's configs ask for 16-64 workers per GPU node; on a laptop that starts hundreds of
    processes that only fight for the same cores. The processes of one node (``torchrun``'s
    ``LOCAL_WORLD_SIZE``) share its CPUs.
    """
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    available = max(1, available_cpus() // local_processes)
    if requested <= available:
        return requested
    if requested not in _warned_workers:
        _warned_workers.add(requested)
        share = f" per process ({local_processes} on this node)" if local_processes > 1 else ""
        log.warning(
            "optim.num_workers %d is more than the %d CPUs available%s; using %d",
            requested,
            available,
            share,
            available,
        )
    return available


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


_warned_workers: set[int] = set()


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave stop signals (Ctrl-C too) to the main process, which checkpoints and ends
    them."""
    for number in HANDLED_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def eval_loader(
    dataset: Dataset[AtomicGraph], *, batch_size: int, num_workers: int, seed: int
) -> DataLoader[AtomicGraph]:
    """The loader for validation and prediction: ``batch_size`` structures, dataset order.

    Under DDP each rank reads its contiguous shard (no padding, no duplicates), so the ranks'
    results concatenated in rank order are in dataset order.
    """
    size = len(dataset)  # type: ignore[arg-type]
    shard = ShardedEvalSampler(size, rank=get_rank(), world_size=get_world_size())
    return build_loader(
        dataset, num_workers=num_workers, seed=seed, batch_size=batch_size, sampler=shard
    )
