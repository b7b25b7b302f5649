"""IQA datasets as their authors distribute them: label parsers, score scales and split protocols.

``load_dataset(name, root)`` returns the label table as a DataFrame with at least ``path`` (absolute image path),
``score`` (native scale) and ``content`` (reference / content id; None for authentic datasets), after the
dataset's documented filtering. :data:`DATASETS` holds each dataset's score range and direction, so training can
normalise scores and reporting can map them back. Formats and quirks: ``data/README.md``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from io import StringIO
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from qmamba.inference.scale import ScoreScale

from .errors import DatasetError

__all__ = ["DATASETS", "DatasetInfo", "DatasetError", "load_dataset", "dataset_info"]

log = logging.getLogger(__name__)
SplitProtocol = Literal["content", "random"]


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
        short_side: images are resized (once, into a cache) to this shorter side before training; None keeps
            the native resolution. SPAQ's 4000x3000 phone photos need it (at full size, memory runs out and
            a 224 crop sees almost no content; data/README.md).
    """

    name: str
    score_range: tuple[float, float]
    lower_better: bool
    protocol: SplitProtocol
    default_root: str
    official_split: bool = False
    short_side: int | None = None

    @property
    def scale(self) -> ScoreScale:
        """The native scale as a :class:`ScoreScale` (unit scores for training, native ones for reports)."""
        return ScoreScale(*self.score_range, self.lower_better)


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


def load_dataset(name: str, root: str | os.PathLike[str] | None = None,
                 score_range: tuple[float, float] | None = None, **options: object) -> pd.DataFrame:
    """Label table of dataset ``name`` unpacked at ``root`` (default: its ``data/`` folder).

    Every score must lie on the dataset's scale (its known range, or the one a loader option selects, e.g. KonIQ's
    ``score: MOS`` is 1-5); ``score_range`` declares another scale for relabelled data. The table's
    ``attrs["score_range"]`` is the scale in force, which training normalises with."""
    info = dataset_info(name)
    root = Path(root if root is not None else info.default_root)
    if not root.is_dir():
        raise DatasetError(
            f"{name}: dataset folder {root} does not exist. Unpack the official release there "
            f"(expected layout in data/README.md) or set the dataset's root."
        )
    table = _check_table(name, _LOADERS[name](root.resolve(), **options))
    low, high = score_range or table.attrs.get("score_range") or info.score_range
    _check_scale(name, table, low, high)
    table.attrs["score_range"] = (float(low), float(high))
    return table


def _check_scale(name: str, table: pd.DataFrame, low: float, high: float) -> None:
    """Scores far off the scale (beyond a fifth of its span) are an error; slightly off ones (LIVE's realigned DMOS
    reaches a little past 0-100 by design) are kept and logged."""

    def outside(lo: float, hi: float) -> tuple[int, str]:
        rows = table.index[(table["score"] < lo) | (table["score"] > hi)]
        return len(rows), ", ".join(f"{table.loc[i, 'path']} ({table.loc[i, 'score']:g})" for i in rows[:3])

    margin = 0.2 * (high - low)
    count, examples = outside(low - margin, high + margin)
    if count:
        raise DatasetError(
            f"{name}: {count} of {len(table)} scores lie far outside its {low:g}-{high:g} scale, e.g. {examples}; "
            "fix the label file, or if your labels use another scale set score_range: [low, high] for the dataset")
    count, examples = outside(low, high)
    if count:
        log.warning("%s: %d scores lie slightly outside its %g-%g scale (e.g. %s); kept as they are", name, count,
                    low, high, examples)


def _require(path: Path, name: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{name}: expected {path}; see data/README.md for the official layout")
    return path


def _with_columns(table: pd.DataFrame, path: Path, name: str, columns: list[str]) -> pd.DataFrame:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DatasetError(f"{name}: {path} lacks columns {missing}; found {list(table.columns)}")
    return table


def _read_csv(path: Path, name: str, columns: list[str]) -> pd.DataFrame:
    """A label CSV as text in UTF-8 (or UTF-16 / UTF-8 with a byte-order mark); an empty, header-only or otherwise
    undecodable file is a :class:`DatasetError` that says so."""
    raw = _require(path, name).read_bytes()
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{name}: {path} is not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}, "
                           "e.g. Latin-1); save it as UTF-8, as the official release is") from None
    if not text.strip():
        raise DatasetError(f"{name}: {path} is empty; replace it with the label file of the official release")
    try:
        table = pd.read_csv(StringIO(text))
    except pd.errors.ParserError as err:
        raise DatasetError(f"{name}: {path} is not a well-formed CSV ({err}); compare it with the official "
                           "release") from None
    if table.empty:
        raise DatasetError(f"{name}: {path} has a header but no label rows; replace it with the official file")
    return _with_columns(table, path, name, columns)


