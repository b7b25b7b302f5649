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

import contextlib
import io
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from PIL import Image

from qmamba.errors import UsageError
from qmamba.files.model_folder import WEIGHTS_NAME
from qmamba.inference.images import read_rgb
from qmamba.inference.model_sources import resolve_model
from qmamba.inference.precision import Precision, precision_context, resolve_precision
from qmamba.inference.preprocessing import EvalCrops
from qmamba.inference.quality_maps import QualityMap, window_starts
from qmamba.inference.scale import ScoreScale
from qmamba.inference.sources import NetworkLimits, read_image
from qmamba.inference.trained import load_trained
from qmamba.models.compiling import compile_model, run_compiled
from qmamba.models.low_precision import prepare_bf16_inference

__all__ = ["ImageInput", "MapJob", "Preparer", "Result", "Scorer", "default_device", "load", "results_table"]

COMPILE_OPTION = "--compile (compile=True in qmamba.load)"
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def default_device() -> str:
    """Where a model runs unless told: the first CUDA GPU when one is visible, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _as_rgb(image: ImageInput, max_side: int | None = None) -> np.ndarray:
    """(H, W, 3) array on the 0-255 scale from a path, a :class:`~qmamba.inference.sources.Source` (a tar member,
    a URI), an open binary file (named in messages by its ``name``), a PIL image, an HWC / HW array or a CHW / HW
    tensor.

    Floating-point arrays and tensors are taken to be in [0, 1]; integer ones in [0, 255]. ``max_side`` downscales
    files whose longer side exceeds it (see :func:`qmamba.inference.images.read_rgb`)."""
    if isinstance(image, (str, os.PathLike)):  # a file, a tar member or a URI
        return read_image(image, max_side)
    if isinstance(image, io.IOBase):  # an open file (NamedBytes: bytes with a name)
        return read_rgb(image, max_side)
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


class _Prepared(NamedTuple):
    """One image ready for the model: its crops, or why it cannot be scored."""

    index: int
    crops: torch.Tensor | None
    error: str | None


@dataclass(frozen=True)
class Preparer:
    """Decode and crop one image (small and picklable: DataLoader workers and Ray tasks get this, not the model).
    Whatever goes wrong with one image is that image's error message, the same in every engine."""

    crops: EvalCrops
    max_side: int | None

    def __call__(self, index: int, image: ImageInput) -> _Prepared:
        crops, error = self.cut(image)
        return _Prepared(index, None if crops is None else self.crops.preprocessing.normalize(crops), error)

    def cut(self, image: ImageInput) -> tuple[np.ndarray | None, str | None]:
        """The image's uint8 crops (:meth:`EvalCrops.cut`), or why it cannot be scored."""
        try:
            return self.crops.cut(_as_rgb(image, self.max_side)), None
        except Exception as err:  # noqa: BLE001 - reported per image, the others are still scored
            return None, str(err)


class _Decoded(torch.utils.data.Dataset):
    """Images decoded and cropped in DataLoader workers, each item an :class:`_Prepared`."""

    def __init__(self, images: Sequence[ImageInput], prepare: Preparer) -> None:
        self.images, self.prepare = images, prepare

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> _Prepared:
        return self.prepare(index, self.images[index])


