"""IQA data: official-format loaders, split protocols, transforms and the DataModule."""

from typing import Any

from .catalog import DATASETS, DatasetError, DatasetInfo, dataset_info, load_dataset
from .dataset import IQADataset, ScoreScale
from .images import ImageReadError, read_rgb

__all__ = [
    "DATASETS",
    "DatasetConfig",
    "DatasetError",
    "DatasetInfo",
    "IQADataModule",
    "IQADataset",
    "ImageReadError",
    "ScoreScale",
    "dataset_info",
    "load_dataset",
    "read_rgb",
]


def __getattr__(name: str) -> Any:
    """The DataModule (which imports Lightning) is loaded on first use, so that scoring never imports Lightning."""
    if name in ("DatasetConfig", "IQADataModule"):
        from . import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
