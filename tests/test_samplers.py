"""Sharded samplers: DDP batches equal one process's batch of W*B, load balancing, eval shards."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from catforge.data.lmdb import LmdbDataset, write_lmdb
from catforge.data.neighbors import with_edges
from catforge.data.samplers import (
    ShardedBatchSampler,
    ShardedEvalSampler,
    balance_weights,
    shard_start,
    split_batch,
)
from catforge.errors import ConfigError
from tests.factories import graphs

CASES = [(1, 1, 0), (10, 3, 0), (23, 5, 7), (24, 4, 1), (7, 10, 3), (100, 8, 42)]


def chunks_of_permutation(size: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The reference batch order: consecutive chunks of the epoch's seeded permutation."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(size, generator=generator).tolist()
    return [order[i : i + batch] for i in range(0, size, batch)]


def ranks(
    size: int, batch: int, seed: int, world: int, weights: np.ndarray | None = None
) -> list[ShardedBatchSampler]:
    """One sampler per simulated rank."""
    return [
        ShardedBatchSampler(size, batch, seed, rank=r, world_size=world, weights=weights)
        for r in range(world)
    ]


def steps(
    samplers: list[ShardedBatchSampler], epoch: int = 0, start: int = 0
) -> list[list[list[int]]]:
    """steps[g][r]: rank r's batch at step g (after ``set_epoch(epoch, start)`` on every rank)."""
    for sampler in samplers:
        sampler.set_epoch(epoch, start)
    per_rank = [list(sampler) for sampler in samplers]
    assert len({len(batches) for batches in per_rank}) == 1, "ranks disagree on the step count"
    return [list(step) for step in zip(*per_rank, strict=True)]


def part_loads(step: list[list[int]], weights: np.ndarray) -> list[float]:
    return [float(weights[part].sum()) for part in step]


