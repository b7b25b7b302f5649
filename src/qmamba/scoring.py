"""Scoring images with a trained QMamba: everything needed comes from the checkpoint.

    import qmamba
    scorer = qmamba.load("runs/demo/checkpoints/best.ckpt")
    scorer.score("photo.jpg")                       # one float on the training dataset's native scale
    scorer.score(["a.png", pil_image, array, tensor])  # a list, batched internally

A qmamba checkpoint carries the architecture (hyper-parameters), the weights (with transfer prompts, if tuned), the
preprocessing (crop size, evaluation crops, normalisation) and each training dataset's score scale, so a score
means the same as the numbers the model was tested with: the mean over a deterministic grid of native-resolution
crops, mapped to the chosen dataset's scale and direction.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from PIL import Image

from qmamba.checkpoint import CheckpointError
from qmamba.data.images import read_rgb
from qmamba.errors import UsageError
from qmamba.preprocessing import EvalCrops
from qmamba.scale import ScoreScale
from qmamba.trained import load_trained

__all__ = ["ImageInput", "Result", "Scorer", "load"]

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def _as_rgb(image: ImageInput) -> np.ndarray:
    """(H, W, 3) array on the 0-255 scale from a path, a PIL image, an HWC / HW array or a CHW / HW tensor.

    Floating-point arrays and tensors are taken to be in [0, 1]; integer ones in [0, 255]."""
    if isinstance(image, (str, os.PathLike)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        image = (tensor.permute(1, 2, 0) if tensor.dim() == 3 else tensor).numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got an array of shape {array.shape}")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    return array.astype(np.float32) * 255.0 if np.issubdtype(array.dtype, np.floating) else array


class Result(NamedTuple):
    """One image's outcome: its position in the input, and its score or why it could not be scored."""

    index: int
    score: float | None
    error: str | None


@dataclass
class Scorer:
    """A trained model with its preprocessing; :meth:`score` maps images to quality scores."""

    model: torch.nn.Module
    crops: EvalCrops
    scale: ScoreScale
    dataset: str
    info: dict[str, Any]
    device: torch.device
    batch_size: int = 8

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], device: str | torch.device | None = None, crops: int | None = None,
        dataset: str | None = None, batch_size: int = 8, trusted: bool = False,
    ) -> Scorer:
        """Build the model a qmamba checkpoint describes. ``dataset`` picks whose scale scores are reported on
        (default: the first training dataset); ``crops`` overrides the evaluation crop count."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        trained = load_trained(path, trusted=trusted)
        spec = trained.spec
        dataset = dataset or spec.datasets[0]
        scale = spec.scale_of(dataset)
        evaluation = EvalCrops(spec.preprocessing, crops)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {device}: no CUDA GPU is visible here; use the CPU (device cpu)")
        info = {"checkpoint": str(path), "backbone": trained.architecture["backbone"], "datasets": spec.datasets,
                "dataset": dataset, "crop_size": evaluation.size, "crops": evaluation.count,
                "score_range": scale.as_dict()}
        return cls(trained.model.to(device), evaluation, scale, dataset, info, device, batch_size)

    @torch.inference_mode()
    def _batch(self, crops: list[torch.Tensor]) -> list[float]:
        counts = [len(c) for c in crops]
        units = self.model(torch.cat(crops).to(self.device)).float().cpu()
        means = torch.stack([chunk.mean() for chunk in units.split(counts)])
        return self.scale.to_native(means).tolist()

    def iter_batches(self, images: Iterable[ImageInput]) -> Iterator[list[Result]]:
        """Results in input order, one list per model batch (or per image that cannot be scored): a caller can stop
        between lists without losing a computed score. Never stops early because of a bad image."""
        pending: list[tuple[int, torch.Tensor]] = []
        for index, image in enumerate(images):
            try:
                pending.append((index, self.crops(_as_rgb(image))))
            except Exception as err:  # noqa: BLE001 - reported per image, the others are still scored
                yield [Result(index, None, str(err))]
                continue
            if len(pending) == self.batch_size:
                yield self._scored(pending)
                pending = []
        if pending:
            yield self._scored(pending)

    def iter_scores(self, images: Iterable[ImageInput]) -> Iterator[Result]:
        """:meth:`iter_batches`, one result at a time."""
        for batch in self.iter_batches(images):
            yield from batch

    def _scored(self, pending: list[tuple[int, torch.Tensor]]) -> list[Result]:
        scores = self._batch([crops for _, crops in pending])
        return [Result(index, score, None) for (index, _), score in zip(pending, scores, strict=True)]

    def score(self, images: ImageInput | Sequence[ImageInput]) -> float | list[float]:
        """Quality score(s) on the dataset's native scale; raises on an image that cannot be scored."""
        single = not isinstance(images, (list, tuple))
        results = list(self.iter_scores([images] if single else images))
        errors = [f"image {i}: {e}" for i, _, e in results if e is not None]
        if errors:
            raise ValueError("; ".join(errors))
        scores = [s for _, s, _ in results]
        return scores[0] if single else scores  # type: ignore[return-value]


def load(checkpoint: str | os.PathLike[str], **kwargs: Any) -> Scorer:
    """A :class:`Scorer` for a qmamba checkpoint (see :meth:`Scorer.from_checkpoint` for the options)."""
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    return Scorer.from_checkpoint(checkpoint, **kwargs)