def _read_excel(path: Path, name: str, columns: list[str], **kwargs: object) -> pd.DataFrame:
    table = pd.read_excel(_require(path, name), **kwargs)
    table.columns = [str(c).strip() for c in table.columns]
    return _with_columns(table, path, name, columns)


def _read_mat(path: Path, name: str, key: str) -> np.ndarray:
    """One variable of a MATLAB file, flattened (cell arrays of strings become a str array)."""
    from scipy.io import loadmat

    try:
        value = loadmat(str(_require(path, name)))[key]
    except KeyError:
        raise DatasetError(f"{name}: {path} has no variable {key!r}; is it the file of the official release?") from None
    except (ValueError, OSError) as err:
        raise DatasetError(f"{name}: cannot read MATLAB file {path}: {err}") from err
    flat = value.reshape(-1)
    if flat.dtype == object:  # cell array: each element is a 1-element char array
        return np.array([str(np.asarray(v).reshape(-1)[0]) for v in flat])
    return flat


def official_split(dataset: str) -> pd.Series:
    """The split (train / val / test) by image name shipped with qmamba, derived from the official tables:
    KonIQ-10k's ``koniq10k_distributions_sets.csv`` and FLIVE's val/test lists (the rest of FLIVE is train)."""
    text = resources.files("qmamba.data").joinpath("official_splits", f"{dataset}.csv").read_text()
    return pd.read_csv(StringIO(text)).set_index("name")["split"]


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
KONIQ_SETS = {"training": "train", "validation": "val", "test": "test"}  # koniq10k_distributions_sets.csv's names


@_register(DatasetInfo("koniq10k", (0.0, 100.0), False, "random", "data/koniq10k", official_split=True))
def _koniq10k(root: Path, resolution: str = "1024x768", score: str = "MOS_zscore") -> pd.DataFrame:
    """KonIQ-10k: ``koniq10k_scores_and_distributions.csv`` (MOS_zscore 0-100 by default, or MOS 1-5) with the
    images in ``1024x768/`` (or ``512x384/``). The official 7058/1000/2015 split comes from
    ``koniq10k_distributions_sets.csv`` when it lies next to the scores, else from the copy shipped with qmamba."""
    labels = _read_csv(root / "koniq10k_scores_and_distributions.csv", "koniq10k", ["image_name", score])
    table = pd.DataFrame({"path": [str(root / resolution / n) for n in labels["image_name"]], "score": labels[score]})
    table["name"] = labels["image_name"]
    split_file = root / "koniq10k_distributions_sets.csv"
    if split_file.is_file():
        sets = _read_csv(split_file, "koniq10k", ["image_name", "set"]).set_index("image_name")["set"]
        split = sets.map(lambda name: KONIQ_SETS.get(name, f"unknown set {name!r}"))  # named by the split check
    else:
        split = official_split("koniq10k")
    table["split"] = table["name"].map(split)
    if score == "MOS":
        table.attrs["score_range"] = (1.0, 5.0)  # the raw 5-point MOS instead of the 0-100 z-score rescaling
    return table


_LIVEC_TRAINING = re.compile(r"^t[1-7]\.bmp$", re.IGNORECASE)


@_register(DatasetInfo("livec", (0.0, 100.0), False, "random", "data/livec"))
def _livec(root: Path) -> pd.DataFrame:
    """LIVE Challenge (``ChallengeDB_release``): names and MOS from ``Data/AllImages_release.mat`` and
    ``Data/AllMOS_release.mat``, images in ``Images/``. The 7 training images t1-t7 (``Images/trainingImages/``)
    are dropped by name, as every paper does -> 1,162 images."""
    names = _read_mat(root / "Data" / "AllImages_release.mat", "livec", "AllImages_release")
    mos = _read_mat(root / "Data" / "AllMOS_release.mat", "livec", "AllMOS_release").astype(np.float64)
    if len(names) != len(mos):
        raise DatasetError(f"livec: {len(names)} image names but {len(mos)} MOS values in {root / 'Data'}")
    keep = np.array([not _LIVEC_TRAINING.match(n) for n in names])
    return pd.DataFrame({
        "path": [str(root / "Images" / n) for n in names[keep]],
        "score": mos[keep],
        "name": names[keep],
    })


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