@pytest.mark.parametrize(("size", "batch", "seed"), CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_world_one_is_chunks_of_the_epoch_permutation(
    size: int, batch: int, seed: int, weighted: bool
) -> None:
    weights = np.random.default_rng(seed).integers(1, 100, size) if weighted else None
    sampler = ShardedBatchSampler(size, batch, seed, weights=weights)
    steps = len(chunks_of_permutation(size, batch, seed, 0))
    assert len(sampler) == steps
    for epoch, start in [(0, 0), (1, 0), (3, 1), (5, steps - 1), (2, steps)]:
        sampler.set_epoch(epoch, start)
        assert list(sampler) == chunks_of_permutation(size, batch, seed, epoch)[start:]
        assert len(sampler) == steps


@pytest.mark.parametrize(("size", "batch", "seed"), CASES)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_union_of_ranks_is_the_single_process_batch(
    size: int, batch: int, seed: int, world: int, weighted: bool
) -> None:
    weights = np.random.default_rng(seed).integers(1, 100, size) if weighted else None
    samplers = ranks(size, batch, seed, world, weights=weights)
    single = ShardedBatchSampler(size, batch * world, seed)
    for epoch in (0, 4):
        single.set_epoch(epoch)
        reference = list(single)
        got = steps(samplers, epoch)
        dropped = 0 < size % (batch * world) < world
        assert len(got) == len(reference) - dropped
        assert all(len(sampler) == len(got) for sampler in samplers)
        seen: list[int] = []
        for step, whole in zip(got, reference, strict=False):
            assert sorted(itertools.chain(*step)) == sorted(whole)
            assert all(len(part) >= 1 for part in step)
            if len(whole) == batch * world:
                assert [len(part) for part in step] == [batch] * world
            seen.extend(itertools.chain(*step))
        assert len(seen) == len(set(seen)), "an index was used twice in one epoch"
        tail = reference[-1] if dropped else []
        assert sorted(seen + tail) == list(range(size))


def test_short_last_batch_with_fewer_items_than_ranks_is_dropped() -> None:
    # 2 ranks x 4 = 8 per step; 17 items: two full steps and a tail of 1 < 2 ranks.
    samplers = ranks(17, 4, seed=3, world=2)
    got = steps(samplers)
    assert len(got) == 2 == len(samplers[0])
    assert len(set(itertools.chain(*itertools.chain(*got)))) == 16
    # Tail of exactly W items: kept, one each.
    got = steps(ranks(10, 4, seed=3, world=2))
    assert [len(part) for part in got[-1]] == [1, 1]
    # Fewer items than ranks at all: no step, but every rank agrees.
    assert [len(s) for s in ranks(2, 4, seed=0, world=3)] == [0, 0, 0]
    assert steps(ranks(2, 4, seed=0, world=3)) == []


def test_short_last_batch_is_split_evenly_without_padding() -> None:
    # 3 ranks x 4 = 12 per step; 12 + 7 items: the tail of 7 goes 2/2/3, never padded.
    samplers = ranks(19, 4, seed=5, world=3)
    got = steps(samplers)
    assert [len(part) for part in got[-1]] == [2, 2, 3]
    weights = np.random.default_rng(0).integers(1, 50, 19)
    got_weighted = steps(ranks(19, 4, seed=5, world=3, weights=weights))
    assert sorted(len(part) for part in got_weighted[-1]) == [2, 2, 3]
    assert sorted(itertools.chain(*got_weighted[-1])) == sorted(itertools.chain(*got[-1]))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("world", [2, 3, 4])
def test_balancing_never_worse_and_counts_equal(seed: int, world: int) -> None:
    rng = np.random.default_rng(seed)
    size, batch = int(rng.integers(world, 200)), int(rng.integers(1, 9))
    weights = rng.lognormal(3.0, 1.0, size).round()
    plain = steps(ranks(size, batch, seed, world))
    balanced = steps(ranks(size, batch, seed, world, weights=weights))
    assert len(plain) == len(balanced)
    for even, fair in zip(plain, balanced, strict=True):
        assert sorted(itertools.chain(*even)) == sorted(itertools.chain(*fair))
        assert [len(part) for part in fair] == [len(part) for part in even]
        assert max(len(part) for part in fair) - min(len(part) for part in fair) <= 1
        assert max(part_loads(fair, weights)) <= max(part_loads(even, weights))


def test_balancing_is_strictly_better_on_a_skewed_batch() -> None:
    weights = np.array([10, 10, 1, 1, 7, 1, 1, 1])
    assert split_batch([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert split_batch([0, 1, 2, 3], 2, weights) == [[0, 2], [1, 3]]  # loads 11/11, not 20/2
    # Through the sampler: put the heavy entries at the front of epoch 0's first global batch.
    size, batch, world = 16, 4, 2
    plain = ShardedBatchSampler(size, batch * world, seed=0)
    first = next(iter(plain))
    skewed = np.ones(size)
    skewed[first[:batch]] = 100.0  # the contiguous split gives rank 0 every heavy entry
    even = steps(ranks(size, batch, 0, world))
    fair = steps(ranks(size, batch, 0, world, weights=skewed))
    assert max(part_loads(fair[0], skewed)) < max(part_loads(even[0], skewed))
    assert part_loads(fair[0], skewed) == [202.0, 202.0]
    # Each rank keeps its items in permutation order.
    position = {index: p for p, index in enumerate(first)}
    for part in fair[0]:
        assert [position[i] for i in part] == sorted(position[i] for i in part)


def test_split_batch_falls_back_to_contiguous_when_lpt_is_worse() -> None:
    # Greedy LPT with fixed counts is a heuristic; the split is never heavier than contiguous.
    rng = np.random.default_rng(1)
    for _ in range(500):
        n, world = int(rng.integers(2, 12)), int(rng.integers(2, 4))
        weights = rng.integers(1, 20, n).astype(float)
        batch = list(rng.permutation(n))
        fair, even = split_batch(batch, world, weights), split_batch(batch, world)
        assert max(weights[p].sum() for p in fair) <= max(weights[p].sum() for p in even)
        assert [len(p) for p in fair] == [len(p) for p in even]


def test_balancing_is_deterministic_across_constructions() -> None:
    weights = np.random.default_rng(3).integers(1, 100, 57)
    first = steps(ranks(57, 4, 9, 3, weights=weights), epoch=2)
    second = steps(ranks(57, 4, 9, 3, weights=weights.copy()), epoch=2)
    assert first == second


def test_set_epoch_skips_exactly_start_global_batches() -> None:
    samplers = ranks(50, 3, seed=11, world=2, weights=np.arange(50))
    full = steps(samplers, epoch=3)
    for start in (0, 1, 4, len(full) - 1, len(full)):
        assert steps(samplers, epoch=3, start=start) == full[start:]
        assert all(len(sampler) == len(full) for sampler in samplers)


def test_epochs_differ_and_seeds_repeat() -> None:
    epoch0 = steps(ranks(40, 4, seed=2, world=2), epoch=0)
    epoch1 = steps(ranks(40, 4, seed=2, world=2), epoch=1)
    again = steps(ranks(40, 4, seed=2, world=2), epoch=0)
    other_seed = steps(ranks(40, 4, seed=3, world=2), epoch=0)
    assert epoch0 == again
    assert epoch0 != epoch1
    assert epoch0 != other_seed
    sampler = ShardedBatchSampler(40, 4, 2, rank=1, world_size=2)
    assert list(sampler) == list(sampler), "iterating twice without set_epoch repeats the epoch"


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(10, 2, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        ShardedBatchSampler(10, 0, 0)
    with pytest.raises(ValueError, match="weights"):
        ShardedBatchSampler(10, 2, 0, weights=np.ones(9))
    with pytest.raises(ValueError, match="world_size"):
        ShardedEvalSampler(10, world_size=0)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 10, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_shards_cover_the_dataset_once_in_order(size: int, world: int) -> None:
    shards = [list(ShardedEvalSampler(size, rank=r, world_size=world)) for r in range(world)]
    assert list(itertools.chain(*shards)) == list(range(size))
    for rank, shard in enumerate(shards):
        assert shard == list(
            range(shard_start(size, rank, world), shard_start(size, rank + 1, world))
        )
        assert len(ShardedEvalSampler(size, rank=rank, world_size=world)) == len(shard)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    if size < world:
        assert sum(not shard for shard in shards) == world - size


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two LMDB files of the factory graphs: without edges, and with edges (cutoff 3 A)."""
    root = tmp_path_factory.mktemp("samplers")
    structures = graphs()
    write_lmdb(structures, root / "plain.lmdb")
    write_lmdb([with_edges(graph, 3.0) for graph in structures], root / "edges.lmdb")
    return root


def test_balance_weights_atoms_from_lmdb(lmdb_dir: Path) -> None:
    dataset = LmdbDataset(lmdb_dir / "plain.lmdb")
    weights = balance_weights(dataset, "atoms")
    assert weights is not None
    assert weights.tolist() == [graph.n_atoms for graph in graphs()]
    assert balance_weights(dataset, None) is None
    sampler = ShardedBatchSampler(len(dataset), 2, 0, world_size=2, weights=weights)
    assert len(sampler) == 1  # 5 entries: one step of 2 x 2, the tail of 1 < 2 ranks dropped


def test_balance_weights_neighbors(lmdb_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"optim\.load_balancing.*use optim\.load_balancing: atoms"
    ):
        balance_weights(LmdbDataset(lmdb_dir / "plain.lmdb"), "neighbors")
    dataset = LmdbDataset(lmdb_dir / "edges.lmdb")
    weights = balance_weights(dataset, "neighbors")
    assert weights is not None
    assert weights.tolist() == [dataset[i].n_edges for i in range(len(dataset))]
    assert weights.min() > 0


def test_balance_weights_errors(lmdb_dir: Path) -> None:
    dataset = LmdbDataset(lmdb_dir / "plain.lmdb")
    with pytest.raises(ConfigError, match=r"optim\.load_balancing.*'edges'.*atoms\|neighbors"):
        balance_weights(dataset, "edges")
    with pytest.raises(ConfigError, match="no per-entry metadata"):
        balance_weights(list(graphs()), "atoms")

    class NoNeighbors:
        def __init__(self) -> None:
            self.metadata = {"natoms": np.array([3, 4])}

        def __len__(self) -> int:
            return 2

    with pytest.raises(ConfigError, match="neighbors were not stored"):
        balance_weights(NoNeighbors(), "neighbors")
    weights = balance_weights(NoNeighbors(), "atoms")
    assert weights is not None
    assert weights.tolist() == [3.0, 4.0]
