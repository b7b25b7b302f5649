"""What happens to an image before the model sees it, in one place for training, evaluation, scoring and export.

QMamba never resizes, pads or filters an image (each would change the quality the labels describe): it takes
native-resolution square crops and normalises them with the backbone's pre-training statistics. Training draws a
random crop (and flip) per sample (:class:`qmamba.data.transforms.TrainCrop`), evaluation and scoring average the
predictions over a deterministic grid of crops (:class:`EvalCrops`); both normalise through
:meth:`Preprocessing.normalize`. A checkpoint records its :class:`Preprocessing`, so a scorer crops and normalises
exactly as the model was trained and tested.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalCrops", "ImageTooSmallError", "Preprocessing", "crop_grid"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # VMamba's ImageNet pre-training statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageTooSmallError(ValueError):
    """An image has a side below the crop size (qmamba never pads or upsamples)."""


@dataclass(frozen=True)
class Preprocessing:
    """Crop size, evaluation crop count and normalisation of a model (RGB statistics on the [0, 1] scale)."""

    crop_size: int = 224
    eval_crops: int = 5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size}")
        if self.eval_crops < 1:
            raise ValueError(f"eval_crops must be >= 1, got {self.eval_crops}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def check_size(self, image: np.ndarray) -> None:
        """Refuse an (H, W, 3) image with a side below the crop size."""
        if image.shape[0] < self.crop_size or image.shape[1] < self.crop_size:
            raise ImageTooSmallError(
                f"image of {image.shape[1]}x{image.shape[0]} is smaller than the {self.crop_size}x{self.crop_size} "
                "crop; qmamba never pads or upsamples (both change quality). Lower crop_size or leave such images out."
            )

    def normalize(self, crops: np.ndarray) -> torch.Tensor:
        """(..., h, w, 3) uint8 RGB crops -> (..., 3, h, w) float32 tensor, ``(x / 255 - mean) / std``."""
        mean = np.asarray(self.mean, np.float32) * 255.0
        std = np.asarray(self.std, np.float32) * 255.0
        normalized = (np.asarray(crops, np.float32) - mean) / std
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(normalized, -1, -3)))

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint form (plain lists, so ``weights_only`` loading reads it)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def crop_grid(height: int, width: int, size: int, count: int) -> list[tuple[int, int]]:
    """``count`` (top, left) positions spread evenly over the image: the centre for 1, else an even grid."""
    if count == 1:
        return [((height - size) // 2, (width - size) // 2)]
    side = math.ceil(math.sqrt(count))
    tops = np.linspace(0, height - size, side).round().astype(int)
    lefts = np.linspace(0, width - size, side).round().astype(int)
    grid = [(int(t), int(left)) for t in tops for left in lefts]
    pick = np.linspace(0, len(grid) - 1, count).round().astype(int)
    return [grid[i] for i in pick]


class EvalCrops:
    """Deterministic multi-crop evaluation: an (H, W, 3) uint8 image -> (count, 3, size, size) normalised crops."""

    def __init__(self, preprocessing: Preprocessing, count: int | None = None) -> None:
        self.preprocessing = preprocessing
        self.size = preprocessing.crop_size
        self.count = preprocessing.eval_crops if count is None else count
        if self.count < 1:
            raise ValueError(f"eval crop count must be >= 1, got {self.count}")

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.preprocessing.normalize(self.cut(image))

    def cut(self, image: np.ndarray) -> np.ndarray:
        """The (count, size, size, 3) uint8 crops, not yet normalised: a quarter of the bytes, for crops that travel
        between processes before the model sees them."""
        self.preprocessing.check_size(image)
        s = self.size
        grid = crop_grid(image.shape[0], image.shape[1], s, self.count)
        return np.stack([image[t : t + s, left : left + s] for t, left in grid])
