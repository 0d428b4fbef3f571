"""Samplers for multi-process (DDP) training and evaluation.

Training, :class:`ShardedBatchSampler`:

- **Equivalence with one process.** Each epoch has one seeded permutation
  (``torch.randperm`` seeded by :func:`epoch_seed`). Step ``g`` uses the global batch
  ``perm[g*B*W : (g+1)*B*W]`` (``B`` per-rank batch size, ``W`` world size), and the ranks' batches
  of a step are a partition of it. So ``W`` processes with batch ``B`` see, step by step, exactly
  the batches of one process with batch ``W*B``; with ``W == 1`` they are consecutive chunks
  of the permutation. No index appears twice within an epoch and nothing is ever padded.
- **Load balancing** (``weights``, per-entry cost such as atoms or edges) only changes *which rank*
  gets which items of a global batch, never the global batch itself. The counts per rank stay as
  without weights (``B`` each for a full batch); within them, greedy LPT minimises the heaviest
  rank, and the plain contiguous split is kept where LPT would not beat it. Every rank computes
  the same split from the same inputs, so no communication is needed.
- **Short last batch.** The last global batch may hold fewer than ``B*W`` items; it is split as
  evenly as possible. If it holds fewer than ``W`` items some rank would get an empty batch (and
  DDP would hang), so it is dropped: those few entries are skipped that epoch (a different few
  each epoch) and ``len()`` counts one step less.
- **Resume.** ``set_epoch(epoch, start)`` fixes the epoch's permutation and skips its first
  ``start`` global batches (steps) without loading them: exact resume mid-epoch.

Evaluation, :class:`ShardedEvalSampler`: rank ``r`` reads the contiguous slice
``[shard_start(size, r, W), shard_start(size, r + 1, W))`` of ``range(size)``: every index exactly
once over all ranks, no padding, and the shards concatenated in rank order are in dataset order.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from catforge.errors import ConfigError, DataError


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of ``epoch``: the batch order is a function of (seed, epoch) only."""
    return seed * 100_003 + epoch


BALANCE_MODES: dict[str, str] = {"atoms": "natoms", "neighbors": "neighbors"}
"""``optim.load_balancing`` value -> the dataset metadata array it balances."""


def shard_start(size: int, rank: int, world_size: int) -> int:
    """First index of rank ``rank``'s contiguous share of ``size`` items (``rank == world_size``
    gives ``size``). Shares differ in length by at most one."""
    return rank * size // world_size


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def split_batch(
    batch: Sequence[int], world_size: int, weights: np.ndarray | None = None
) -> list[list[int]]:
    """Partition one global batch into ``world_size`` parts, in the same way on every rank.

    Part ``r`` holds ``shard_start(n, r + 1, W) - shard_start(n, r, W)`` items (``n = len(batch)``),
    whatever the weights. Without ``weights`` (indexed by the entries of ``batch``), part ``r`` is
    that contiguous slice. With them, items are assigned by greedy LPT (heaviest first, stable; each
    to the lightest part with room, ties to the lower rank) and each part keeps ``batch``'s order;
    if that would make the heaviest part heavier than the contiguous split's, the contiguous split
    is returned instead.
    """
    bounds = [shard_start(len(batch), rank, world_size) for rank in range(world_size + 1)]
    contiguous = [list(batch[bounds[r] : bounds[r + 1]]) for r in range(world_size)]
    if weights is None or world_size == 1:
        return contiguous
    costs = [float(weights[index]) for index in batch]
    room = [bounds[r + 1] - bounds[r] for r in range(world_size)]
    positions: list[list[int]] = [[] for _ in range(world_size)]
    heap = [(0.0, rank) for rank in range(world_size) if room[rank] > 0]
    for position in sorted(range(len(batch)), key=lambda p: -costs[p]):
        load, rank = heapq.heappop(heap)
        positions[rank].append(position)
        if len(positions[rank]) < room[rank]:
            heapq.heappush(heap, (load + costs[position], rank))
    balanced = [[batch[p] for p in sorted(part)] for part in positions]

    def heaviest(parts: list[list[int]]) -> float:
        return max(math.fsum(float(weights[index]) for index in part) for part in parts)

    return balanced if heaviest(balanced) <= heaviest(contiguous) else contiguous


