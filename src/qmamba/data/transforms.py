"""The training transform: a random native-resolution crop and a horizontal flip, nothing that changes pixels.

Resizing, colour jitter, blur, noise, compression or padding would change the very quality the labels describe, so
training uses only ``RandomCrop`` + ``HorizontalFlip`` (albumentations, seeded explicitly because its RNG ignores
the global seed); normalisation and the evaluation crops are :mod:`qmamba.inference.preprocessing`'s, shared
with scoring.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from qmamba.inference.preprocessing import Preprocessing

__all__ = ["TrainCrop"]


class TrainCrop:
    """Random ``crop_size`` crop + horizontal flip + the model's normalisation -> (3, size, size) float tensor."""

    def __init__(self, preprocessing: Preprocessing, seed: int) -> None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it would query the package index on import
        import albumentations as A  # training only: scoring a checkpoint needs no albumentations

        self.preprocessing = preprocessing
        size = preprocessing.crop_size
        # an int seed makes albumentations worker-aware (seed + torch.initial_seed() per worker)
        self.pipeline = A.Compose([A.RandomCrop(size, size), A.HorizontalFlip(p=0.5)], seed=seed)

    def __call__(self, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
        """A random crop of ``image``; with ``seed``, the crop and flip are that seed's (and nothing else's)."""
        self.preprocessing.check_size(image)
        if seed is not None:
            self.pipeline.set_random_seed(seed)
        return self.preprocessing.normalize(self.pipeline(image=image)["image"])
