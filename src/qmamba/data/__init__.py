"""IQA data: official-format loaders, split protocols, the training transform and the DataModule.

Names are loaded on first use: reading an image (:func:`read_rgb`, used by scoring) must not pull in pandas or
Lightning, which the label loaders and the DataModule need.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DATASETS": "catalog",
    "DatasetInfo": "catalog",
    "dataset_info": "catalog",
    "load_dataset": "catalog",
    "DatasetConfig": "datamodule",
    "IQADataModule": "datamodule",
    "IQADataset": "dataset",
    "DatasetError": "errors",
    "ImageReadError": "images",
    "read_rgb": "images",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
