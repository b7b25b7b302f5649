"""Image checks before the first epoch, and the resize cache for datasets that need a smaller resolution.

A corrupt or missing file would otherwise stop a run hours in, at the epoch that first reads it. Every listed image
is therefore opened (and by default fully decoded) once, in parallel, before training; all problems are reported
together with the dataset, the file and the fix. Datasets such as SPAQ (4000x3000 phone photos) are resized to a
shorter side once, into a cache folder, in the same pass: the originals are decoded anyway.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from PIL import Image

from qmamba.files.atomic import write_bytes_atomic
from qmamba.inference.images import ImageReadError, bomb_message
from qmamba.inference.sources import Source, read_image
from qmamba.redaction import without_password

from .errors import DatasetError

__all__ = ["ImageCheck", "check_images", "report_problems"]

CheckMode = Literal["full", "header", "off"]


@dataclass(frozen=True)
class ImageCheck:
    """Outcome for one listed image: the path training should read, its (width, height), or a problem."""

    path: str
    size: tuple[int, int] | None = None
    problem: str | None = None  # "missing" | "unreadable" | "too small"
    detail: str = ""


def _resized_copy(source: str, target: Path, short_side: int) -> tuple[int, int]:
    """Write ``source`` with its shorter side scaled to ``short_side`` (bicubic, after EXIF orientation) as a PNG
    (lossless: the cache must not add compression artefacts) and return its size; reuse an up-to-date copy (any copy
    of a remote image: it has no modification time to compare)."""
    if target.is_file() and (isinstance(source, Source) or target.stat().st_mtime >= os.stat(source).st_mtime):
        with Image.open(target) as image:
            return image.size
    image = Image.fromarray(read_image(source))
    scale = short_side / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(target, buffer.getvalue())
    return image.size


def _cache_name(name: str) -> PurePosixPath:
    """The resized copy's name inside the cache folder: the image's name relative to its root as it is, and a name
    that could leave the folder (absolute, ``..``, a URI) as a digest of it plus its file name."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "://" in name:
        path = PurePosixPath(f"{hashlib.sha256(name.encode()).hexdigest()[:16]}_{path.name}")
    return path.with_suffix(".png")


def _check_one(path: str, mode: CheckMode, short_side: int | None, cached: Path | None) -> ImageCheck:
    remote = isinstance(path, Source)  # a URI or a tar-shard member: read whole to be checked at all
    if not remote and not os.path.isfile(path):
        return ImageCheck(path, problem="missing")
    try:
        if short_side is not None and cached is not None:
            return ImageCheck(str(cached), _resized_copy(path, cached, short_side))
        if mode == "full" or remote:
            height, width = read_image(path).shape[:2]
            return ImageCheck(path, (width, height))
        with Image.open(path) as image:  # header only; EXIF rotation does not change the shorter side
            return ImageCheck(path, image.size)
    except Image.DecompressionBombError as err:  # reported with the other problems, not a stop
        return ImageCheck(path, problem="unreadable", detail=bomb_message(path, err))
    except (ImageReadError, OSError, ValueError) as err:
        return ImageCheck(path, problem="unreadable", detail=str(err))


def check_images(
    paths: Sequence[str],
    names: Sequence[str],
    *,
    mode: CheckMode = "full",
    min_size: int = 0,
    short_side: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> list[ImageCheck]:
    """Check (and optionally resize into ``cache_dir``) every image; never raises for a bad image.

    Args:
        paths: image files as listed by the labels.
        names: their names relative to the dataset root (the cache mirrors them).
        mode: ``full`` decodes every image (catches truncated files), ``header`` reads sizes only, ``off`` only
            tests that the files exist.
        min_size: images whose shorter side is below this (the crop size) are flagged ``too small``.
        short_side: resize to this shorter side into ``cache_dir`` (never upscales); the checks then returns
            the cached paths.
    """
    if short_side is not None and cache_dir is None:
        raise ValueError("short_side needs a cache_dir for the resized copies")
    cached = [Path(cache_dir) / _cache_name(n) if short_side else None for n in names]
    if mode == "off" and short_side is None:
        return [ImageCheck(p) if isinstance(p, Source) or os.path.isfile(p) else ImageCheck(p, problem="missing")
                for p in paths]
    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        results = list(pool.map(lambda a: _check_one(a[0], mode, short_side, a[1]), zip(paths, cached, strict=True)))
    if min_size:
        results = [
            ImageCheck(r.path, r.size, "too small", f"{r.size[0]}x{r.size[1]} < {min_size}x{min_size} crop")
            if r.problem is None and r.size is not None and min(r.size) < min_size else r
            for r in results
        ]
    return results


_FIXES = {
    "missing": "check the dataset root and that the archive was fully extracted",
    "unreadable": "re-extract or re-download these files (or remove their label rows)",
    "too small": "lower crop_size, or set small_images: drop to leave them out (qmamba never pads or upscales)",
}


class ProblemReport:
    """Every problem found in one dataset, grouped by kind (five examples each, with the fix), raised together as one
    :class:`DatasetError`: a user fixes a label table once, not once per rerun."""

    def __init__(self, dataset: str, total: int) -> None:
        self.dataset, self.total = dataset, total
        self._kinds: dict[str, tuple[str, list[str]]] = {}
        self._rows: set[object] = set()  # the images (rows) with a problem
        self._whole = 0  # problems of no one row: an empty split, a group on both sides of it

    def add(self, kind: str, example: str, fix: str, row: object = None) -> None:
        self._kinds.setdefault(kind, (fix, []))[1].append(without_password(example))
        if row is None:
            self._whole += 1
        else:
            self._rows.add(row)

    def add_images(self, checks: Sequence[ImageCheck], allow: Sequence[str] = (),
                   rows: Sequence[int] | None = None) -> None:
        """The problems of :func:`check_images` not in ``allow``; ``rows`` numbers the images as a label table does
        (shown with each)."""
        for index, check in enumerate(checks):
            if check.problem and check.problem not in allow:
                where = f"row {rows[index]}: " if rows is not None else ""
                self.add(check.problem, where + check.path + (f" ({check.detail})" if check.detail else ""),
                         _FIXES[check.problem], row=rows[index] if rows is not None else index)

    def __bool__(self) -> bool:
        return bool(self._kinds)

    def __str__(self) -> str:
        headline = [f"{len(self._rows)} of {self.total} images cannot be used"] if self._rows else []
        if self._whole:
            headline.append(f"{self._whole} problem{'s' * (self._whole > 1)} with the dataset as a whole")
        lines = [f"{self.dataset}: {'; '.join(headline)}:"]
        for kind, (fix, examples) in self._kinds.items():
            more = f" and {len(examples) - 5} more" if len(examples) > 5 else ""
            lines.append(f"  {len(examples)} {kind}: {'; '.join(examples[:5])}{more}" + (f" -> {fix}" if fix else ""))
        return "\n".join(lines)

    def raise_if_any(self) -> None:
        if self:
            raise DatasetError(str(self))


def report_problems(dataset: str, checks: Sequence[ImageCheck], allow: Sequence[str] = ()) -> None:
    """Raise one :class:`DatasetError` naming every kind of problem (up to 5 files each) not in ``allow``."""
    report = ProblemReport(dataset, len(checks))
    report.add_images(checks, allow)
    report.raise_if_any()
