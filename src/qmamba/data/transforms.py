"""Quality-preserving transforms: crops at native resolution and horizontal flips, nothing that changes pixels.

Resizing, colour jitter, blur, noise, compression or padding would change the very quality the labels describe, so
training uses only ``RandomCrop`` + ``HorizontalFlip`` (albumentations, seeded explicitly because its RNG ignores
the global seed) and evaluation uses a deterministic grid of crops whose predictions are averaged.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .catalog import DatasetError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalCrops", "TrainCrop", "crop_grid"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # VMamba's ImageNet pre-training statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_size(image: np.ndarray, size: int) -> None:
    if image.shape[0] < size or image.shape[1] < size:
        raise DatasetError(
            f"image of {image.shape[1]}x{image.shape[0]} is smaller than the {size}x{size} crop; qmamba never pads "
            "or upsamples (both change quality). Lower crop_size or drop such images from the dataset."
        )


class TrainCrop:
    """Random ``size`` crop + horizontal flip + ImageNet normalisation -> (3, size, size) float tensor."""

    def __init__(self, size: int, seed: int) -> None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it would query the package index on import
        import albumentations as A  # training only: scoring a checkpoint needs no albumentations
        from albumentations.pytorch import ToTensorV2

        self.size = size
        self.pipeline = A.Compose(
            [A.RandomCrop(size, size), A.HorizontalFlip(p=0.5), A.Normalize(IMAGENET_MEAN, IMAGENET_STD), ToTensorV2()],
            seed=seed,  # an int seed makes albumentations worker-aware (seed + torch.initial_seed() per worker)
        )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        _check_size(image, self.size)
        return self.pipeline(image=image)["image"]


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
    """Deterministic multi-crop evaluation: (count, 3, size, size) normalised crops of one image."""

    def __init__(self, size: int, count: int = 5) -> None:
        if count < 1:
            raise ValueError(f"eval crop count must be >= 1, got {count}")
        self.size, self.count = size, count
        self.mean = np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0
        self.std = np.array(IMAGENET_STD, dtype=np.float32) * 255.0

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        _check_size(image, self.size)
        s = self.size
        crops = np.stack([image[t : t + s, left : left + s] for t, left in crop_grid(*image.shape[:2], s, self.count)])
        crops = (crops.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()
