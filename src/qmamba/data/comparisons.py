"""Comparisons as a dataset: a table of "A looks better than B" judgements (CSV, Parquet, JSON Lines).

One row per comparison: the two images' paths and either the probability that the first is better (``p``, e.g. the
share of raters who chose it) or the winner (``first`` / ``second`` / ``tie``, or the winning image's path); a
``count`` column gives the judgements behind a row. Rows of the same pair (in either order) are pooled into one
pair judged ``sum(count)`` times. Paths, the root, the ``split`` column (per comparison) and the groups (per image,
for content-disjoint splits) work as in a score table (:mod:`qmamba.data.tables`).

The split is by image: no image is on two sides of it, so test pairs compare images the model never saw. A model
trained from comparisons learns a scale of its own: see :meth:`qmamba.inference.scale.ScoreScale.fitted_scale`.

Every problem (a pair naming one image twice, ``p`` outside [0, 1], an unknown winner, an image in two splits,
images no comparison links to the rest) is one :class:`~qmamba.data.checks.ProblemReport`, before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from qmamba.errors import UsageError
from qmamba.inference.sources import NetworkLimits

from .checks import ProblemReport
from .errors import DatasetError
from .tables import SPLITS, describe_columns, read_table_file, resolve_paths, with_default_columns

__all__ = ["ComparisonSpec", "components", "load_comparisons"]

MAX_COUNT = 1e9  # judgements behind one row: inf or 1e30 is a broken column, and would outweigh every other row
FIRST, SECOND, TIE = ("first", "a", "1"), ("second", "b", "2"), ("tie", "equal", "0.5")


@dataclass
class ComparisonSpec:
    """A comparisons table (``datasets: [{name: mine, comparisons: {file: pairs.csv}}]``).

    Args:
        file: the table: ``.csv``, ``.parquet`` or ``.jsonl``; a local path or a URI.
        first: the column of the first image's path.
        second: the column of the second image's path.
        p: the column of the probability that the first image is better, in [0, 1] (default: ``p`` if the table has
            it).
        winner: the column naming the better image: ``first``, ``second`` or ``tie`` (also ``a`` / ``b``, ``1`` /
            ``2``), or its path (default: ``winner`` if the table has it and no ``p``).
        count: the column of the number of judgements behind each row (default ``count`` if the table has it, else
            one each).
        split: the column of each comparison's train / val / test label (default ``split``, if the table has it;
            ``protocol: official``, the default then). Both images of a comparison are in its split, and an image in
            comparisons of two splits is an error.
        first_group: the column of the first image's content or reference id, for content-disjoint splits (default
            ``first_group``, if the table has it).
        second_group: the column of the second image's (default ``second_group``).

    For each optional column, ``""`` leaves a column of the default name unused.
    """

    file: str
    first: str = "first"
    second: str = "second"
    p: str | None = None
    winner: str | None = None
    count: str | None = None
    split: str | None = None
    first_group: str | None = None
    second_group: str | None = None

    def __post_init__(self) -> None:
        if self.p and self.winner:
            raise UsageError("comparisons: give either p (the probability that the first image is better) or winner, "
                             "not both")
        groups = (self.first_group, self.second_group)
        if "" in groups and any(groups):  # one named, the other kept out (one left out may be found by its name)
            raise UsageError("comparisons: name both first_group and second_group (each image's content id), or "
                             "neither")


@dataclass
class Comparisons:
    """A comparisons table read: its images (``path``, ``name``, ``row``, ``content`` and, with a split column,
    ``split``) and its pairs (``first`` and ``second`` index the images; ``judged`` is the share of the ``weight``
    judgements that found the first better; ``row`` the table row that named the pair first)."""

    images: pd.DataFrame
    pairs: pd.DataFrame
    spec: ComparisonSpec  # the columns read, defaults included: the split protocol follows them


def load_comparisons(spec: ComparisonSpec, dataset: str, root: str | None,
                     limits: NetworkLimits = NetworkLimits()) -> tuple[Comparisons, ProblemReport]:
    """The table's usable images and pooled pairs, and the report of its problems. A table that cannot be used at
    all (missing, unreadable, a column it lacks, no rows) is a :class:`DatasetError` at once."""
    frame = read_table_file(spec.file, dataset, limits)
    names = list(frame.columns)
    spec = with_default_columns(spec, names, ("count", "split", "first_group", "second_group"))
    if bool(spec.first_group) != bool(spec.second_group):
        given, lacking = ("first_group", "second_group") if spec.first_group else ("second_group", "first_group")
        raise DatasetError(f"{dataset}: the comparisons table {spec.file} gives {given} "
                           f"({getattr(spec, given)!r}) but no {lacking} (its columns: {', '.join(names)}); a content "
                           f"split needs both images' groups: name {lacking}, or keep both out with {given}: ''")
    p_column = spec.p or ("p" if not spec.winner and "p" in names else None)
    winner_column = spec.winner or ("winner" if not p_column and "winner" in names else None)
    if not p_column and not winner_column:
        raise DatasetError(f"{dataset}: the comparisons table {spec.file} has neither a p nor a winner column (its "
                           f"columns: {', '.join(names)}); name one with comparisons: {{p: COLUMN}} or {{winner: "
                           "COLUMN}}")
    wanted = {"first": spec.first, "second": spec.second, "p": p_column, "winner": winner_column,
              "count": spec.count, "split": spec.split, "first_group": spec.first_group,
              "second_group": spec.second_group}
    missing = [f"{role} column {column!r}" for role, column in wanted.items() if column and column not in names]
    if missing:
        raise DatasetError(f"{dataset}: the comparisons table {spec.file} has no {', '.join(missing)} (its columns: "
                           f"{', '.join(names)}); name the right ones under comparisons:")
    describe_columns(dataset, wanted)

    report = ProblemReport(dataset, len(frame))
    rows = pd.Series(np.arange(1, len(frame) + 1))
    first = frame[spec.first].astype(str).str.strip().where(frame[spec.first].notna(), "")
    second = frame[spec.second].astype(str).str.strip().where(frame[spec.second].notna(), "")
    keep = np.ones(len(frame), bool)

    def refuse(mask: np.ndarray, kind: str, fix: str, show: pd.Series) -> None:
        for i in np.flatnonzero(mask & keep):
            report.add(kind, f"row {rows.iat[i]}: {first.iat[i]} vs {second.iat[i]} ({show.iat[i]!r})", fix,
                       row=int(rows.iat[i]))
        keep[mask] = False

    refuse(((first == "") | (second == "")).to_numpy(), "comparisons without two image paths",
           f"fill in the {spec.first} and {spec.second} columns of these rows", first)
    refuse((first == second).to_numpy(), "comparisons of an image with itself",
           "fix or remove these rows: a comparison needs two different images", first)
    if p_column:
        raw = frame[p_column]
        judged = pd.to_numeric(raw, errors="coerce")
        refuse(judged.isna().to_numpy(), "p values that are not numbers", "fix or remove these rows", raw)
        refuse(((judged < 0) | (judged > 1)).to_numpy(), "p values outside [0, 1]",
               "p is the probability that the first image is better: fix these rows", raw)
    else:
        raw = frame[winner_column]
        said = raw.astype(str).str.strip()
        judged = pd.Series(np.select([said.str.lower().isin(FIRST) | (said == first),
                                      said.str.lower().isin(SECOND) | (said == second), said.str.lower().isin(TIE)],
                                     [1.0, 0.0, 0.5], np.nan))
        refuse(judged.isna().to_numpy(), "winners that name neither image",
               "write first, second or tie (or the better image's path) in these rows", raw)
    weight = pd.Series(np.ones(len(frame)))
    if spec.count:
        weight = pd.to_numeric(frame[spec.count], errors="coerce")
        refuse((weight.isna() | ~(weight > 0) | ~(weight <= MAX_COUNT)).to_numpy(),
               f"counts that are not numbers in (0, {MAX_COUNT:.0e}]",
               f"the {spec.count} column counts the judgements behind a row: fix these rows", frame[spec.count])
    split = None
    if spec.split:
        split = frame[spec.split].astype(str).str.strip().str.lower().where(frame[spec.split].notna())
        refuse((~split.isin(SPLITS)).to_numpy(), f"split values other than {' / '.join(SPLITS)}",
               "use train, val or test in the split column", frame[spec.split])

    images = _images(spec, frame, first, second, split, keep, rows, report)
    usable = images["usable"].to_numpy().copy()  # resolve_paths clears the images it reports
    images["path"] = pd.Series(resolve_paths(images["name"], spec.file, root, dataset, limits, report, usable,
                                             images["row"]), dtype=object)
    images["usable"] = usable
    index = pd.Series(np.arange(len(images)), index=images["name"])
    pairs = pd.DataFrame({"first": index.reindex(first).to_numpy(), "second": index.reindex(second).to_numpy(),
                          "judged": judged.to_numpy(float), "weight": weight.to_numpy(float), "row": rows.to_numpy()})
    pairs = pairs[keep].astype({"first": int, "second": int})
    pairs = _pooled(pairs[usable[pairs["first"]] & usable[pairs["second"]]])
    _unlinked(images, pairs, report)
    return Comparisons(images.drop(columns="usable"), pairs, spec), report


def _images(spec: ComparisonSpec, frame: pd.DataFrame, first: pd.Series, second: pd.Series, split: pd.Series | None,
            keep: np.ndarray, rows: pd.Series, report: ProblemReport) -> pd.DataFrame:
    """One row per image the usable comparisons name, in order of appearance: its name, the first row naming it,
    its group and split (an image with two groups, or in comparisons of two splits, is a problem)."""
    sides = [pd.DataFrame({"name": names, "row": rows}) for names in (first, second)]
    for side, column in zip(sides, (spec.first_group, spec.second_group), strict=True):
        side["content"] = frame[column].astype(str).str.strip().where(frame[column].notna()) if column else None
        if split is not None:
            side["split"] = split
    both = pd.concat([side[keep] for side in sides]).sort_values("row", kind="stable")
    images = both.drop_duplicates("name").reset_index(drop=True)
    images["usable"] = True
    for column, kind, fix in (
        ("content", "images with two groups", "give each image one content id in the group columns"),
        ("split", "images in comparisons of two splits",
         "keep every comparison of an image in one split, so that no image is on two sides of it"),
    ):
        if column not in both or both[column].isna().all():
            continue
        if column == "content" and both["content"].isna().any():
            for name, row in both.loc[both["content"].isna(), ["name", "row"]].drop_duplicates("name").itertuples(
                    index=False):
                report.add("images without a group", f"row {row}: {name}",
                           "fill in the group columns (the content or reference id) of these rows", row=int(row))
        conflicts = both.groupby("name", sort=False)[column].nunique()
        for name in conflicts.index[conflicts > 1]:
            seen = both.loc[both["name"] == name].drop_duplicates(column)  # each value's first row
            shown = ", ".join(f"{v} (row {r})" for r, v in zip(seen["row"][:4], seen[column][:4], strict=True))
            report.add(kind, f"{name}: {shown}", fix, row=int(seen["row"].iat[0]))
            images.loc[images["name"] == name, "usable"] = False
    return images


def _pooled(pairs: pd.DataFrame) -> pd.DataFrame:
    """Rows of one pair (in either order) as one pair: the judgements add up, ``judged`` is their share."""
    flip = pairs["first"] > pairs["second"]
    ordered = pairs.assign(first=np.where(flip, pairs["second"], pairs["first"]),
                           second=np.where(flip, pairs["first"], pairs["second"]),
                           judged=np.where(flip, 1.0 - pairs["judged"], pairs["judged"]))
    ordered["wins"] = ordered["judged"] * ordered["weight"]
    pooled = ordered.groupby(["first", "second"], sort=False).agg(wins=("wins", "sum"), weight=("weight", "sum"),
                                                                  row=("row", "min")).reset_index()
    pooled["judged"] = pooled["wins"] / pooled["weight"]
    return pooled[["first", "second", "judged", "weight", "row"]].sort_values("row").reset_index(drop=True)


def components(count: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The connected component of each of ``count`` images in the graph of the comparisons ``first``-``second``."""
    graph = coo_matrix((np.ones(len(first)), (first, second)), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def _unlinked(images: pd.DataFrame, pairs: pd.DataFrame, report: ProblemReport) -> None:
    """Images that no chain of comparisons links to the others: their scores could not be compared. Checked within
    each split of a split column (its comparisons never cross splits), else over the whole table."""
    splits = images["split"] if "split" in images else pd.Series("all", index=images.index)
    for name in splits.dropna().unique():
        members = np.flatnonzero((splits == name).to_numpy() & images["usable"].to_numpy())
        inside = pairs[np.isin(pairs["first"], members) & np.isin(pairs["second"], members)]
        local = pd.Series(np.arange(len(members)), index=members)
        labels = components(len(members), local[inside["first"]].to_numpy(), local[inside["second"]].to_numpy())
        sizes = np.sort(np.bincount(labels))[::-1]
        if len(sizes) > 1:
            where = "" if name == "all" else f" of the {name} split"
            shown = ", ".join(map(str, sizes[:8])) + (", ..." if len(sizes) > 8 else "")
            report.add("comparison graphs in pieces",
                       f"the {len(members)} images{where} form {len(sizes)} components that no comparison links "
                       f"(images per component: {shown})",
                       "add comparisons between the components, or leave the smaller ones out: scores of images "
                       "that no chain of comparisons links cannot be compared")
