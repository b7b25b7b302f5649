"""Sampling several IQA datasets in one training run (universal IQA), correct under DDP.

Datasets differ in size by 40x (LIVE 779 vs FLIVE 39,810), so plain concatenation lets the largest one dominate.
:class:`MultiDatasetBatchSampler` draws each dataset's share of an epoch by a strategy:

* ``proportional``: share ~ size (concatenation, but with a defined epoch and DDP sharding);
* ``balanced``: equal shares (small datasets are revisited, large ones subsampled within an epoch);
* ``temperature``: share ~ size^(1/T), between the two (T = 1 proportional, T -> inf balanced).

By default a batch holds one dataset. Correlation and ranking losses compare the scores inside a batch, and scores
of different datasets are not comparable even after normalisation to [0, 1] (a KADID 0.6 is not a KonIQ 0.6), so
single-dataset batches keep those losses meaningful; ``mixed=True`` gives batches drawn across datasets for pure
regression losses.

Every rank builds the same global list of batches from ``(seed, epoch)`` and takes every ``world_size``-th one, so
ranks see disjoint draws and the same number of batches (no rank waits in an all-reduce); ``set_epoch`` reshuffles
(:class:`SeededBatches` calls it with the trainer's epoch). Use it with ``Trainer(use_distributed_sampler=False)``,
the qmamba CLI default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
from torch.utils.data import Sampler

from qmamba.errors import UsageError

__all__ = ["MultiDatasetBatchSampler", "SeededBatches", "ShardSampler", "dataset_shares"]

Strategy = Literal["proportional", "balanced", "temperature"]


def dataset_shares(sizes: Sequence[int], strategy: Strategy, temperature: float = 2.0) -> np.ndarray:
    """Fraction of an epoch's samples drawn from each dataset."""
    sizes_ = np.asarray(sizes, dtype=np.float64)
    if (sizes_ <= 0).any():
        raise ValueError(f"every dataset needs training images, got sizes {list(sizes)}")
    if strategy == "proportional":
        weights = sizes_
    elif strategy == "balanced":
        weights = np.ones_like(sizes_)
    elif strategy == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = sizes_ ** (1.0 / temperature)
    else:
        raise ValueError(f"unknown sampling strategy {strategy!r}; use proportional, balanced or temperature")
    return weights / weights.sum()


def _apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """Integers summing to ``total`` in the given shares (largest remainder)."""
    raw = shares * total
    counts = np.floor(raw).astype(np.int64)
    counts[np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]] += 1
    return counts


def _draw(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices of one dataset: whole permutations back to back (each image once before any repeats)."""
    rounds = -(-count // size)
    return np.concatenate([rng.permutation(size) for _ in range(rounds)])[:count]


class MultiDatasetBatchSampler(Sampler[list[int]]):
    """Batches of indices into the concatenation of datasets with ``sizes`` (a ``ConcatDataset``'s order).

    Args:
        sizes: number of training items of each dataset.
        batch_size: items per batch on each rank.
        strategy, temperature: how the epoch is shared between datasets (module docstring).
        epoch_samples: items per epoch over all ranks (default: the sum of sizes), rounded down to whole batches
            on every rank.
        mixed: batches mix datasets instead of holding one dataset each.
        seed: the epoch's draw depends on (seed, epoch) only.
        rank, world_size: this process's place in a DDP world (defaults: a single process).
        names: the datasets' names, for messages.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        strategy: Strategy = "proportional",
        temperature: float = 2.0,
        epoch_samples: int | None = None,
        mixed: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        names: Sequence[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.sizes = [int(s) for s in sizes]
        self.shares = dataset_shares(self.sizes, strategy, temperature)
        self.batch_size, self.mixed, self.seed = batch_size, mixed, seed
        self.rank, self.world_size = rank, world_size
        samples = sum(self.sizes) if epoch_samples is None else int(epoch_samples)
        self.batches_per_rank = samples // (batch_size * world_size)
        if self.batches_per_rank == 0:
            raise UsageError(f"an epoch of {samples} training images holds no batch of {batch_size} on each of "
                             f"{world_size} rank(s): lower data.init_args.batch_size to at most "
                             f"{samples // world_size} or raise data.init_args.epoch_samples")
        self.offsets = np.cumsum([0, *self.sizes[:-1]])
        self.epoch = 0
        # the epoch's share of each dataset, the same in every epoch: a dataset without one would never be trained on
        n_batches = self.batches_per_rank * world_size
        unit = 1 if mixed else batch_size
        self.counts = _apportion(n_batches * batch_size // unit, self.shares) * unit
        names = names or [f"dataset {i + 1} of {len(self.sizes)}" for i in range(len(self.sizes))]
        starved = [f"{name} ({size} training images)" for name, size, count
                   in zip(names, self.sizes, self.counts, strict=True) if count == 0]
        if starved:
            raise UsageError(f"{', '.join(starved)} would get no "
                             f"{'sample' if mixed else f'batch of {batch_size}'} in an epoch of {n_batches} batches "
                             f"({strategy} sampling), so it would never be trained on: use data.init_args.sampling: "
                             "balanced, a smaller batch_size, a larger epoch_samples or mixed_batches: true")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank

    def global_batches(self) -> np.ndarray:
        """All ranks' batches of this epoch, (batches, batch_size) global indices, in the order they are dealt."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n_batches = self.batches_per_rank * self.world_size
        # mixed: apportioned samples, then shuffled across batches; else whole batches apportioned per dataset
        draws = [offset + _draw(size, count, rng) for offset, size, count in zip(self.offsets, self.sizes,
                                                                                  self.counts, strict=True)]
        if self.mixed:
            flat = np.concatenate(draws)
            return flat[rng.permutation(len(flat))].reshape(n_batches, self.batch_size)
        batches = np.concatenate([d.reshape(-1, self.batch_size) for d in draws])
        return batches[rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.rank :: self.world_size]:
            yield batch.tolist()


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """The batches of a :class:`MultiDatasetBatchSampler` with a seed for each item, derived from (seed, epoch,
    position): an item's random crop and flip then depend on nothing else, not on loader processes and not on what
    ran before a resume, so a resumed run repeats the uninterrupted one.

    ``epoch`` returns the epoch about to run (the DataModule passes the trainer's). Lightning itself calls
    ``set_epoch`` only on a loader's ``sampler`` and ``batch_sampler.sampler``, never on a batch sampler, so without
    it every epoch would draw the same batches."""

    def __init__(self, batches: MultiDatasetBatchSampler, epoch: Callable[[], int] | None = None) -> None:
        self.batches, self.epoch = batches, epoch

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.batches
        if self.epoch is not None:
            b.set_epoch(self.epoch())
        global_batches = b.global_batches()
        seeds = np.random.default_rng([b.seed, b.epoch, 1]).integers(0, 2**31, size=global_batches.shape)
        for batch, batch_seeds in zip(global_batches[b.rank :: b.world_size], seeds[b.rank :: b.world_size],
                                      strict=True):
            yield list(zip(batch.tolist(), batch_seeds.tolist(), strict=True))


class ShardSampler(Sampler[int]):
    """Evaluation indices of one rank: every ``world_size``-th item, in order, without the padding that
    ``DistributedSampler`` adds (padding duplicates images and would bias SRCC/PLCC). Metrics are gathered across
    ranks afterwards, so every image is scored exactly once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))
