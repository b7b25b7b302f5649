"""Loaders against the real label tables in ../shared/iqa-labels (skipped when the folder is absent).

Images are not shipped, so each test lays the real table out as the official release would and writes no images;
the loaders only parse labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from qmamba.data import load_dataset
from qmamba.data.splits import make_splits

LABELS = Path(os.environ.get("QMAMBA_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "iqa-labels"
pytestmark = pytest.mark.skipif(not LABELS.is_dir(), reason=f"real label tables not found at {LABELS}")


def test_koniq_official_split_from_the_real_split_file(tmp_path):
    sets = pd.read_csv(LABELS / "original" / "koniq10k_distributions_sets.csv")
    sets.to_csv(tmp_path / "koniq10k_distributions_sets.csv", index=False)
    # the scores file has the same images; its MOS_zscore equals the split file's MOS (datasets.md §2.1)
    sets.rename(columns={"MOS": "MOS_zscore"}).to_csv(tmp_path / "koniq10k_scores_and_distributions.csv",
                                                        index=False)
    table = load_dataset("koniq10k", tmp_path)
    assert len(table) == 10_073
    assert table["split"].value_counts().to_dict() == {"train": 7_058, "test": 2_015, "val": 1_000}
    assert table["score"].between(3.9, 88.4).all()
    splits = make_splits(table, "official", seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [7_058, 1_000, 2_015]


def test_kadid_real_table_counts_and_content_split(tmp_path):
    meta = pd.read_csv(LABELS / "converted" / "meta_info_KADID10kDataset.csv")
    meta.rename(columns={"dist_name": "dist_img", "ref_name": "ref_img", "std": "var"})[
        ["dist_img", "ref_img", "dmos", "var"]].to_csv(tmp_path / "dmos.csv", index=False)
    table = load_dataset("kadid10k", tmp_path)
    assert len(table) == 10_125 and table["content"].nunique() == 81
    assert table["score"].between(1.0, 4.93).all()  # the "dmos" column is a MOS, higher is better
    splits = make_splits(table, "content", seed=0, test_fraction=0.2)
    test_refs = set(table.loc[splits["test"], "content"])
    assert len(test_refs) == 16 and not test_refs & set(table.loc[splits["train"], "content"])


def test_csiq_real_label_file(tmp_path):
    (tmp_path / "csiq_label.txt").write_bytes((LABELS / "original" / "csiq_label.txt").read_bytes())
    table = load_dataset("csiq", tmp_path)
    assert len(table) == 866 and table["content"].nunique() == 30
    assert table["score"].between(0, 1).all()
    folders = table["path"].map(lambda p: Path(p).parent.name).value_counts().to_dict()
    assert folders == {"awgn": 150, "jpeg": 150, "jpeg2000": 150, "fnoise": 150, "blur": 150, "contrast": 116}


def test_tid2013_real_names_resolve_case_insensitively(tmp_path):
    meta = pd.read_csv(LABELS / "converted" / "meta_info_TID2013Dataset.csv")
    lines = [f"{mos} {name}" for mos, name in zip(meta["mos"], meta["dist_name"], strict=True)]
    (tmp_path / "mos_with_names.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "distorted_images").mkdir()
    (tmp_path / "distorted_images" / "I01_01_2.BMP").write_bytes(b"")  # on disk with another case than labelled
    table = load_dataset("tid2013", tmp_path)
    assert len(table) == 3_000 and table["content"].nunique() == 25
    assert table["score"].min() == pytest.approx(0.24, abs=0.01)
    assert table["score"].max() == pytest.approx(7.21, abs=0.01)
    assert table.loc[table["name"] == "i01_01_2.bmp", "path"].item().endswith("distorted_images/I01_01_2.BMP")
