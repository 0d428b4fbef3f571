"""Build the objects a run needs from a typed Config: datasets, loaders, model, label transform."""

from __future__ import annotations

import logging
import signal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from catforge.config import Config, DatasetConfig
from catforge.data.collate import collate
from catforge.data.graph import AtomicGraph
from catforge.data.samplers import ShardedEvalSampler
from catforge.distributed import get_rank, get_world_size
from catforge.errors import ConfigError
from catforge.potential import config_transform, element_references, energy_field, with_forces
from catforge.preemption import STOP_SIGNALS
from catforge.registry import dataset_factories, lookup
from catforge.targets import Normalizer, TargetTransform
from catforge.training.label_stats import fit_statistics

log = logging.getLogger(__name__)


def build_dataset(config: Config, entry: DatasetConfig) -> Dataset[AtomicGraph]:
    """The dataset class named by ``task.dataset`` over ``entry.src``."""
    factory = lookup(dataset_factories(), config.task.dataset, "dataset (task.dataset)")
    return factory(entry.src)  # type: ignore[return-value]


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


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave stop signals to the main process, which checkpoints and ends them."""
    for number in STOP_SIGNALS:
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
