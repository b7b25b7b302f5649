"""IQA data: official-format loaders, split protocols, transforms and the DataModule."""

from .catalog import DATASETS, DatasetError, DatasetInfo, dataset_info, load_dataset
from .datamodule import DatasetConfig, IQADataModule
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