def _init_worker(worker: int) -> None:
    """Decoding is single-threaded, so the model in the main process gets the cores. Ctrl-C reaches the whole
    process group and is the main process's to handle (it finishes its batch), so a worker ignores it; SIGTERM is
    how the main process ends its workers, even one waiting on a URL that never answers, so a worker exits at once
    and quietly (an exit status of 0 is no worker failure to the main process)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def _as_list(items: list[_Prepared]) -> list[_Prepared]:
    return items


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
    max_side: int | None = None  # downscale files above this longer side (huge images; changes what is scored)
    precision: str = "fp32"  # fp32 or bf16 (qmamba.inference.precision)
    weights: Path | None = None  # the file its weights came from: a checkpoint, or a model folder's safetensors

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], device: str | torch.device | None = None, crops: int | None = None,
        dataset: str | None = None, batch_size: int = 8, trusted: bool = False, max_side: int | None = None,
        compile: bool = False,  # noqa: A002  (the option's name everywhere: --compile, compile: true)
        sha256: str | None = None, precision: Precision = "fp32", limits: NetworkLimits = NetworkLimits(),
    ) -> Scorer:
        """Build the model a qmamba checkpoint or model describes: a ``.ckpt`` file, a model folder (``qmamba
        publish``), ``hf://org/name[@revision]`` or a model folder's URL (:mod:`qmamba.inference.model_sources`);
        ``sha256`` pins the checkpoint's (or the folder's weights') digest; ``precision`` is ``fp32``, ``bf16`` or
        ``auto`` (:mod:`qmamba.inference.precision`). ``dataset`` picks whose scale scores are
        reported on (default: the first training dataset); ``crops`` overrides the evaluation crop count; ``max_side``
        downscales image files whose longer side exceeds it before cropping (default: native resolution);
        ``compile`` runs the model through ``torch.compile`` (:mod:`qmamba.models.compiling`; the first batches of each
        size pay for the compilation); ``limits`` bound a model's fetch from a URL (``--timeout``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_side is not None and max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        device = torch.device(device or default_device())
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {device}: no CUDA GPU is visible here; use the CPU (device cpu)")
        precision = resolve_precision(precision, device)  # before the model loads: a refusal costs nothing
        resolved = resolve_model(path, limits)
        trained = load_trained(resolved.path, trusted=trusted, sha256=sha256)
        spec = trained.spec
        dataset = dataset or spec.datasets[0]
        scale = spec.scale_of(dataset)
        evaluation = EvalCrops(spec.preprocessing, crops)
        info = {"checkpoint": str(path), "source": resolved.source, "backbone": trained.architecture["backbone"],
                "datasets": spec.datasets, "dataset": dataset, "crop_size": evaluation.size, "crops": evaluation.count,
                "score_range": scale.as_dict(), "max_side": max_side, "compiled": compile, "precision": precision}
        model = trained.model.to(device)
        if precision == "bf16":  # matrix products' weights cast once, not at every batch by autocast; bf16 scans
            prepare_bf16_inference(model, device)
        if compile:
            compile_model(model, device, COMPILE_OPTION, frozen=True)  # a scorer's weights never change
        weights = resolved.path / WEIGHTS_NAME if resolved.path.is_dir() else resolved.path
        return cls(model, evaluation, scale, dataset, info, device, batch_size, max_side, precision, weights)

    def _units(self, crops: torch.Tensor) -> torch.Tensor:
        """The model's unit-scale scores of normalised crops, on the CPU."""
        crops = crops.to(self.device)
        with precision_context(self.precision, self.device):
            units = run_compiled(self.model, crops, COMPILE_OPTION) if self.info.get("compiled") else self.model(crops)
        return units.float().cpu()

    @torch.inference_mode()
    def score_crops(self, crops: list[torch.Tensor]) -> list[float]:
        """Native-scale scores of images given as their crops (one (count, 3, size, size) tensor each)."""
        counts = [len(c) for c in crops]
        units = self._units(torch.cat(crops))
        means = torch.stack([chunk.mean() for chunk in units.split(counts)])
        return self.scale.to_native(means).tolist()

    def iter_batches(self, images: Iterable[ImageInput], workers: int = 0,
                     waiting: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                     ) -> Iterator[list[Result]]:
        """Results in input order, one list per model batch (or per image that cannot be scored): a caller can stop
        between lists without losing a computed score. Never stops early because of a bad image.

        ``workers`` > 0 decodes and crops in that many DataLoader processes while the model runs (images of any
        size batch together: every image gives the same number of same-size crops). A model on the CPU then runs on
        the cores the workers leave (torch's thread count, restored afterwards): sharing them slows both.
        ``waiting()`` is entered around each wait for decoded images (and only then: never around the model), so
        a caller can end a wait on a slow source at once (``qmamba score`` on a signal)."""
        threads = torch.get_num_threads()
        if workers and self.device.type == "cpu":
            torch.set_num_threads(max(1, threads - workers))
        try:
            yield from self._iter_batches(images, workers, waiting)
        finally:
            torch.set_num_threads(threads)

    def _iter_batches(self, images: Iterable[ImageInput], workers: int,
                      waiting: Callable[[], contextlib.AbstractContextManager[Any]]) -> Iterator[list[Result]]:
        prepare = Preparer(self.crops, self.max_side)
        if workers:
            sequence = images if isinstance(images, Sequence) else list(images)
            prepared: Iterable[list[_Prepared]] = torch.utils.data.DataLoader(
                _Decoded(sequence, prepare), batch_size=self.batch_size, num_workers=workers,
                collate_fn=_as_list, worker_init_fn=_init_worker, prefetch_factor=4,
                pin_memory=self.device.type == "cuda")
        else:
            prepared = _chunks((prepare(i, image) for i, image in enumerate(images)), self.batch_size)
        batches = iter(prepared)
        while True:
            with waiting():
                batch = next(batches, None)
            if batch is None:
                return
            for item in batch:
                if item.error is not None:
                    yield [Result(item.index, None, item.error)]
            ready = [(item.index, item.crops) for item in batch if item.error is None]
            if ready:
                yield self._scored(ready)

    def iter_scores(self, images: Iterable[ImageInput]) -> Iterator[Result]:
        """:meth:`iter_batches`, one result at a time."""
        for batch in self.iter_batches(images):
            yield from batch

    def _scored(self, pending: list[tuple[int, torch.Tensor]]) -> list[Result]:
        scores = self.score_crops([crops for _, crops in pending])
        return [Result(index, score, None) for (index, _), score in zip(pending, scores, strict=True)]

    @torch.inference_mode()
    def quality_map(self, image: ImageInput, stride: int | None = None) -> QualityMap:
        """Scores of crop-size windows slid over the image every ``stride`` pixels (default: half a crop), on the
        dataset's native scale: where in the image quality drops. :meth:`QualityMap.dense` spreads them over the
        pixels."""
        job = self.map_job(image, stride)
        while job.step():
            pass
        return job.result()

    def map_job(self, image: ImageInput, stride: int | None = None) -> MapJob:
        """:meth:`quality_map` one model batch at a time (:class:`MapJob`): its size is known before any model work,
        and a server can run other batches between its steps."""
        rgb = _as_rgb(image, self.max_side)
        self.crops.preprocessing.check_size(rgb)
        size = self.crops.size
        step = stride or max(1, size // 2)
        return MapJob(self, rgb, window_starts(rgb.shape[0], size, step), window_starts(rgb.shape[1], size, step))

    def score(self, images: ImageInput | Sequence[ImageInput]) -> float | list[float]:
        """Quality score(s) on the dataset's native scale; raises on an image that cannot be scored."""
        single = not isinstance(images, (list, tuple))
        results = list(self.iter_scores([images] if single else images))
        errors = [f"image {i}: {e}" for i, _, e in results if e is not None]
        if errors:
            raise ValueError("; ".join(errors))
        scores = [s for _, s, _ in results]
        return scores[0] if single else scores  # type: ignore[return-value]


class MapJob:
    """A quality map computed one model batch (``8 * batch_size`` windows) per :meth:`step`."""

    def __init__(self, scorer: Scorer, rgb: np.ndarray, tops: np.ndarray, lefts: np.ndarray) -> None:
        self.scorer, self.rgb, self.tops, self.lefts = scorer, rgb, tops, lefts
        self.starts = [(top, left) for top in tops for left in lefts]
        self.units: list[torch.Tensor] = []
        self.done = 0

    @property
    def windows(self) -> int:
        return len(self.starts)

    @torch.inference_mode()
    def step(self) -> bool:
        """Score the next batch of windows; False once every window is scored."""
        if self.done < self.windows:
            size, chunk = self.scorer.crops.size, 8 * self.scorer.batch_size
            starts = self.starts[self.done : self.done + chunk]
            crops = np.stack([self.rgb[t : t + size, c : c + size] for t, c in starts])
            self.units.append(self.scorer._units(self.scorer.crops.preprocessing.normalize(crops)))
            self.done += len(crops)
        return self.done < self.windows

    def result(self) -> QualityMap:
        scores = self.scorer.scale.to_native(torch.cat(self.units)).numpy().reshape(len(self.tops), len(self.lefts))
        return QualityMap(scores, self.tops, self.lefts, self.scorer.crops.size, *self.rgb.shape[:2])


def _chunks(items: Iterable[_Prepared], size: int) -> Iterator[list[_Prepared]]:
    """Lists of ``size`` scorable images; an image that cannot be scored is a list of its own, reported at once."""
    chunk: list[_Prepared] = []
    for item in items:
        if item.error is not None:
            yield [item]
            continue
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load(checkpoint: str | os.PathLike[str], **kwargs: Any) -> Scorer:
    """A :class:`Scorer` for a qmamba checkpoint or model (see :meth:`Scorer.from_checkpoint` for the options)."""
    return Scorer.from_checkpoint(checkpoint, **kwargs)


def results_table(keys: list[str], results: list[tuple[float | None, str | None, str | None]]) -> Any:
    """``(score, flag, error)`` per key as the Arrow table of every engine's Parquet rows: ``path``, ``score``,
    ``flag`` ("" in range) and ``error`` (null for a score, the reason otherwise). Parquet strings are UTF-8, so the
    bytes of a POSIX name that are not are written as ``\\xNN``. Needs pyarrow."""
    import pyarrow as pa

    paths = [os.fsencode(key).decode("utf-8", "backslashreplace") for key in keys]
    scores, flags, errors = zip(*results, strict=True) if results else ((), (), ())
    return pa.table({"path": pa.array(paths, pa.string()), "score": pa.array(scores, pa.float64()),
                     "flag": pa.array(flags, pa.string()), "error": pa.array(errors, pa.string())})
