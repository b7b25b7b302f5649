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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from qmamba.checkpoint import CheckpointError
from qmamba.data.images import read_rgb
from qmamba.preprocessing import EvalCrops
from qmamba.scale import ScoreScale
from qmamba.trained import load_trained

__all__ = ["ImageInput", "Scorer", "load"]

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
        trained = load_trained(path, trusted=trusted)
        spec = trained.spec
        dataset = dataset or spec.datasets[0]
        scale = spec.scale_of(dataset)
        evaluation = EvalCrops(spec.preprocessing, crops)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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

    def iter_scores(self, images: Sequence[ImageInput]) -> Iterator[tuple[int, float | None, str | None]]:
        """``(index, score, None)`` per image, or ``(index, None, error)`` for one that cannot be scored; never
        stops early because of a bad image."""
        pending: list[tuple[int, torch.Tensor]] = []
        for index, image in enumerate(images):
            try:
                pending.append((index, self.crops(_as_rgb(image))))
            except Exception as err:  # noqa: BLE001 - reported per image, the others are still scored
                yield index, None, str(err)
                continue
            if len(pending) == self.batch_size:
                yield from self._scored(pending)
                pending = []
        if pending:
            yield from self._scored(pending)

    def _scored(self, pending: list[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, float | None, str | None]]:
        scores = self._batch([crops for _, crops in pending])
        return ((index, score, None) for (index, _), score in zip(pending, scores, strict=True))

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


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm"}


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files from files and folders (recursive, sorted); inputs that do not exist are returned as errors."""
    files, errors = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(str(path))
        else:
            errors.append((str(path), "no such file or folder"))
    return files, errors


def _write_results(output: Path, scorer: Scorer, rows: list[tuple[str, float]], errors: list[tuple[str, str]]) -> None:
    import io
    import json

    from qmamba.atomic import write_text_atomic

    if output.suffix.lower() == ".json":
        scale = scorer.scale
        payload = {
            "model": scorer.info,
            "score_range": [scale.low, scale.high],
            "direction": "lower is better" if scale.lower_better else "higher is better",
            "scores": [{"path": p, "score": s} for p, s in rows],
            "errors": [{"path": p, "error": e} for p, e in errors],
        }
        write_text_atomic(output, json.dumps(payload, indent=2) + "\n")
    else:
        import csv

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "score"])
        writer.writerows((p, f"{s:.6g}") for p, s in rows)
        write_text_atomic(output, buffer.getvalue())


def main(argv: list[str]) -> None:
    """``qmamba score``: score image files and folders with a trained checkpoint."""
    import argparse
    import sys

    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="qmamba score", description="Score images with a trained QMamba checkpoint.")
    parser.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a qmamba checkpoint (runs/<name>/...)")
    parser.add_argument("--output", "-o", help="write scores.csv (path,score) or scores.json; default: CSV on stdout")
    parser.add_argument("--crops", type=int, help="evaluation crops per image (default: as in training)")
    parser.add_argument("--dataset", help="report on this training dataset's scale (default: the first)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    args = parser.parse_args(argv)
    scorer = load(args.ckpt_path, device=args.device, crops=args.crops, dataset=args.dataset,
                  batch_size=args.batch_size)
    files, errors = expand_inputs(args.inputs)
    rows: list[tuple[str, float]] = []
    try:
        for index, score, error in tqdm(scorer.iter_scores(files), total=len(files), desc="scoring", unit="img",
                                        file=sys.stderr, disable=not files):
            if error is None:
                rows.append((files[index], score))  # type: ignore[arg-type]
            else:
                errors.append((files[index], error))
    finally:  # an interrupted run still leaves the scores it computed
        if args.output:
            _write_results(Path(args.output), scorer, rows, errors)
    if not args.output:
        print("path,score")
        for path, score in rows:
            print(f"{path},{score:.6g}")
    for path, error in errors:
        print(f"qmamba score: skipped {path}: {error}", file=sys.stderr)
    print(f"qmamba score: {len(rows)} scored, {len(errors)} skipped ({scorer.dataset} scale "
          f"{scorer.scale.low:g}-{scorer.scale.high:g}, {'lower' if scorer.scale.lower_better else 'higher'} is "
          "better)", file=sys.stderr)
    if errors:
        raise SystemExit(1)
