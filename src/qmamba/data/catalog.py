"""IQA datasets as their authors distribute them: label parsers, score scales and split protocols.

``load_dataset(name, root)`` returns the label table as a DataFrame with at least ``path`` (absolute image path),
``score`` (native scale) and ``content`` (reference / content id; None for authentic datasets), after the
dataset's documented filtering. :data:`DATASETS` holds each dataset's score range and direction, so training can
normalise scores and reporting can map them back. Formats and quirks: ``data/README.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

__all__ = ["DATASETS", "DatasetInfo", "DatasetError", "load_dataset", "dataset_info"]

SplitProtocol = Literal["content", "random"]


class DatasetError(RuntimeError):
    """A dataset folder, label file or image is missing or malformed; the message says how to fix it."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a loader knows about its dataset.

    Attributes:
        name: registry name.
        score_range: (low, high) of the native score scale used for normalisation.
        lower_better: True for DMOS-style scores.
        protocol: ``content`` (split by reference image, synthetic datasets) or ``random`` (by image).
        default_root: where ``data/README.md`` tells users to unpack it.
        official_split: the loader fills a ``split`` column (train / val / test) from the official split.
    """

    name: str
    score_range: tuple[float, float]
    lower_better: bool
    protocol: SplitProtocol
    default_root: str
    official_split: bool = False


DATASETS: dict[str, DatasetInfo] = {}
_LOADERS: dict[str, Callable[..., pd.DataFrame]] = {}


def _register(info: DatasetInfo) -> Callable[[Callable[..., pd.DataFrame]], Callable[..., pd.DataFrame]]:
    def wrap(loader: Callable[..., pd.DataFrame]) -> Callable[..., pd.DataFrame]:
        DATASETS[info.name] = info
        _LOADERS[info.name] = loader
        return loader

    return wrap


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered dataset."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def load_dataset(name: str, root: str | os.PathLike[str] | None = None, **options: object) -> pd.DataFrame:
    """Label table of dataset ``name`` unpacked at ``root`` (default: its ``data/`` folder)."""
    info = dataset_info(name)
    root = Path(root if root is not None else info.default_root)
    if not root.is_dir():
        raise DatasetError(
            f"{name}: dataset folder {root} does not exist. Unpack the official release there "
            f"(expected layout in data/README.md) or set the dataset's root."
        )
    table = _LOADERS[name](root.resolve(), **options)
    return _check_table(name, table)


def _require(path: Path, name: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{name}: expected {path}; see data/README.md for the official layout")
    return path


def _read_csv(path: Path, name: str, columns: list[str]) -> pd.DataFrame:
    table = pd.read_csv(_require(path, name))
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DatasetError(f"{name}: {path} lacks columns {missing}; found {list(table.columns)}")
    return table


def _check_table(name: str, table: pd.DataFrame) -> pd.DataFrame:
    """Reject malformed label rows: non-numeric or NaN scores, duplicate image paths."""
    scores = pd.to_numeric(table["score"], errors="coerce")
    bad = table.index[scores.isna()].tolist()
    if bad:
        rows = ", ".join(f"{table.loc[i, 'path']} ({table.loc[i, 'score']!r})" for i in bad[:5])
        raise DatasetError(f"{name}: {len(bad)} label rows have no valid score, e.g. {rows}; fix or remove them")
    dupes = table["path"][table["path"].duplicated()].tolist()
    if dupes:
        raise DatasetError(f"{name}: duplicate image entries in the label file, e.g. {dupes[:5]}")
    table = table.assign(score=scores.astype("float64")).reset_index(drop=True)
    if "content" not in table:
        table["content"] = None
    return table


# ----------------------------------------------------------------------------------------------------- loaders
@_register(DatasetInfo("koniq10k", (0.0, 100.0), False, "random", "data/koniq10k", official_split=True))
def _koniq10k(root: Path, resolution: str = "1024x768", score: str = "MOS_zscore") -> pd.DataFrame:
    """KonIQ-10k: ``koniq10k_scores_and_distributions.csv`` (MOS_zscore 0-100 by default, or MOS 1-5) with the
    images in ``1024x768/`` (or ``512x384/``); the official split from ``koniq10k_distributions_sets.csv``."""
    labels = _read_csv(root / "koniq10k_scores_and_distributions.csv", "koniq10k", ["image_name", score])
    table = pd.DataFrame({"path": [str(root / resolution / n) for n in labels["image_name"]], "score": labels[score]})
    table["name"] = labels["image_name"]
    split_file = root / "koniq10k_distributions_sets.csv"
    if split_file.is_file():
        sets = _read_csv(split_file, "koniq10k", ["image_name", "set"]).set_index("image_name")["set"]
        table["split"] = table["name"].map(sets).map({"training": "train", "validation": "val", "test": "test"})
    return table


@_register(DatasetInfo("kadid10k", (1.0, 5.0), False, "content", "data/kadid10k"))
def _kadid10k(root: Path) -> pd.DataFrame:
    """KADID-10k: ``dmos.csv`` (its ``dmos`` column is a MOS on 1-5, higher is better) and ``images/``."""
    labels = _read_csv(root / "dmos.csv", "kadid10k", ["dist_img", "ref_img", "dmos"])
    return pd.DataFrame({
        "path": [str(root / "images" / n) for n in labels["dist_img"]],
        "score": labels["dmos"],
        "content": [Path(r).stem for r in labels["ref_img"]],
        "name": labels["dist_img"],
    })


_CSIQ_FOLDERS = {"AWGN": "awgn", "JPEG": "jpeg", "jpeg2000": "jpeg2000", "fnoise": "fnoise", "BLUR": "blur",
                 "contrast": "contrast"}


@_register(DatasetInfo("csiq", (0.0, 1.0), True, "content", "data/csiq"))
def _csiq(root: Path) -> pd.DataFrame:
    """CSIQ from the widely used ``csiq_label.txt`` (``<ref>.<TOKEN>.<level>.png <dmos>``, DMOS 0-1, lower is
    better) with images in ``dst_imgs/<type>/`` (the token picks the folder)."""
    path = _require(root / "csiq_label.txt", "csiq")
    labels = pd.read_csv(path, sep=r"\s+", header=None, names=["name", "dmos"], engine="python")
    tokens = labels["name"].str.split(".").str[1]
    unknown = sorted(set(tokens) - set(_CSIQ_FOLDERS))
    if unknown:
        raise DatasetError(f"csiq: {path} names distortion tokens {unknown}; expected {sorted(_CSIQ_FOLDERS)}")
    return pd.DataFrame({
        "path": [str(root / "dst_imgs" / _CSIQ_FOLDERS[t] / n) for t, n in zip(tokens, labels["name"], strict=True)],
        "score": labels["dmos"],
        "content": labels["name"].str.split(".").str[0],
        "name": labels["name"],
    })


@_register(DatasetInfo("tid2013", (0.0, 9.0), False, "content", "data/tid2013"))
def _tid2013(root: Path) -> pd.DataFrame:
    """TID2013: ``mos_with_names.txt`` (``<mos> <name>`` per line, MOS 0-9) and ``distorted_images/``. The release
    mixes the case of file names (``i01_01_2.bmp``, ``I01_11_1.BMP``), so names are matched case-insensitively."""
    path = _require(root / "mos_with_names.txt", "tid2013")
    labels = pd.read_csv(path, sep=r"\s+", header=None, names=["mos", "name"], engine="python")
    folder = root / "distorted_images"
    on_disk = {p.name.lower(): p.name for p in folder.iterdir()} if folder.is_dir() else {}
    return pd.DataFrame({
        "path": [str(folder / on_disk.get(n.lower(), n)) for n in labels["name"]],
        "score": labels["mos"],
        "content": "I" + labels["name"].str[1:3],
        "name": labels["name"],
    })
