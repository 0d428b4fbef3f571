"""Name -> factory tables with "did you mean" lookup; every pluggable piece is listed here."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sized
from typing import TYPE_CHECKING, TypeVar

from catforge.errors import ConfigError, DataError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from catforge.config import DatasetConfig
    from catforge.data.graph import AtomicGraph

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """Return ``table[name]`` or raise a ConfigError listing valid names and the closest one."""
    if name in table:
        return table[name]
    valid = ", ".join(sorted(table))
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown {what} '{name}'.{hint} Valid names: {valid}")


def dataset_factories() -> dict[str, Callable[..., object]]:
    """Dataset name (as in OCP configs' ``task.dataset``) -> dataset class.

    ``oc22_lmdb`` is the same reader. What OCP's ``OC22LmdbDataset`` does differently is either
    the data itself or a dataset flag: OC22 entries (flagged ``oc22``) hold total energies and
    are used as stored, as here; ``lin_ref`` (subtract per-element linear references) is
    ``task.element_references: FILE`` here; OC20 entries (no ``oc22`` flag) OCP reads only with
    ``train_on_oc20_total_energies`` + ``oc20_ref`` (joint OC20+OC22 training on total energies),
    and ``data2train``/``subsample`` pick subsets: catforge refuses these flags by name
    (:func:`catforge.config.ocp.dataset_splits`). OCP also drops stored edges, so its models
    build graphs on the fly (``otf_graph: True``, which OC22 configs set); catforge's SchNet builds
    them whenever the graph has none or ``otf_graph`` is on.
    """
    from catforge.data.lmdb import LmdbDataset

    return {
        "lmdb": LmdbDataset,
        "single_point_lmdb": LmdbDataset,
        "trajectory_lmdb": LmdbDataset,
        "oc22_lmdb": LmdbDataset,
    }


def open_dataset(name: str, entry: DatasetConfig, key: str) -> Dataset[AtomicGraph]:
    """The dataset class ``name`` (``task.dataset``) over ``entry.src``; errors name the config
    ``key`` (``dataset.val.src``, ...), and an empty dataset is an error: it would silently mean
    no training, no validation or empty result files."""
    factory = lookup(dataset_factories(), name, "dataset (task.dataset)")
    options = {"skip_bad_entries": True} if entry.skip_bad_entries else {}
    try:
        dataset = factory(entry.src, **options)
    except DataError as error:
        raise DataError(f"{key}: {error}") from None
    if not isinstance(dataset, Sized):
        raise TypeError(f"dataset '{name}' is not a sized dataset")
    if len(dataset) == 0:
        split = key.removesuffix(".src")
        raise DataError(f"{key}: {entry.src} holds no structures; point {split} at a dataset")
    return dataset  # type: ignore[return-value]


def model_factories() -> dict[str, Callable[..., object]]:
    """Model name (as in OCP configs' ``model.name``) -> factory taking the rest of the block."""
    from catforge.models.schnet import build_schnet

    return {"schnet": build_schnet}
