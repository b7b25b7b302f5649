"""The IQA DataModule: one or several datasets, split by protocol, one validation / test loader per dataset."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from .catalog import DatasetError, dataset_info, load_dataset
from .dataset import IQADataset, ScoreScale
from .splits import make_splits, save_splits
from .transforms import EvalCrops, TrainCrop

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
    """

    name: str
    root: str | None = None
    label: str | None = None
    protocol: Literal["auto", "content", "random", "official"] = "auto"
    options: dict[str, Any] = field(default_factory=dict)

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
    ) -> None:
        super().__init__()
        if not datasets:
            raise ValueError("datasets must name at least one dataset")
        self.configs = [d if isinstance(d, DatasetConfig) else DatasetConfig(**d) for d in datasets]
        keys = [c.key for c in self.configs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"dataset labels must be unique, got {keys}; set 'label' to tell them apart")
        self.batch_size, self.crop_size, self.eval_crops = batch_size, crop_size, eval_crops
        self.train_repeats, self.num_workers, self.cache_images = train_repeats, num_workers, cache_images
        self.test_fraction, self.val_fraction, self.split_seed = test_fraction, val_fraction, split_seed
        self.names = keys
        self.scales = [ScoreScale.of(dataset_info(c.name)) for c in self.configs]
        self._splits: list[dict[str, Dataset]] | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        seed = int(torch.initial_seed() % 2**31)  # follows the CLI's seed_everything; albumentations needs it
        self._splits = []
        for index, (config, scale) in enumerate(zip(self.configs, self.scales, strict=True)):
            info = dataset_info(config.name)
            table = load_dataset(config.name, config.root, **config.options)
            _check_files_exist(config.key, table["path"].tolist())
            protocol = info.protocol if config.protocol == "auto" else config.protocol
            if config.protocol == "auto" and info.official_split and "split" in table and table["split"].notna().all():
                protocol = "official"
            splits = make_splits(table, protocol, self.split_seed, self.test_fraction, self.val_fraction)
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

            train_crop = TrainCrop(self.crop_size, seed=seed + index)
            evaluation = EvalCrops(self.crop_size, self.eval_crops)
            self._splits.append({
                "train": subset(splits["train"], train_crop),
                "val": subset(splits["val"], evaluation),
                "test": subset(splits["test"], evaluation),
            })
            log.info("%s (%s split): %s", config.key, protocol,
                     ", ".join(f"{s} {len(v)}" for s, v in self._splits[-1].items()))

    def _save_splits(self, key: str, table: Any, splits: dict[str, np.ndarray]) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero and trainer.log_dir:
            save_splits(table, splits, Path(trainer.log_dir) / "splits" / f"{key}.csv")

    def split(self, name: str) -> list[IQADataset]:
        """The ``train`` / ``val`` / ``test`` dataset of every configured dataset (after ``setup``)."""
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        return [s[name] for s in self._splits]  # type: ignore[misc]

    # ---------------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > batch_size,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        train = ConcatDataset(self.split("train") * self.train_repeats)
        return self._loader(train, self.batch_size, shuffle=True)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        batch = max(1, self.batch_size // self.eval_crops)
        return [self._loader(d, batch, shuffle=False) for d in self.split(split)]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")


def _check_files_exist(key: str, paths: list[str]) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"{key}: {len(missing)} of {len(paths)} images listed in the labels are missing, e.g. "
            + ", ".join(missing[:5]) + ". Check the dataset root and that the archive was fully extracted."
        )
