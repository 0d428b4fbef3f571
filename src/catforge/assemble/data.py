"""Datasets and loaders from the config's ``dataset`` and ``task.dataset``."""

from __future__ import annotations

import logging

from torch.utils.data import DataLoader, Dataset

from catforge.assemble.models import energy_field, with_forces
from catforge.config import Config, DatasetConfig
from catforge.data.graph import AtomicGraph
from catforge.errors import DataError
from catforge.registry import DATASETS
from catforge.training.loaders import eval_loader

log = logging.getLogger(__name__)


def open_dataset(name: str, entry: DatasetConfig, key: str) -> Dataset[AtomicGraph]:
    """The dataset class ``name`` (``task.dataset``) over ``entry.src``; errors name the config
    ``key`` (``dataset.val.src``, ...), and an empty dataset is an error: it would silently mean
    no training, no validation or empty result files."""
    factory = DATASETS.load(name)
    options = {"skip_bad_entries": True} if entry.skip_bad_entries else {}
    try:
        dataset = factory(entry.src, **options)
    except DataError as error:
        raise DataError(f"{key}: {error}") from None
    if len(dataset) == 0:
        split = key.removesuffix(".src")
        raise DataError(f"{key}: {entry.src} holds no structures; point {split} at a dataset")
    return dataset  # type: ignore[no-any-return]


def open_split(config: Config, split: str, *, labelled: bool = False) -> Dataset[AtomicGraph]:
    """``dataset.<split>`` opened with ``task.dataset``; ``labelled`` also checks that it holds
    the labels training or metrics need (energies, and forces for S2EF)."""
    dataset = open_dataset(config.task.dataset, config.dataset.split(split), f"dataset.{split}.src")
    if labelled:
        check_labels(config, dataset, split)
    return dataset


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


def evaluation_loader(config: Config, dataset: Dataset[AtomicGraph]) -> DataLoader[AtomicGraph]:
    """Validation / prediction batches: ``optim.eval_batch_size``, dataset order (sharded)."""
    optim = config.optim
    return eval_loader(
        dataset,
        batch_size=optim.eval_batch_size,
        num_workers=optim.num_workers,
        seed=config.options.seed,
    )