@_register(DatasetInfo("spaq", (0.0, 100.0), False, "random", "data/spaq", short_side=512))
def _spaq(root: Path) -> pd.DataFrame:
    """SPAQ: ``Annotations/MOS and Image attribute scores.xlsx`` (``Image name``, ``MOS`` 0-100) and the
    full-resolution phone photos in ``TestImage/``. Training reads copies resized to a 512 shorter side (the
    official SPAQ preprocessing), made once after EXIF orientation is applied; see ``short_side``."""
    labels = _read_excel(root / "Annotations" / "MOS and Image attribute scores.xlsx", "spaq", ["Image name", "MOS"])
    names = labels["Image name"].astype(str).str.strip()
    return pd.DataFrame({"path": [str(root / "TestImage" / n) for n in names], "score": labels["MOS"], "name": names})


@_register(DatasetInfo("flive", (0.0, 100.0), False, "random", "data/flive", official_split=True))
def _flive(root: Path) -> pd.DataFrame:
    """FLIVE / PaQ-2-PiQ: ``labels_image.csv`` (``name,mos``; names carry their sub-folder, e.g.
    ``voc_emotic_ava/AVA__123.jpg``) in the ``database/`` folder that holds the images. The official
    30,256 / 7,727 / 1,827 split ships with qmamba; ``protocol: random`` gives the 80/20 protocol instead."""
    labels = _read_csv(root / "labels_image.csv", "flive", ["name", "mos"])
    split = labels["name"].map(official_split("flive")).fillna("train")
    return pd.DataFrame({"path": [str(root / n) for n in labels["name"]], "score": labels["mos"],
                         "name": labels["name"], "split": split})


def _tid(name: str, root: Path) -> pd.DataFrame:
    """TID2013 / TID2008: ``mos_with_names.txt`` (``<mos> <name>`` per line, MOS 0-9) and ``distorted_images/``.
    The releases mix the case of file names (``i01_01_2.bmp``, ``I01_11_1.BMP``), so names are matched
    case-insensitively."""
    path = _require(root / "mos_with_names.txt", name)
    labels = pd.read_csv(path, sep=r"\s+", header=None, names=["mos", "name"], engine="python")
    folder = root / "distorted_images"
    on_disk = {p.name.lower(): p.name for p in folder.iterdir()} if folder.is_dir() else {}
    return pd.DataFrame({
        "path": [str(folder / on_disk.get(n.lower(), n)) for n in labels["name"]],
        "score": labels["mos"],
        "content": "I" + labels["name"].str[1:3],
        "name": labels["name"],
    })


@_register(DatasetInfo("tid2013", (0.0, 9.0), False, "content", "data/tid2013"))
def _tid2013(root: Path) -> pd.DataFrame:
    return _tid("tid2013", root)


@_register(DatasetInfo("tid2008", (0.0, 9.0), False, "content", "data/tid2008"))
def _tid2008(root: Path) -> pd.DataFrame:
    return _tid("tid2008", root)


# LIVE Release 2 stores 982 entries in this order (1-based global index ranges, as in the release's readme)
_LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))


@_register(DatasetInfo("live", (0.0, 100.0), True, "content", "data/live"))
def _live(root: Path, labels: Literal["realigned", "original"] = "realigned") -> pd.DataFrame:
    """LIVE IQA Release 2 (``databaserelease2/``): DMOS (lower is better) from ``dmos_realigned.mat``
    (``dmos_new``, what HyperIQA/DEIQT/LoDa use; ``labels: original`` reads ``dmos.mat``), references from
    ``refnames_all.mat``; the 203 reference copies (``orgs == 1``) are dropped -> 779 images of 29 scenes."""
    if labels not in ("realigned", "original"):
        raise DatasetError(f"live: labels must be 'realigned' or 'original', got {labels!r}")
    file, key = ("dmos_realigned.mat", "dmos_new") if labels == "realigned" else ("dmos.mat", "dmos")
    dmos = _read_mat(root / file, "live", key).astype(np.float64)
    orgs = _read_mat(root / file, "live", "orgs").astype(bool)
    refs = _read_mat(root / "refnames_all.mat", "live", "refnames_all")
    names = [f"{folder}/img{i}.bmp" for folder, count in _LIVE_FOLDERS for i in range(1, count + 1)]
    if not len(dmos) == len(orgs) == len(refs) == len(names):
        raise DatasetError(f"live: expected {len(names)} entries in {file} and refnames_all.mat, found "
                           f"{len(dmos)} scores, {len(orgs)} orgs flags, {len(refs)} reference names")
    keep = ~orgs
    return pd.DataFrame({
        "path": [str(root / n) for n, k in zip(names, keep, strict=True) if k],
        "score": dmos[keep],
        "content": [Path(r).stem for r in refs[keep]],
        "name": [n for n, k in zip(names, keep, strict=True) if k],
    })


# distortion: (folder under dst_imgs/, token in the file name); the xlsx names types differently from the files
_CSIQ_TYPES = {"noise": ("awgn", "AWGN"), "jpeg": ("jpeg", "JPEG"), "jpeg 2000": ("jpeg2000", "jpeg2000"),
               "fnoise": ("fnoise", "fnoise"), "blur": ("blur", "BLUR"), "contrast": ("contrast", "contrast")}
