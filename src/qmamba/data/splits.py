"""Train / validation / test splits following the IQA protocols, deterministic for a seed and saved with the run.

* ``content``: split by reference image (synthetic datasets) so that no scene is in two splits;
* ``random``: split by image (authentic datasets);
* ``official``: the split column provided by the dataset (KonIQ-10k, FLIVE) or by a table of your own.

A given split is checked before it is used (:func:`split_problems`): it must hold training and test images, and no
group (content) may sit on two sides of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from qmamba.files.atomic import write_text_atomic

from .checks import ProblemReport
from .errors import DatasetError

__all__ = ["Protocol", "make_splits", "save_splits", "split_problems"]

Protocol = Literal["content", "random", "official"]
SPLITS = ("train", "val", "test")


def make_splits(
    table: pd.DataFrame, protocol: Protocol, seed: int, test_fraction: float = 0.2, val_fraction: float = 0.0
) -> dict[str, np.ndarray]:
    """Row indices per split. Fractions are of the whole dataset; the validation part comes out of training."""
    if protocol == "official":
        _check_official(table)
        return {s: np.flatnonzero(table["split"].to_numpy() == s) for s in SPLITS}
    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 - test_fraction:
        raise ValueError(f"bad split fractions: test {test_fraction}, val {val_fraction}")
    if protocol == "content":
        if table["content"].isna().any():
            raise DatasetError("a content-disjoint split needs a reference id ('content', a table's group column) "
                               "for every image; name the table's group column, or set protocol: random")
        units = table["content"].astype(str).to_numpy()
    elif protocol == "random":
        units = np.arange(len(table)).astype(str)
    else:
        raise ValueError(f"unknown split protocol {protocol!r}")
    unique = np.unique(units)  # sorted, so the permutation depends on the seed alone
    order = unique[np.random.default_rng(seed).permutation(len(unique))]
    n_test = max(1, round(test_fraction * len(unique)))
    n_val = round(val_fraction * len(unique))
    if val_fraction > 0:
        n_val = max(1, n_val)
    groups = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    if len(groups["train"]) == 0:
        raise DatasetError(f"too few {'references' if protocol == 'content' else 'images'} ({len(unique)}) to split")
    return {s: np.flatnonzero(np.isin(units, groups[s])) for s in SPLITS}


def _check_official(table: pd.DataFrame) -> None:
    """Every image needs a train / val / test label: a partial split file must never turn into another protocol."""
    if "split" not in table:
        raise DatasetError("protocol: official needs the dataset's own split, and it has none (a table names its split "
                           "column with table: {split: COLUMN}); set protocol: random or content for a seeded split")
    split = table["split"] if "split" in table else pd.Series([None] * len(table), index=table.index)
    bad = table[~split.isin(SPLITS)]
    if len(bad):
        names = bad["name"] if "name" in bad else bad["path"]
        shown = ", ".join(f"{n}: {'no entry' if pd.isna(v) else v}"
                          for n, v in zip(names[:3], split[bad.index][:3], strict=True))
        raise DatasetError(
            f"the official split does not label {len(bad)} of {len(table)} images with train / val / test ({shown}"
            f"{', ...' if len(bad) > 3 else ''}); fix the split file (KonIQ-10k: koniq10k_distributions_sets.csv, "
            "sets training / validation / test) or set protocol: random (or content) for a seeded split instead")


def split_problems(table: pd.DataFrame, splits: dict[str, np.ndarray], protocol: Protocol,
                   report: ProblemReport) -> None:
    """A given split's problems into ``report``: a split without training or test images, and a group (content)
    in two splits, which would test on content the model trained on."""
    if protocol != "official":
        return  # a seeded split is made whole and content-disjoint
    for name in ("train", "test"):
        if len(splits[name]) == 0:
            report.add("empty splits", f"no {name} images", f"label some rows {name} in the split column")
    content = table["content"]
    if len(content) and content.notna().all():
        sides = {name: set(content.iloc[rows]) for name, rows in splits.items()}
        for first, second in (("train", "test"), ("train", "val"), ("val", "test")):
            for group in sorted(sides[first] & sides[second], key=str):
                report.add("groups in two splits", f"{group} in {first} and {second}",
                           "put every image of a group in one split (or set protocol: content for a seeded "
                           "content-disjoint split)")


def save_splits(table: pd.DataFrame, splits: dict[str, np.ndarray], path: str | os.PathLike[str]) -> None:
    """Write ``name,split,path`` rows (CSV) atomically, so a run records exactly what it trained and tested on: the
    name as the labels give it, and the image it was read from (so that another run can tell it saw the same image:
    ``qmamba transfer`` compares its target with its source's training split)."""
    rows = [(table.loc[i, "name"] if "name" in table else table.loc[i, "path"], split, str(table.loc[i, "path"]))
            for split, idx in splits.items() for i in idx]
    write_text_atomic(Path(path), pd.DataFrame(rows, columns=["name", "split", "path"]).to_csv(index=False))
