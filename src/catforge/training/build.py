"""Build the objects a run needs from a typed Config: datasets, loaders, model, label transform."""

from __future__ import annotations

import logging
import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from catforge.config import Config, DatasetConfig
from catforge.data.collate import collate
from catforge.data.graph import AtomicGraph
from catforge.data.samplers import ShardedEvalSampler
from catforge.distributed import get_rank, get_world_size
from catforge.errors import ConfigError, DataError
from catforge.potential import config_transform, element_references, energy_field, with_forces
from catforge.preemption import HANDLED_SIGNALS
from catforge.registry import open_dataset
from catforge.targets import Normalizer, TargetTransform
from catforge.training.label_stats import fit_statistics

log = logging.getLogger(__name__)


def build_dataset(config: Config, entry: DatasetConfig, split: str) -> Dataset[AtomicGraph]:
    """The dataset class named by ``task.dataset`` over ``entry.src`` (``dataset.<split>``).

    Errors name the config key; an empty dataset is an error (it would silently mean no
    training, no validation or empty prediction files).
    """
    return open_dataset(config.task.dataset, entry, f"dataset.{split}.src")


def check_labels(config: Config, dataset: Dataset[AtomicGraph], split: str) -> None:
    """Refuse a split without the labels its use needs (energies, and forces for S2EF), before
    any work is done: the first, middle and last entries are checked."""
    needed = [energy_field(config), *(["force"] if with_forces(config) else [])]
    length = len(dataset)  # type: ignore[arg-type]
    use = "training" if split == "train" else "validation metrics"
    task = "S2EF (trainer: forces)" if with_forces(config) else "IS2RE (trainer: energy)"
    hint = (
        ""
        if split == "train"
        else "; an unlabelled set belongs under dataset.test (--mode predict)"
    )
    for index in sorted({0, length // 2, length - 1}):
        present = _entry_field_names(dataset, index)
        for name in needed:
            if name not in present:
                raise DataError(
                    f"dataset.{split}.src: entry {index} of {config.dataset.split(split).src} has "
                    f"no '{name}' label, which {use} of {task} needs{hint}"
                )


def _entry_field_names(dataset: Dataset[AtomicGraph], index: int) -> set[str]:
    fields = getattr(dataset, "fields", None)
    if callable(fields):
        return {name for name, value in fields(index).items() if value is not None}
    return set(dataset[index].present())


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
            requested, available, share, available,
        )  # fmt: skip
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


def build_eval_loader(config: Config, dataset: Dataset[AtomicGraph]) -> DataLoader[AtomicGraph]:
    """The loader for validation and prediction: ``optim.eval_batch_size``, dataset order.

    Under DDP each rank reads its contiguous shard (no padding, no duplicates), so the ranks'
    results concatenated in rank order are in dataset order.
    """
    optim = config.optim
    shard = ShardedEvalSampler(len(dataset), rank=get_rank(), world_size=get_world_size())  # type: ignore[arg-type]
    return build_loader(
        dataset, num_workers=optim.num_workers, seed=config.options.seed,
        batch_size=optim.eval_batch_size, sampler=shard,
    )  # fmt: skip


def build_transform(config: Config, train: Dataset[AtomicGraph] | None) -> TargetTransform:
    """Label normalisers and element references from the config, fitted on ``train`` if missing."""
    entry = config.dataset.train
    normalize = entry is not None and entry.normalize_labels
    needs_fit = config.task.element_references == "fit" or (
        normalize and entry is not None and entry.target_mean is None
    )
    if needs_fit:
        if train is None:
            raise ConfigError("normalisation statistics are missing and there is no training set")
        field = energy_field(config)
        stats = fit_statistics(
            train,
            field,
            with_forces=with_forces(config),
            element_references=element_references(config),
            fit_references=config.task.element_references == "fit",
        )
        log.info(
            "label statistics from %d training structures: target_mean %.6g, target_std %.6g",
            stats.count,
            stats.target_mean,
            stats.target_std,
        )
        target = Normalizer(stats.target_mean, stats.target_std) if normalize else Normalizer()
        return TargetTransform(target, None, stats.element_references, field)
    return config_transform(config)
