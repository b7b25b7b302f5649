"""IQA data: official-format loaders, split protocols, the training transform and the DataModule. Imports the
inference core (images, scales, preprocessing) and the file layer, nothing above.

Names are loaded on first use, so that importing one loader does not pull in Lightning, which only the DataModule
needs. Reading an image file is the inference core's (:mod:`qmamba.inference.images`).
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DATASETS": "catalog",
    "DatasetInfo": "catalog",
    "dataset_info": "catalog",
    "load_dataset": "catalog",
    "ComparisonSpec": "comparisons",
    "DatasetConfig": "datamodule",
    "IQADataModule": "datamodule",
    "IQADataset": "dataset",
    "DatasetError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