_CSIQ_FOLDERS = {token: folder for folder, token in _CSIQ_TYPES.values()}


def _csiq_xlsx(path: Path) -> pd.DataFrame:
    """``csiq.DMOS.xlsx``, sheet ``all_by_image`` (header on row 4), as ``name,dmos`` pairs."""
    sheet = _read_excel(path, "csiq", ["image", "dst_type", "dst_lev", "dmos"], sheet_name="all_by_image", header=3)
    sheet = sheet.dropna(subset=["image", "dst_type"])
    types = sheet["dst_type"].astype(str).str.strip().str.lower()
    unknown = sorted(set(types) - set(_CSIQ_TYPES))
    if unknown:
        raise DatasetError(f"csiq: {path} lists distortion types {unknown}; expected {sorted(_CSIQ_TYPES)}")
    images = sheet["image"].map(lambda v: str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip())
    names = [f"{img}.{_CSIQ_TYPES[t][1]}.{int(lev)}.png" for img, t, lev in zip(images, types, sheet["dst_lev"],
                                                                               strict=True)]
    return pd.DataFrame({"name": names, "dmos": sheet["dmos"].to_numpy()})


@_register(DatasetInfo("csiq", (0.0, 1.0), True, "content", "data/csiq"))
def _csiq(root: Path, labels: Literal["auto", "txt", "xlsx"] = "auto") -> pd.DataFrame:
    """CSIQ: DMOS 0-1 (lower is better) from the widely used ``csiq_label.txt`` (``<ref>.<TOKEN>.<level>.png
    <dmos>``) or the official ``csiq.DMOS.xlsx`` (``auto`` prefers the txt when both exist); images in
    ``dst_imgs/<type>/`` (the token picks the folder)."""
    txt, xlsx = root / "csiq_label.txt", root / "csiq.DMOS.xlsx"
    if labels == "xlsx" or (labels == "auto" and not txt.is_file() and xlsx.is_file()):
        table = _csiq_xlsx(xlsx)
    else:
        table = pd.read_csv(_require(txt, "csiq"), sep=r"\s+", header=None, names=["name", "dmos"], engine="python")
        tokens = table["name"].str.split(".").str[1]
        unknown = sorted(set(tokens) - set(_CSIQ_FOLDERS))
        if unknown:
            raise DatasetError(f"csiq: {txt} names distortion tokens {unknown}; expected {sorted(_CSIQ_FOLDERS)}")
    parts = table["name"].str.split(".")
    return pd.DataFrame({
        "path": [str(root / "dst_imgs" / _CSIQ_FOLDERS[p[1]] / n) for p, n in zip(parts, table["name"], strict=True)],
        "score": table["dmos"],
        "content": parts.str[0],
        "name": table["name"],
    })


@_register(DatasetInfo("pipal", (900.0, 1850.0), False, "content", "data/pipal"))
def _pipal(root: Path) -> pd.DataFrame:
    """PIPAL public training set: ``Train_Label/*.txt`` (``A0001_00_00.bmp,1520.0648`` per line, Elo score,
    higher is better; observed 916.7-1836.0) with images in ``Train_Dist/``; content = reference ``A0001``."""
    folder = root / "Train_Label"
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise DatasetError(f"pipal: expected label files {folder}/*.txt; see data/README.md for the official layout")
    labels = pd.concat([pd.read_csv(f, header=None, names=["name", "elo"], skipinitialspace=True) for f in files],
                       ignore_index=True)
    labels["name"] = labels["name"].astype(str).str.strip()
    return pd.DataFrame({
        "path": [str(root / "Train_Dist" / n) for n in labels["name"]],
        "score": labels["elo"],
        "content": labels["name"].str.split("_").str[0],
        "name": labels["name"],
    })


@_register(DatasetInfo("agiqa3k", (0.0, 5.0), False, "random", "data/agiqa3k"))
def _agiqa3k(root: Path, score: Literal["mos_quality", "mos_align"] = "mos_quality") -> pd.DataFrame:
    """AGIQA-3K: ``data.csv`` (``mos_quality`` 0-4.49 for perceptual quality, ``mos_align`` for text alignment)
    with the images next to it. ``content`` is the prompt, so ``protocol: content`` gives prompt-disjoint splits."""
    labels = _read_csv(root / "data.csv", "agiqa3k", ["name", "prompt", score])
    return pd.DataFrame({
        "path": [str(root / n) for n in labels["name"]],
        "score": labels[score],
        "content": labels["prompt"],
        "name": labels["name"],
    })
