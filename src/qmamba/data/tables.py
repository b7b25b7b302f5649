"""Your own ratings as a dataset: a table of images and scores (CSV, Parquet, JSON Lines), and pyiqa's files.

A table has one row per image: its path and its score, optionally the score's standard deviation, a ``split``
(train / val / test) and a ``group`` (the content or reference id, for content-disjoint splits). A path is relative
to the dataset's root (by default the table's folder), absolute, a URI (``s3://``, ``https://``) or a tar-shard member
(``shards/000001.tar#0001.jpg``), read through the sources ``qmamba score`` reads. The score's scale
(``score_range``) and direction (``lower_better``) are declared, never guessed: a table without them is an error
naming what its scores span.

pyiqa's ``GeneralNRDataset`` files are read as pyiqa reads them (``format: pyiqa``): the meta-info CSV's first column
is the image (relative to the root), its second the score; the split is a split pickle (``split_file``, with
``split_index``, default 1) read as plain data, never run, or one of the table's split columns (``split_index`` names
it, or numbers it as pyiqa does: ``ratio802_seed123_split_01``). Either way exactly pyiqa's rows are selected.

Every row problem (no score, a score off the scale, a bad split value, a path outside the root, one image with two
scores) is collected into one :class:`~qmamba.data.checks.ProblemReport`, so a table is fixed in one pass.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import pandas as pd

from qmamba.errors import UsageError
from qmamba.files.plain_pickle import read_plain_pickle
from qmamba.inference.sources import InputError, NetworkLimits, RemoteFile, expand, is_uri, open_uri

from .checks import ProblemReport
from .errors import DatasetError

__all__ = ["TableSpec", "load_table", "read_table_file", "resolve_paths", "table_folder", "with_default_columns"]

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
TABLE_SUFFIXES = (".csv", ".txt", ".parquet", ".jsonl", ".json")


@dataclass
class TableSpec:
    """A label table of your own (``datasets: [{name: mine, table: {...}, score_range: [1, 10]}]``).

    Args:
        file: the table: ``.csv`` (or pyiqa's ``.txt``), ``.parquet`` or ``.jsonl``; a local path or a URI.
        lower_better: the score's direction, required: false for MOS (higher is better), true for DMOS.
        format: ``columns`` (the columns named below) or ``pyiqa`` (a pyiqa meta-info file: image, score by position).
        path: the column of image paths (default ``path``; pyiqa: the first column).
        score: the column of scores (default ``score``; pyiqa: the second column).
        std: the column of the scores' standard deviations (default ``std``, if the table has it).
        split: the column of train / val / test labels (default ``split``, if the table has it and no split file is
            given; ``protocol: official`` uses it, the default then).
        group: the column of content / reference ids (default ``group``, if the table has it; ``protocol: content``
            splits by it, the default then). For each of these three, ``""`` leaves a column of the default name
            unused.
        split_file: pyiqa's split pickle: ``{split_index: {"train": [rows], "val": [...], "test": [...]}}``.
        split_index: which of the split file's splits (default 1), or pyiqa's split column: its name, or its number
            (``ratio{split_ratio}_seed123_split_{NN}``).
        split_ratio: pyiqa's ratio in numbered split-column names.
    """

    file: str
    lower_better: bool | None = None
    format: Literal["columns", "pyiqa"] = "columns"
    path: str | None = None
    score: str | None = None
    std: str | None = None
    split: str | None = None
    group: str | None = None
    split_file: str | None = None
    split_index: int | str | None = None
    split_ratio: str = "802"

    def __post_init__(self) -> None:
        if self.format not in ("columns", "pyiqa"):
            raise UsageError(f"table format must be columns or pyiqa, got {self.format!r}")
        if self.lower_better not in (None, True, False):
            raise UsageError(f"table lower_better must be true or false, got {self.lower_better!r}")

    @property
    def has_split(self) -> bool:
        """The table brings its own split (a split column, a pyiqa split file or split column)."""
        return bool(self.split or self.split_file or (self.format == "pyiqa" and self.split_index is not None))


def with_default_columns(spec: Any, names: list[str], optional: tuple[str, ...]) -> Any:
    """``spec`` (a table's dataclass) with each of its ``optional`` column fields that the config leaves out set to
    the column of the same name, where the table has one: the documented default names ("column (default name)" in
    data/README.md), which a table that follows them must not find ignored. ``""`` keeps such a column out."""
    defaults = {f: f for f in optional if getattr(spec, f) is None and f in names}
    cleared = {f: None for f in optional if getattr(spec, f) == ""}
    return dataclasses.replace(spec, **defaults, **cleared)


def describe_columns(dataset: str, columns: dict[str, str | None]) -> None:
    """Log the column read for each role (and the roles left out), so that a run says what it read."""
    used = ", ".join(f"{role} from {column!r}" for role, column in columns.items() if column)
    unused = [role for role, column in columns.items() if not column]
    log.info("%s: %s%s", dataset, used, f" (no {', '.join(unused)} column)" if unused else "")


def table_folder(file: str) -> str:
    """The folder a table's relative paths start from: its own."""
    return file.rsplit("/", 1)[0] if is_uri(file) else str(Path(file).resolve().parent)


def load_table(spec: TableSpec, dataset: str, root: str | None, score_range: tuple[float, float] | None,
               limits: NetworkLimits = NetworkLimits()) -> tuple[pd.DataFrame, ProblemReport]:
    """The table's usable rows as a label table (``path``, ``score``, ``content``, ``name``, ``row`` and, where
    given, ``split`` and ``std``; ``attrs["score_range"]`` the declared scale, ``attrs["table"]`` the spec with the
    columns it read, defaults included), and the report of its bad rows.

    A table that cannot be used at all (missing, unreadable, a named column it lacks, no rows, an undeclared scale or
    direction, a bad split file) is a :class:`DatasetError` at once."""
    frame = read_table_file(spec.file, dataset, limits)
    names = list(frame.columns)
    positional = spec.format == "pyiqa"
    if not positional:  # pyiqa's files are read by position, as pyiqa reads them
        spec = with_default_columns(spec, names, ("std", "group") if spec.split_file else ("std", "split", "group"))
    path_column = spec.path or (names[0] if positional else "path")
    score_column = spec.score or (names[1] if positional and len(names) > 1 else "score")
    wanted = {"path": path_column, "score": score_column, "std": spec.std, "split": spec.split, "group": spec.group}
    missing = [f"{role} column {column!r}" for role, column in wanted.items() if column and column not in names]
    if missing:
        raise DatasetError(f"{dataset}: the table {spec.file} has no {', '.join(missing)} (its columns: "
                           f"{', '.join(map(str, names))}); name the right ones under table:")
    describe_columns(dataset, wanted)
    scores = pd.to_numeric(frame[score_column], errors="coerce")
    if spec.lower_better is None:
        raise DatasetError(f"{dataset}: declare the scores' direction: table: {{lower_better: false}} for higher "
                           "is better (MOS), true for lower is better (DMOS)")
    if score_range is None:
        raise DatasetError(f"{dataset}: declare the scores' scale with score_range: [low, high] (qmamba never guesses "
                           f"it; the table's scores span {scores.min():g} to {scores.max():g}), e.g. the rating "
                           "scale your raters used")
    low, high = map(float, score_range)

    report = ProblemReport(dataset, len(frame))
    table = pd.DataFrame({"row": np.arange(1, len(frame) + 1), "name": frame[path_column].astype(str).str.strip(),
                          "score": scores})
    keep = np.ones(len(table), bool)

    def refuse(mask: np.ndarray, kind: str, fix: str, show: pd.Series) -> None:
        for i in np.flatnonzero(mask & keep):
            report.add(kind, f"row {table['row'].iat[i]}: {table['name'].iat[i]} ({show.iat[i]!r})", fix,
                       row=int(table["row"].iat[i]))
        keep[mask] = False

    split = _split_column(spec, frame, dataset)
    if split is not None:
        table["split"] = split
        if positional:  # pyiqa selects the rows of a phase: the others are not part of the dataset
            keep[:] = split.isin(SPLITS).to_numpy()
            if not keep.all():
                log.info("%s: %d rows are in none of the split's train / val / test (pyiqa leaves them out too)",
                         dataset, int((~keep).sum()))
    raw = frame[score_column]
    refuse(frame[path_column].isna().to_numpy() | (table["name"] == "").to_numpy(), "rows without an image path",
           "fill in or remove these rows", frame[path_column])
    refuse(scores.isna().to_numpy(), "scores that are not numbers", "fix or remove these rows", raw)
    refuse(((scores < low) | (scores > high)).to_numpy(), f"scores outside the declared {low:g}-{high:g} scale",
           "fix these rows, or declare the scale your scores use with score_range: [low, high]", raw)
    if spec.std:
        std = pd.to_numeric(frame[spec.std], errors="coerce")
        refuse((std.isna() | (std < 0)).to_numpy(), "standard deviations that are not numbers >= 0",
               f"fix the {spec.std} column in these rows", frame[spec.std])
        table["std"] = std
    if spec.group:
        table["content"] = frame[spec.group].astype(str).str.strip().where(frame[spec.group].notna())
        refuse(table["content"].isna().to_numpy() | (table["content"] == "").to_numpy(), "rows without a group",
               f"fill in the {spec.group} column (the content or reference id) in these rows", frame[spec.group])
    else:
        table["content"] = None
    if split is not None and not positional:
        refuse((~split.isin(SPLITS)).to_numpy(), f"split values other than {' / '.join(SPLITS)}",
               "use train, val or test in the split column", frame[spec.split])  # type: ignore[index]
    # object, not str: pandas would turn the URIs' and tar members' sources into plain strings
    paths = resolve_paths(table["name"], spec.file, root, dataset, limits, report, keep, table["row"])
    table["path"] = pd.Series(paths, dtype=object)
    _repeated_images(table, keep, report)
    usable = table[keep].reset_index(drop=True)
    usable.attrs["score_range"] = (low, high)
    usable.attrs["table"] = spec  # the columns read: the split protocol follows them
    return usable, report


def read_table_file(file: str, dataset: str, limits: NetworkLimits) -> pd.DataFrame:
    suffix = PurePosixPath(file.split("?", 1)[0]).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DatasetError(f"{dataset}: the table {file} is not a .csv, .parquet or .jsonl file")
    try:
        with (open_uri(file, limits=limits) if is_uri(file) else open(file, "rb")) as f:
            data = f.read()
    except UsageError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{dataset}: the table {file} does not exist") from None
    except Exception as err:  # noqa: BLE001 - fsspec backends raise their own (credentials, HTTP, ...)
        raise DatasetError(f"{dataset}: cannot read the table {file}: {type(err).__name__}: {err}") from None
    try:
        if suffix == ".parquet":
            try:
                import pyarrow  # noqa: F401 - pandas reads Parquet through it
            except ImportError:
                raise UsageError(f"reading the table {file} needs pyarrow: pip install \"qmamba[parquet]\"") from None
            frame = pd.read_parquet(io.BytesIO(data))
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(io.BytesIO(data), lines=True, dtype=False)
        else:  # every cell as text: a path "NA" stays a path, and scores are parsed (and checked) below
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[""],
                                encoding="utf-8-sig")
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow, pandas' csv and json parsers each raise their own
        raise DatasetError(f"{dataset}: cannot read the table {file}: {type(err).__name__}: {err}") from None
    if frame.empty:
        raise DatasetError(f"{dataset}: the table {file} has no rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.reset_index(drop=True)


def _split_column(spec: TableSpec, frame: pd.DataFrame, dataset: str) -> pd.Series | None:
    """Each row's train / val / test label, from the split column or pyiqa's split file or split column."""
    if spec.split:
        return frame[spec.split].astype(str).str.strip().str.lower().where(frame[spec.split].notna())
    if spec.split_file:
        return _pyiqa_split_file(spec, len(frame), dataset)
    if spec.format == "pyiqa" and spec.split_index is not None:
        column = spec.split_index if isinstance(spec.split_index, str) else \
            f"ratio{spec.split_ratio}_seed123_split_{spec.split_index:02d}"
        if column not in frame:
            available = [c for c in frame.columns if "split" in c]
            raise DatasetError(f"{dataset}: the table {spec.file} has no split column {column} (its split columns: "
                               f"{', '.join(available) or 'none'}); set split_index to one of them")
        return frame[column].astype(str).str.strip()
    return None


def _pyiqa_split_file(spec: TableSpec, rows: int, dataset: str) -> pd.Series:
    """pyiqa's ``split_dict[split_index][phase]`` row indices as a column of labels (read as plain data only)."""
    splits = read_plain_pickle(spec.split_file, what=f"{dataset}: the split file")  # type: ignore[arg-type]
    index = 1 if spec.split_index is None else spec.split_index
    if not isinstance(splits, dict) or index not in splits or not isinstance(splits[index], dict):
        keys = ", ".join(map(repr, list(splits)[:10])) if isinstance(splits, dict) else type(splits).__name__
        raise DatasetError(f"{dataset}: the split file {spec.split_file} has no split {index!r} of train / val / test "
                           f"row lists (it holds {keys}); set split_index to one of its splits")
    labels = pd.Series([None] * rows, dtype=object)
    for phase in SPLITS:
        listed = splits[index].get(phase, [])
        if isinstance(listed, (list, tuple)) and len(listed) > rows:  # before a pass over ten million entries
            raise DatasetError(f"{dataset}: the split file {spec.split_file} lists {len(listed):,} rows for {phase} "
                               f"but the table has {rows:,}: it repeats rows, or is the split file of another table")
        bad = [i for i in listed if not isinstance(i, int) or not 0 <= i < rows]
        if not isinstance(listed, (list, tuple)) or bad:
            raise DatasetError(f"{dataset}: the split file {spec.split_file} lists rows {bad[:5]} for {phase} but "
                               f"the table has rows 0-{rows - 1}; is it the split file of this table?")
        if len(set(listed)) < len(listed):
            raise DatasetError(f"{dataset}: the split file {spec.split_file} lists {len(listed) - len(set(listed))} "
                               f"rows of {phase} more than once; a row is listed once")
        twice = [i for i in listed if labels.iat[i] not in (None, phase)]
        if twice:
            raise DatasetError(f"{dataset}: the split file {spec.split_file} puts rows {twice[:5]} in both "
                               f"{labels.iat[twice[0]]} and {phase}; a row belongs to one split")
        labels.iloc[list(listed)] = phase
    return labels


def resolve_paths(names: pd.Series, file: str, root: str | None, dataset: str, limits: NetworkLimits,
             report: ProblemReport, keep: np.ndarray, rows: pd.Series) -> list[str]:
    """Each row's image: a local path, a :class:`~qmamba.inference.sources.RemoteFile` or a tar-shard member; a path
    outside an explicitly given root, and a member its shard lacks, are reported. Under a local root, each path is
    its target with every symbolic link resolved, checked against the root's own: a link to an image elsewhere in the
    root is read there, one that leads out of the root is reported and never opened."""
    base = root or table_folder(file)
    remote_base = is_uri(base)
    base = base.rstrip("/") if remote_base else os.path.abspath(base)
    confined = root is not None and not remote_base  # links resolved first: none leads out of the root
    real_base = os.path.realpath(base) if confined else base
    resolved: list[str] = []
    members: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        shard, sep, member = name.partition(".tar#")
        location = shard + ".tar" if sep else name
        if is_uri(location):
            path = location
        elif remote_base:
            path = posixpath.normpath(posixpath.join(base.split("://", 1)[1], location))
            path = f"{base.split('://', 1)[0]}://{path}"
        else:
            path = os.path.normpath(os.path.join(base, location))
            if confined:
                path = os.path.realpath(path)
        if root is not None and keep[i] and not _inside(path, real_base):
            report.add("paths outside the root", f"row {rows.iat[i]}: {name}", f"move these images under {root}, "
                       "or leave root out so that paths are read as they are", row=int(rows.iat[i]))
            keep[i] = False
        if sep:
            path = f"{path}#{member}"
            members.setdefault(path.rsplit("#", 1)[0], []).append(i)
        resolved.append(RemoteFile(path, limits) if is_uri(path) and not sep else path)
    for shard, indices in members.items():
        _shard_members(shard, indices, resolved, limits, report, keep, names, rows)
    return resolved


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _shard_members(shard: str, indices: list[int], resolved: list[str], limits: NetworkLimits,
                   report: ProblemReport, keep: np.ndarray, names: pd.Series, rows: pd.Series) -> None:
    """Replace the rows' ``<shard>#<member>`` keys by the shard's members (listed once); report those it lacks."""
    try:
        listed = {str(m): m for m in expand([shard], limits=limits)[0]}
        reason = "not in the shard"
    except InputError as err:
        listed, reason = {}, str(err)
    for i in indices:
        if resolved[i] in listed:
            resolved[i] = listed[resolved[i]]
        elif keep[i]:
            report.add("missing", f"row {rows.iat[i]}: {names.iat[i]} ({reason})",
                       "check the shard and the member's name (shard.tar#member)", row=int(rows.iat[i]))
            keep[i] = False


def _repeated_images(table: pd.DataFrame, keep: np.ndarray, report: ProblemReport) -> None:
    """One image listed twice: with different scores it is a problem (which one is right?); with the same score the
    repeat is dropped and logged."""
    paths = table["path"].astype(str)
    repeated = paths.duplicated(keep=False).to_numpy() & keep
    if not repeated.any():
        return
    for path, rows in table[repeated].groupby(paths[repeated], sort=False):
        if rows["score"].nunique() > 1:
            shown = ", ".join(f"row {r} ({s:g})" for r, s in zip(rows["row"], rows["score"], strict=True))
            report.add("images listed twice with different scores", f"{path}: {shown}",
                       "keep one row per image (the mean of its ratings)", row=int(rows["row"].iat[0]))
            keep[rows.index] = False
        else:
            keep[rows.index[1:]] = False
            log.warning("%s: listed %d times with the same score; the repeats are left out", path, len(rows))
