"""Multi-dataset batch sampling: shares by strategy, determinism per (seed, epoch), disjoint equal DDP shards."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from qmamba.data.sampler import MultiDatasetBatchSampler, SeededBatches, ShardSampler, dataset_shares
from qmamba.errors import UsageError

SIZES = [779, 10_073, 1_162]  # LIVE, KonIQ, LIVEC


def dataset_of(index: int, sizes: list[int]) -> int:
    return int(np.searchsorted(np.cumsum(sizes), index, side="right"))


def realised_shares(batches: list[list[int]], sizes: list[int]) -> np.ndarray:
    counts = Counter(dataset_of(i, sizes) for batch in batches for i in batch)
    total = sum(counts.values())
    return np.array([counts[d] / total for d in range(len(sizes))])


@pytest.mark.parametrize("strategy, expected", [
    ("proportional", np.array(SIZES) / sum(SIZES)),
    ("balanced", np.full(3, 1 / 3)),
    ("temperature", np.sqrt(SIZES) / np.sqrt(SIZES).sum()),
])
@pytest.mark.parametrize("mixed", [False, True])
def test_realised_shares_follow_the_strategy(strategy, expected, mixed):
    sampler = MultiDatasetBatchSampler(SIZES, 32, strategy, temperature=2.0, mixed=mixed, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sum(SIZES) // 32
    assert np.abs(realised_shares(batches, SIZES) - expected).max() < 0.005
    assert all(max(b) < sum(SIZES) and min(b) >= 0 for b in batches)


def test_single_dataset_batches_unless_mixed():
    single = list(MultiDatasetBatchSampler(SIZES, 16, "balanced", seed=1))
    assert all(len({dataset_of(i, SIZES) for i in b}) == 1 for b in single)
    mixed = list(MultiDatasetBatchSampler(SIZES, 16, "balanced", mixed=True, seed=1))
    assert sum(len({dataset_of(i, SIZES) for i in b}) > 1 for b in mixed) > len(mixed) / 2


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy", ["proportional", "balanced", "temperature"])
def test_ranks_get_disjoint_draws_and_equal_batch_counts(world, strategy):
    sizes = [50, 400, 120]
    ranks = [MultiDatasetBatchSampler(sizes, 8, strategy, seed=7, rank=r, world_size=world) for r in range(world)]
    for sampler in ranks:
        sampler.set_epoch(3)
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == sum(sizes) // (8 * world)
    # the ranks deal one global list of batches among themselves: nothing is drawn twice or lost
    dealt = sorted(i for batches in per_rank for b in batches for i in b)
    assert dealt == sorted(ranks[0].global_batches().ravel().tolist())
    if strategy == "proportional":  # no dataset is oversampled: every index at most once over all ranks
        flat = [set(i for b in batches for i in b) for batches in per_rank]
        assert all(not (flat[a] & flat[b]) for a in range(world) for b in range(a + 1, world))
        assert len(dealt) == len(set(dealt))


def test_same_seed_and_epoch_same_order_new_epoch_new_order():
    a, b = MultiDatasetBatchSampler(SIZES, 32, "balanced", seed=5), MultiDatasetBatchSampler(SIZES, 32, "balanced",
                                                                                                seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(MultiDatasetBatchSampler(SIZES, 32, "balanced", seed=6)) != first


def test_oversampling_visits_every_image_before_repeating():
    from qmamba.data.sampler import _draw

    draws = _draw(10, 35, np.random.default_rng(0))
    assert all(sorted(draws[k : k + 10]) == list(range(10)) for k in (0, 10, 20))
    assert len(set(draws[30:])) == 5
    counts = Counter(i for b in MultiDatasetBatchSampler([10, 1000], 4, "balanced", seed=0) for i in b if i < 10)
    assert max(counts.values()) - min(counts.values()) <= 1  # ~50 visits each, evenly


def test_epoch_samples_and_bad_arguments():
    assert len(MultiDatasetBatchSampler(SIZES, 32, epoch_samples=6400, world_size=2)) == 100
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        dataset_shares(SIZES, "uniformish")
    with pytest.raises(ValueError, match="holds no batch"):
        MultiDatasetBatchSampler([3, 4], 8)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        MultiDatasetBatchSampler(SIZES, 8, rank=2, world_size=2)


def test_a_dataset_whose_share_rounds_to_no_batch_is_one_line_not_a_dataset_never_trained_on():
    """6 images beside 5,000, shared proportionally in batches of 32, get 0.2 of a batch per epoch, rounded to none in
    every epoch (the draw had failed inside the training loop with numpy's 'need at least one array')."""
    with pytest.raises(UsageError, match=r"small \(6 training images\) would get no batch of 32 in an epoch of 156 "
                                         "batches \\(proportional sampling\\)"):
        MultiDatasetBatchSampler([5_000, 6], 32, names=["big", "small"])
    for fix in ({"strategy": "balanced"}, {"mixed": True}):
        sampler = MultiDatasetBatchSampler([5_000, 6], 32, **fix)
        assert any(i >= 5_000 for batch in sampler for i in batch)
    assert all(len(b) == 32 for b in MultiDatasetBatchSampler([5_000, 100], 32))


def test_shard_sampler_covers_every_item_once():
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]


def test_seeded_batches_pair_each_draw_with_a_seed_of_seed_epoch_and_position():
    def seeded(rank: int = 0, world: int = 1, epoch: int = 0) -> list[list[tuple[int, int]]]:
        batches = SeededBatches(MultiDatasetBatchSampler([30, 10], 4, seed=7, rank=rank, world_size=world))
        batches.set_epoch(epoch)
        return list(batches)

    plain = MultiDatasetBatchSampler([30, 10], 4, seed=7)
    first = seeded()
    assert [[i for i, _ in batch] for batch in first] == list(plain)  # the same draws, with seeds attached
    assert first == seeded() and first != seeded(epoch=1)  # a function of (seed, epoch) only
    seeds = [s for batch in first for _, s in batch]
    assert len(set(seeds)) == len(seeds)
    shards = [seeded(rank, 2) for rank in (0, 1)]
    assert sorted(x for shard in shards for batch in shard for x in batch) == sorted(
        x for batch in first for x in batch)  # ranks split the single-process epoch, seeds included
