"""Torch datasets over label tables: one image (or its evaluation crops) and its normalised score per item, or the
two images of a comparison and the judged probability that the first is better."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from qmamba.inference.sources import read_image

__all__ = ["IQADataset", "PairDataset", "SeededConcat"]


class IQADataset(Dataset):
    """Items ``{"image", "target", "std", "index", "dataset"}`` (+ ``"path"``); target is the unit-scale score, std
    the standard deviation of its ratings on the unit scale (NaN where unknown).

    ``image`` is (3, h, w) for a training transform or (n, 3, h, w) for multi-crop evaluation. Without scores
    (``scores=None``, e.g. prediction on new images, or the images of comparisons) the target is NaN.
    """

    def __init__(
        self,
        paths: Sequence[str],
        scores: np.ndarray | None,
        transform: Callable[..., torch.Tensor],
        dataset_index: int = 0,
        cache: dict[str, np.ndarray] | None = None,
        stds: np.ndarray | None = None,
    ) -> None:
        self.paths = list(paths)
        self.targets = np.full(len(self.paths), np.nan, np.float32) if scores is None else scores.astype(np.float32)
        self.stds = np.full(len(self.paths), np.nan, np.float32) if stds is None else stds.astype(np.float32)
        self.transform = transform
        self.dataset_index = dataset_index
        self.cache = cache  # decoded images shared by the splits of one process (small datasets, CPU runs)

    def _image(self, path: str) -> np.ndarray:
        if self.cache is None:
            return read_image(path)
        if path not in self.cache:
            self.cache[path] = read_image(path)
        return self.cache[path]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, object]:
        return self.item(index)

    def item(self, index: int, seed: int | None = None) -> dict[str, object]:
        """Item ``index``; ``seed`` fixes a random transform's draw for it (see :class:`SeededConcat`)."""
        image = self._image(self.paths[index])
        return {
            "image": self.transform(image) if seed is None else self.transform(image, seed=seed),
            "target": torch.tensor(self.targets[index]),
            "std": torch.tensor(self.stds[index]),
            "index": index,
            "dataset": self.dataset_index,
            "path": self.paths[index],
        }


class PairDataset(Dataset):
    """Comparisons for training: items ``{"image", "judged", "weight", "index", "dataset"}``, ``image`` the (2, 3, h,
    w) crops of the two images, ``judged`` the share of the ``weight`` judgements that found the first better.
    ``images`` reads and crops them (an :class:`IQADataset` over the comparisons' images)."""

    def __init__(self, images: IQADataset, first: np.ndarray, second: np.ndarray, judged: np.ndarray,
                 weight: np.ndarray) -> None:
        self.images, self.first, self.second = images, first.astype(np.int64), second.astype(np.int64)
        self.judged, self.weight = judged.astype(np.float32), weight.astype(np.float32)

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, index: int) -> dict[str, object]:
        return self.item(index)

    def item(self, index: int, seed: int | None = None) -> dict[str, object]:
        """Pair ``index``; ``seed`` fixes both crops' draws (the second image's from a seed of its own)."""
        seeds = (None, None) if seed is None else (seed, (seed * 1_000_003 + 1) % 2**31)
        crops = [self.images.item(int(image), s)["image"]
                 for image, s in zip((self.first[index], self.second[index]), seeds, strict=True)]
        return {"image": torch.stack(crops), "judged": torch.tensor(self.judged[index]),
                "weight": torch.tensor(self.weight[index]), "index": index, "dataset": self.images.dataset_index}


class SeededConcat(ConcatDataset):
    """The training datasets back to back, indexed by the ``(index, seed)`` pairs of
    :class:`~qmamba.data.sampler.SeededBatches`."""

    def __getitem__(self, key: tuple[int, int]) -> dict[str, object]:  # type: ignore[override]
        index, seed = key
        which = bisect.bisect_right(self.cumulative_sizes, index)
        local = index - (self.cumulative_sizes[which - 1] if which else 0)
        return self.datasets[which].item(local, seed)  # type: ignore[attr-defined]