class ShardedBatchSampler(Sampler[list[int]]):
    """One rank's share of each global batch of one epoch's seeded permutation.

    Global batch ``g`` is ``perm[g*B*W : (g+1)*B*W]`` (``B = batch_size`` per rank,
    ``W = world_size``); rank ``rank`` gets its part of it (:func:`split_batch`, balanced by
    ``weights``, one cost per dataset entry, if given). A last global batch with fewer than ``W``
    items is dropped. With ``world_size == 1`` the batches are consecutive chunks of the
    permutation, with or without weights.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        weights: np.ndarray | None = None,
    ) -> None:
        _check_rank(rank, world_size)
        if size < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (size,):
                raise ValueError(f"weights must have shape ({size},), got {weights.shape}")
            if not np.isfinite(weights).all():
                raise ValueError("weights must be finite")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.weights = rank, world_size, weights
        self.epoch, self.start = 0, 0
        self._order: list[int] = []
        self.set_epoch(0)

    @property
    def global_batch_size(self) -> int:
        """Items per full step over all ranks (``batch_size * world_size``)."""
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s permutation, skipping its first ``start`` global batches."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        self._order = torch.randperm(self.size, generator=generator).tolist()
        self.epoch, self.start = epoch, start

    def global_batches(self) -> Iterator[list[int]]:
        """The remaining global batches of the current epoch (after ``start``), every rank's."""
        step = self.global_batch_size
        for begin in range(self.start * step, len(self) * step, step):
            yield self._order[begin : begin + step]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield split_batch(batch, self.world_size, self.weights)[self.rank]

    def __len__(self) -> int:
        """Steps in a full epoch (global batches, the same on every rank), whatever ``start``."""
        steps, tail = divmod(self.size, self.global_batch_size)
        return steps + (tail >= self.world_size)


class ShardedEvalSampler(Sampler[int]):
    """Contiguous, non-padding shard of ``range(size)`` for rank ``rank``.

    Rank ``r`` reads ``[r*size//W, (r+1)*size//W)``: every index exactly once over all ranks, and
    the ranks' shards concatenated in rank order are ``range(size)``. With ``size < W`` some ranks
    get an empty shard (their loops simply run zero batches).
    """

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1) -> None:
        _check_rank(rank, world_size)
        if size < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.start = shard_start(size, rank, world_size)
        self.stop = shard_start(size, rank + 1, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def balance_weights(dataset: object, mode: str | None) -> np.ndarray | None:
    """Per-entry costs for ``optim.load_balancing``: ``None`` -> None, ``"atoms"`` -> the dataset's
    ``metadata["natoms"]``, ``"neighbors"`` -> ``metadata["neighbors"]`` (edge counts), as float64.

    Raises ConfigError for an unknown mode, a dataset without ``metadata`` (catforge's LMDB datasets
    have it), or neighbour counts that were not stored (absent or all zero: use ``atoms``).
    """
    if mode is None:
        return None
    if mode not in BALANCE_MODES:
        raise ConfigError(
            f"optim.load_balancing: unknown mode {mode!r}; use one of "
            f"{'|'.join(BALANCE_MODES)}, or leave it unset for no balancing"
        )
    name = getattr(dataset, "src", None) or type(dataset).__name__
    metadata = getattr(dataset, "metadata", None)
    if not isinstance(metadata, Mapping):
        raise ConfigError(
            f"optim.load_balancing: {mode}: the training dataset {name} has no per-entry "
            "metadata (LMDB files written by catforge have it); rewrite the data with "
            "'catforge data ingest' or leave optim.load_balancing unset"
        )
    key = BALANCE_MODES[mode]
    values = metadata.get(key)
    array = None if values is None else np.asarray(values, dtype=np.float64)
    if array is None or (mode == "neighbors" and array.size and not array.any()):
        fix = (
            "neighbors were not stored with the data; use optim.load_balancing: atoms, or ingest "
            "with 'catforge data ingest --get-edges'"
            if mode == "neighbors"
            else "leave optim.load_balancing unset"
        )
        raise ConfigError(f"optim.load_balancing: {mode}: dataset {name} has no {key!r}; {fix}")
    size = len(dataset)  # type: ignore[arg-type]
    if array.shape != (size,) or not np.isfinite(array).all():
        raise DataError(
            f"{name}: metadata {key!r} has shape {array.shape} (expected ({size},) finite counts); "
            "the metadata is stale or corrupt: rewrite the data"
        )
    return array
