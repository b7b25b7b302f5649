"""Scoring on Ray Data: images read and decoded in CPU tasks, the model in a pool of actors, one row per image.

    import ray
    import qmamba.ray

    images = ray.data.read_parquet("s3://bucket/images.parquet")          # a column of paths or URIs
    scores = qmamba.ray.score_dataset(images, "best.ckpt", column="url")  # a Dataset: path, score, flag, error
    scores.write_parquet("s3://bucket/scores/")

Each input row gives one output row: its key (the ``column`` value), the score on the training dataset's scale and
its out-of-range flag, or ``error``, the reason an image could not be scored (the local engine's messages, word for
word: :class:`~qmamba.inference.scoring.Preparer`). The image is the file or URI its key names, or the encoded bytes
(``ray.data.read_binary_files``) or decoded (H, W, 3) array (``ray.data.read_images``) in ``image_column``.

The checkpoint is read once by the driver (a bad one is one line before any work starts) and travels to the actors
through Ray's object store, so workers need no shared file system. Crops travel from the decoding tasks to the
actors as uint8 (a quarter of float32's bytes) and are normalised by the actor exactly as the local engine does, so
the scores equal the local engine's. Ray restarts a killed actor and retries its batch; the batch's rows reach the
consumer once.

``qmamba score --engine ray`` (:mod:`qmamba.commands.score_ray`) adds tar shards streamed once per task, resume and
Parquet parts; this module needs only ray, torch, numpy and pyarrow.

Credentials: the reading and decoding tasks use what their nodes hold, plus a :class:`TaskEnvironment` given to
:meth:`RayScorer.score_inputs` (the driver's object-store variables). It travels in the tasks' arguments, never in a
runtime environment: Ray's runtime-environment agent writes a job's ``env_vars`` in clear text into its log, a
world-readable file under ``/tmp/ray`` that outlives the run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qmamba.errors import UsageError
from qmamba.heap import keep_freed_memory
from qmamba.inference.images import NamedBytes
from qmamba.inference.model_sources import resolve_model
from qmamba.inference.precision import Precision
from qmamba.inference.scale import ScoreScale
from qmamba.inference.scoring import Preparer, Scorer, load, results_table
from qmamba.inference.sources import NetworkLimits, RemoteFile, Shard, is_uri, shard_images, shard_of
from qmamba.redaction import without_password

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

__all__ = ["RayScorer", "TaskEnvironment", "import_ray", "score_dataset"]

FILES_PER_TASK = 256  # loose files read by one task; a shard is always a task of its own
DECODE_BATCH = 64  # images per decoding task at least: fewer, larger tasks cost less scheduling
DECODE_MEMORY = 2**30  # a decoding task: its process (0.6 GB with torch) and an image (see RayScorer._pipeline)


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or one line naming the install command."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra's other half (pyarrow, pandas)
    except ImportError:
        raise UsageError('the Ray engine needs Ray Data: pip install "qmamba[ray]"') from None
    return ray


class TaskEnvironment:
    """Environment variables (credentials among them) set in the processes of the tasks that read images, before
    they read; its text names the variables, never their values, so a task's description in a log or an error
    gives nothing away."""

    def __init__(self, variables: dict[str, str]) -> None:
        self._variables = dict(variables)

    def apply(self) -> None:
        os.environ.update(self._variables)

    def __repr__(self) -> str:
        return f"TaskEnvironment({', '.join(sorted(self._variables))})"

    def __bool__(self) -> bool:
        return bool(self._variables)


def score_dataset(ds: ray.data.Dataset, checkpoint: str | os.PathLike[str], *, column: str = "path",
                  image_column: str | None = None, **options: Any) -> ray.data.Dataset:
    """``ds`` scored: a Dataset of ``path`` (the ``column`` value), ``score``, ``flag`` and ``error``, one row per
    input row. ``options`` are :class:`RayScorer`'s."""
    return RayScorer(checkpoint, **options).score(ds, column, image_column)


