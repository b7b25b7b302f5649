"""The IQA DataModule: one or several datasets, split by protocol, one validation / test loader per dataset.

With several datasets (universal IQA) training batches come from :class:`MultiDatasetBatchSampler` (shares by
strategy, single-dataset batches, DDP sharding); scores are trained on each dataset's [0, 1] higher-is-better
scale (:class:`~qmamba.inference.scale.ScoreScale`: min-max over the dataset's known range, DMOS flipped) and
reported on the native scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from qmamba.errors import UsageError
from qmamba.inference.preprocessing import EvalCrops, Preprocessing
from qmamba.inference.scale import ScoreScale
from qmamba.inference.trained import DataSpec

from .catalog import DatasetError, dataset_info, load_dataset
from .checks import CheckMode, check_images, report_problems
from .dataset import IQADataset, SeededConcat
from .sampler import MultiDatasetBatchSampler, SeededBatches, ShardSampler, Strategy, dataset_shares
from .splits import make_splits, save_splits
from .transforms import TrainCrop

__all__ = ["DatasetConfig", "IQADataModule"]

log = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    """One dataset of a run.

    Args:
        name: registered dataset (``koniq10k``, ``kadid10k``, ...; see ``qmamba.data.DATASETS``).
        root: folder of the unpacked official release (default: the dataset's ``data/`` folder).
        label: name used in metric keys and outputs (default: ``name``), e.g. ``demo_kadid``.
        protocol: ``auto`` (the dataset's community protocol), ``content``, ``random`` or ``official``.
        options: loader options, e.g. ``{resolution: 512x384}`` for KonIQ.
        score_range: the (low, high) scale of relabelled data; by default the dataset's own (labels outside it
            are an error).
        short_side: resize images to this shorter side before training (once, into ``cache_dir``); ``auto`` is
            the dataset's default (512 for SPAQ, native resolution for the others), None keeps the originals.
        cache_dir: folder of the resized copies (default ``<root>/qmamba_short<N>``).
    """

    name: str
    root: str | None = None
    label: str | None = None
    protocol: Literal["auto", "content", "random", "official"] = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    score_range: tuple[float, float] | None = None
    short_side: int | Literal["auto"] | None = "auto"
    cache_dir: str | None = None

    @property
    def key(self) -> str:
        return self.label or self.name


class IQADataModule(L.LightningDataModule):
    """Images and unit-scale scores for training; per-dataset multi-crop loaders for validation and test.

    Args:
        datasets: the datasets of the run (one for task-specific IQA, several for universal IQA).
        batch_size: training crops per batch; evaluation batches hold ``batch_size // eval_crops`` images.
        crop_size: square crop side at native resolution (224 in the paper).
        eval_crops: deterministic crops per image at validation / test time, predictions averaged.
        train_repeats: random crops per training image per epoch (DEIQT's ``PATCH_NUM``).
        test_fraction: held-out share for random / content protocols.
        val_fraction: share carved out of training for checkpoint selection; 0 validates on the test split
            (the optimistic "best epoch on test" practice of HyperIQA/DEIQT, kept for paper comparisons).
        split_seed: seed of the split (repeat a protocol with seeds 0..9).
        num_workers: data-loading processes.
        cache_images: keep decoded images in memory (each loader process holds its own copy): for small
            datasets, especially on CPUs where decoding competes with training for the cores.
        check_images: before training, ``full`` decodes every image once (catches truncated files), ``header``
            reads only sizes, ``off`` only tests that files exist. All problems are reported together.
        small_images: images with a side below ``crop_size``: ``error`` (report them) or ``drop`` (leave them
            out, logged). qmamba never pads or upscales, both of which change the quality being scored.
        sampling: each dataset's share of a training epoch: ``proportional`` to its size, ``balanced`` (equal) or
            ``temperature`` (size^(1/T)); see :mod:`qmamba.data.sampler`.
        temperature: T of the ``temperature`` strategy.
        mixed_batches: draw batches across datasets instead of one dataset per batch (the default keeps in-batch
            correlation and ranking losses meaningful: scores of different datasets are not comparable).
        epoch_samples: training crops per epoch over all devices (default: training images x train_repeats).
    """

    def __init__(
        self,
        datasets: list[DatasetConfig],
        batch_size: int = 32,
        crop_size: int = 224,
        eval_crops: int = 5,
        train_repeats: int = 1,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 4,
        cache_images: bool = False,
        check_images: CheckMode = "full",
        small_images: Literal["error", "drop"] = "error",
        sampling: Strategy = "proportional",
        temperature: float = 2.0,
        mixed_batches: bool = False,
        epoch_samples: int | None = None,
    ) -> None:
        super().__init__()
        if not datasets:
            raise UsageError("data.init_args.datasets must name at least one dataset")
        for name, value in (("batch_size", batch_size), ("crop_size", crop_size), ("eval_crops", eval_crops),
                            ("train_repeats", train_repeats)):
            if value < 1:
                raise UsageError(f"data.init_args.{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise UsageError("data.init_args.num_workers must be >= 0 (0 loads in the main process), got "
                             f"{num_workers}")
        for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
            if not 0 <= value < 1:
                raise UsageError(f"data.init_args.{name} must be in [0, 1), got {value}")
        if test_fraction + val_fraction >= 1:
            raise UsageError(f"data.init_args.test_fraction + val_fraction must be below 1 (something must be left "
                             f"to train on), got {test_fraction} + {val_fraction}")
        self.configs = [d if isinstance(d, DatasetConfig) else DatasetConfig(**d) for d in datasets]
        keys = [c.key for c in self.configs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"dataset labels must be unique, got {keys}; set 'label' to tell them apart")
        self.batch_size, self.crop_size, self.eval_crops = batch_size, crop_size, eval_crops
        self.train_repeats, self.num_workers, self.cache_images = train_repeats, num_workers, cache_images
        self.test_fraction, self.val_fraction, self.split_seed = test_fraction, val_fraction, split_seed
        self.check_images, self.small_images = check_images, small_images
        self.sampling, self.temperature, self.mixed_batches = sampling, temperature, mixed_batches
        self.epoch_samples = epoch_samples
        dataset_shares([1] * len(self.configs), sampling, temperature)  # a bad strategy fails at construction
        self.names = keys
        self.scales = [dataset_info(c.name).scale for c in self.configs]
        self.preprocessing = Preprocessing(crop_size, eval_crops)  # the backbone's (ImageNet) normalisation
        self._splits: list[dict[str, Dataset]] | None = None
        self._seed = 0  # set in setup from the global seed; every DDP rank gets the same one

    @property
    def spec(self) -> DataSpec:
        """What a model trained on this data must remember: dataset names, score scales, preprocessing."""
        return DataSpec(list(self.names), list(self.scales), self.preprocessing)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        self._seed = seed = int(torch.initial_seed() % 2**31)  # follows seed_everything; albumentations needs it
        self._splits = []
        for index, config in enumerate(self.configs):
            info = dataset_info(config.name)
            labels = load_dataset(config.name, config.root, config.score_range, **config.options)
            # the scale in force: the dataset's, a loader option's (KonIQ's 1-5 MOS) or the config's score_range
            self.scales[index] = scale = ScoreScale(*labels.attrs["score_range"], info.lower_better)
            table = self._usable_images(config, labels)
            protocol = info.protocol if config.protocol == "auto" else config.protocol
            if config.protocol == "auto" and info.official_split:  # never a silent fallback from the official split
                protocol = "official"
            try:
                splits = make_splits(table, protocol, self.split_seed, self.test_fraction, self.val_fraction)
            except DatasetError as err:
                raise DatasetError(f"{config.key}: {err}") from None
            if len(splits["val"]) == 0:
                log.warning("%s: no validation split; validating on the test split (best-on-test selection)",
                            config.key)
                splits["val"] = splits["test"]
            self._save_splits(config.key, table, splits)
            targets = scale.to_unit(table["score"].to_numpy(np.float64))
            paths = table["path"].tolist()
            cache: dict[str, np.ndarray] | None = {} if self.cache_images else None

            def subset(rows: np.ndarray, transform: Any, index: int = index, cache: Any = cache) -> IQADataset:
                return IQADataset([paths[i] for i in rows], targets[rows], transform, index, cache)

            train_crop = TrainCrop(self.preprocessing, seed=seed + index)
            evaluation = EvalCrops(self.preprocessing)
            self._splits.append({
                "train": subset(splits["train"], train_crop),
                "val": subset(splits["val"], evaluation),
                "test": subset(splits["test"], evaluation),
            })
            log.info("%s (%s split): %s", config.key, protocol,
                     ", ".join(f"{s} {len(v)}" for s, v in self._splits[-1].items()))

    def _usable_images(self, config: DatasetConfig, table: pd.DataFrame) -> pd.DataFrame:
        """Check every image (resizing into the cache where configured) and keep the usable ones."""
        info = dataset_info(config.name)
        short_side = info.short_side if config.short_side == "auto" else config.short_side
        cache_dir = None
        if short_side:
            root = Path(config.root or info.default_root)
            cache_dir = Path(config.cache_dir) if config.cache_dir else root / f"qmamba_short{short_side}"
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise DatasetError(f"{config.key}: cannot create {cache_dir} for the resized images ({err}); set "
                                   "the dataset's cache_dir to a writable folder") from err
            log.info("%s: images resized to a %d shorter side in %s (made once)", config.key, short_side, cache_dir)
        checks = check_images(table["path"].tolist(), table["name"].tolist(), mode=self.check_images,
                              min_size=self.crop_size, short_side=short_side, cache_dir=cache_dir)
        report_problems(config.key, checks, allow=("too small",) if self.small_images == "drop" else ())
        keep = np.array([c.problem is None for c in checks])
        if not keep.all():
            log.warning("%s: left out %d images smaller than the %d crop (small_images: drop)", config.key,
                        int((~keep).sum()), self.crop_size)
        return table.assign(path=[c.path for c in checks])[keep].reset_index(drop=True)

    def _save_splits(self, key: str, table: Any, splits: dict[str, np.ndarray]) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, or rank 0 waits forever
        if trainer.is_global_zero and log_dir:
            save_splits(table, splits, Path(log_dir) / "splits" / f"{key}.csv")

    def split(self, name: str) -> list[IQADataset]:
        """The ``train`` / ``val`` / ``test`` dataset of every configured dataset (after ``setup``)."""
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        return [s[name] for s in self._splits]  # type: ignore[misc]

    # ---------------------------------------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        """(rank, world size) of this process (a single process before a trainer is attached)."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def train_sampler(self) -> MultiDatasetBatchSampler:
        """The training batch sampler of this rank (after ``setup``)."""
        sizes = [len(d) for d in self.split("train")]
        rank, world = self._world()
        return MultiDatasetBatchSampler(
            sizes, self.batch_size, self.sampling, self.temperature,
            epoch_samples=self.epoch_samples or sum(sizes) * self.train_repeats, mixed=self.mixed_batches,
            seed=self._seed, rank=rank, world_size=world,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        epoch = (lambda: trainer.current_epoch) if trainer is not None else None
        return self._loader(SeededConcat(self.split("train")), batch_sampler=SeededBatches(self.train_sampler(), epoch))

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        batch = max(1, self.batch_size // self.eval_crops)
        rank, world = self._world()
        return [self._loader(d, batch_size=batch, sampler=ShardSampler(len(d), rank, world)) for d in self.split(split)]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")