class RayScorer:
    """A checkpoint ready for Ray: read and checked on the driver, scored in a pool of ``concurrency`` actors of
    ``gpus_per_worker`` GPUs (0: on the CPU) and ``cpus_per_worker`` cores each, ``batch_size`` images per forward.
    ``crops``, ``dataset``, ``max_side``, ``trusted``, ``compile`` and ``limits`` are :func:`qmamba.load`'s; ``clip``
    clips out-of-range scores to the scale instead of flagging them."""

    def __init__(self, checkpoint: str | os.PathLike[str], *, crops: int | None = None, dataset: str | None = None,
                 batch_size: int = 8, max_side: int | None = None, clip: bool = False, trusted: bool = False,
                 compile: bool = False, concurrency: int = 1, gpus_per_worker: float = 0.0,  # noqa: A002
                 cpus_per_worker: float = 1.0, sha256: str | None = None, precision: Precision = "fp32",
                 limits: NetworkLimits = NetworkLimits()) -> None:
        if concurrency < 1:
            raise UsageError(f"concurrency must be >= 1 scoring actor, got {concurrency}")
        if gpus_per_worker < 0 or cpus_per_worker <= 0:
            raise UsageError(f"gpus_per_worker must be >= 0 and cpus_per_worker > 0, got {gpus_per_worker} and "
                             f"{cpus_per_worker}")
        self.options = {"crops": crops, "dataset": dataset, "batch_size": batch_size, "max_side": max_side,
                        "trusted": trusted, "compile": compile, "sha256": sha256, "precision": precision}
        local = resolve_model(checkpoint, limits).path  # fetched once, here; the actors get its files' bytes
        # CPU actors: bf16 is checked here, on a CPU like theirs; GPU actors check their own device when they start
        described_precision = precision if gpus_per_worker == 0 else "fp32"
        self.described: Scorer = load(local, device="cpu", **{**self.options, "compile": False,
                                                               "precision": described_precision})
        self.described.info.update(checkpoint=str(checkpoint), precision=precision)
        if clip:
            self.described.scale.check_clip(self.described.dataset)
        self.files = {p.name: p.read_bytes() for p in (sorted(local.glob("*")) if local.is_dir() else [local])}
        self.clip, self.concurrency = clip, concurrency
        self.gpus, self.cpus = gpus_per_worker, cpus_per_worker

    @property
    def info(self) -> dict[str, Any]:
        return self.described.info

    @property
    def scale(self) -> ScoreScale:
        return self.described.scale

    @property
    def dataset(self) -> str:
        return self.described.dataset

    @property
    def weights(self) -> Path | None:
        return self.described.weights

    def score(self, ds: ray.data.Dataset, column: str = "path", image_column: str | None = None) -> ray.data.Dataset:
        """Every row of ``ds`` scored (see the module's description)."""
        schema = ds.schema(fetch_if_missing=False)  # known without running anything, or not checked here
        for name in (column, image_column):
            if schema is not None and name is not None and name not in schema.names:
                raise UsageError(f"the dataset has no column {name} (its columns: {', '.join(schema.names)})")
        return self._pipeline(ds, _Decode(self._preparer(), column, image_column, failure_column=None))

    def score_inputs(self, inputs: list[str], scored: set[str], environment: TaskEnvironment | None = None,
                     limits: NetworkLimits = NetworkLimits()) -> ray.data.Dataset:
        """The row keys and :class:`~qmamba.inference.sources.Shard` objects of ``expand(..., list_shards=False)``:
        one reading task per shard (streamed once, members in ``scored`` skipped) and per ``FILES_PER_TASK`` files;
        ``environment`` is set in the reading and decoding tasks' processes, which read within ``limits``."""
        ray = import_ray()
        shards = [name for name in inputs if isinstance(name, Shard)]
        files = [str(name) for name in inputs if not isinstance(name, Shard)]
        skip = _by_shard(scored, shards)
        work = [{"shard": True, "names": [s], "skip": sorted(skip[s])} for s in shards]
        work += [{"shard": False, "names": files[i : i + FILES_PER_TASK], "skip": []}
                 for i in range(0, len(files), FILES_PER_TASK)]
        if not work:
            raise ValueError("nothing to score: every input is in `scored`")
        reading = ray.data.from_items(work, override_num_blocks=len(work)).flat_map(
            _read_work, fn_kwargs={"environment": environment, "limits": limits})
        return self._pipeline(reading, _Decode(self._preparer(), "path", "image", failure_column="failure",
                                               environment=environment, limits=limits))

    def _preparer(self) -> Preparer:
        return Preparer(self.described.crops, self.described.max_side)

    def _pipeline(self, ds: ray.data.Dataset, decode: _Decode) -> ray.data.Dataset:
        ray = import_ray()
        batch = self.options["batch_size"]
        # a decoding task's memory, stated so that Ray runs no more decoders than a node holds (a 24-megapixel
        # JPEG is 72 MB as pixels); it also keeps the decoding apart: Ray Data fuses a task map into the operator
        # after it when their resources are equal, which would decode inside the scoring actor, on its core, in turn
        # with the model
        decoded = ds.map_batches(decode, batch_size=max(batch, DECODE_BATCH), batch_format="numpy", num_cpus=1,
                                 memory=DECODE_MEMORY)
        return decoded.map_batches(
            _Model, batch_size=batch, batch_format="numpy", num_gpus=self.gpus, num_cpus=self.cpus,
            compute=ray.data.ActorPoolStrategy(size=self.concurrency),
            fn_constructor_kwargs={"files": self.files, "options": self.options, "clip": self.clip,
                                   "device": "cuda" if self.gpus else "cpu", "threads": max(1, int(self.cpus))})


def _by_shard(keys: set[str], shards: list[str]) -> dict[str, list[str]]:
    """The member keys (``<shard>#<member>``, the shard's credentials masked) among ``keys`` grouped by shard, in one
    pass over them."""
    grouped: dict[str, list[str]] = {s: [] for s in shards}
    keyed = {without_password(s): s for s in shards}
    for key in keys:
        shard = shard_of(key, keyed)
        if shard is not None:
            grouped[keyed[shard]].append(key)
    return grouped


def _read_work(item: dict[str, Any], environment: TaskEnvironment | None, limits: NetworkLimits
               ) -> Iterator[dict[str, Any]]:
    """The rows of a reading task: a shard's image members with their bytes (a broken shard ends with a failure
    row keyed by the shard), or loose files and URIs, read by the decoding task."""
    if environment:
        environment.apply()
    if item["shard"]:  # failure "" for none: an all-null column reaches numpy batches as NaN
        shard = item["names"][0]
        for key, data, failure in shard_images(shard, frozenset(item["skip"]), limits):
            yield {"path": key, "image": data, "failure": failure or ""}
    else:
        for name in item["names"]:
            yield {"path": name, "image": None, "failure": ""}


@dataclass(frozen=True)
class _Decode:
    """Rows to uint8 crops, or to the reason their image cannot be scored (a Ray task's batch function)."""

    prepare: Preparer
    column: str
    image_column: str | None
    failure_column: str | None  # rows that failed before decoding (a broken shard), with the reason
    environment: TaskEnvironment | None = field(default=None, repr=False)
    limits: NetworkLimits = NetworkLimits()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.environment:
            self.environment.apply()
        keys = [str(k) for k in batch[self.column]]
        images = batch[self.image_column] if self.image_column else [None] * len(keys)
        failures = batch[self.failure_column] if self.failure_column else [""] * len(keys)
        shape = (self.prepare.crops.count, self.prepare.crops.size, self.prepare.crops.size, 3)
        crops = np.zeros((len(keys), *shape), np.uint8)
        errors = []  # "" for none: an all-None object column would not survive the trip to the actor as None
        for i, (key, image, failure) in enumerate(zip(keys, images, failures, strict=True)):
            if failure:
                errors.append(str(failure))
                continue
            cut, error = self.prepare.cut(_image_of(key, image, self.limits))
            if cut is not None:
                crops[i] = cut
            errors.append(error or "")
        return {"path": np.array(keys, dtype=object), "crops": crops, "error": np.array(errors, dtype=object)}


def _image_of(key: str, image: Any, limits: NetworkLimits) -> Any:
    """What :class:`Preparer` reads for a row: its encoded bytes named by its key (as a tar member is in the local
    engine), a decoded array, or the file or URI the key names when the image is null (NaN in a numpy batch)."""
    if image is None or (isinstance(image, (float, np.floating)) and np.isnan(image)):  # an all-null column: float32
        return RemoteFile(key, limits) if is_uri(key) else key
    if isinstance(image, (bytes, bytearray)):
        return NamedBytes(bytes(image), key)
    return np.asarray(image)


class _Model:
    """A scoring actor: the model on its device, batches of crops to scores."""

    def __init__(self, files: dict[str, bytes], options: dict[str, Any], clip: bool, device: str, threads: int
                 ) -> None:
        import torch

        if device == "cpu":  # the actor's process is its own: threads and C heap set for scoring
            torch.set_num_threads(threads)
            keep_freed_memory()
        with tempfile.TemporaryDirectory() as folder:  # the driver's bytes: a checkpoint file or a model folder's files
            for name, data in files.items():
                (Path(folder) / name).write_bytes(data)
            self.scorer = load(folder if len(files) > 1 else Path(folder) / next(iter(files)), device=device, **options)
        self.clip = clip

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        normalize = self.scorer.crops.preprocessing.normalize
        keys, errors = list(batch["path"]), [str(error) or None for error in batch["error"]]
        good = [i for i, error in enumerate(errors) if error is None]
        results: list[tuple[float | None, str | None, str | None]] = [(None, None, e) for e in errors]
        if good:
            native = self.scorer.score_crops([normalize(batch["crops"][i]) for i in good])
            for i, score in zip(good, native, strict=True):
                results[i] = (*self.scorer.scale.report(score, self.clip), None)
        return results_table(keys, results)
