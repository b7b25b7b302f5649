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
from qmamba.data.catalog import official_split
from qmamba.data.splits import make_splits

LABELS = Path(os.environ.get("QMAMBA_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "iqa-labels"
pytestmark = pytest.mark.skipif(not LABELS.is_dir(), reason=f"real label tables not found at {LABELS}")


def test_koniq_official_split_from_the_real_split_file(tmp_path):
    sets = pd.read_csv(LABELS / "original" / "koniq10k_distributions_sets.csv")
    sets.to_csv(tmp_path / "koniq10k_distributions_sets.csv", index=False)
    # the scores file has the same images; its MOS_zscore equals the split file's MOS (as in KonIQ-10k's release)
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


def test_livec_real_table_drops_the_training_images(tmp_path):
    from iqa_fixtures import mat_cells
    from scipy.io import savemat

    meta = pd.read_csv(LABELS / "converted" / "meta_info_LIVEChallengeDataset.csv")
    (tmp_path / "Data").mkdir()
    savemat(tmp_path / "Data" / "AllImages_release.mat", {"AllImages_release": mat_cells(meta["img_name"].tolist())})
    savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": meta["mos"].to_numpy()[None]})
    table = load_dataset("livec", tmp_path)
    assert len(meta) == 1_169 and len(table) == 1_162
    assert table["score"].min() == pytest.approx(3.42, abs=0.01)
    assert table["score"].max() == pytest.approx(92.43, abs=0.01)
    assert table["name"].str.lower().str.rsplit(".", n=1).str[1].value_counts().to_dict() == {"jpg": 627, "bmp": 535}


def test_live_real_table_orgs_filter(tmp_path):
    from iqa_fixtures import LIVE_COUNTS, write_live_mats

    meta = pd.read_csv(LABELS / "converted" / "meta_info_LIVEIQADataset.csv")
    starts = dict(zip(LIVE_COUNTS, [0, 227, 460, 634, 808], strict=True))
    entries = {}
    for ref, dist, dmos in zip(meta["ref_name"], meta["dist_name"], meta["mos"], strict=True):
        folder, image = dist.split("/")
        entries[starts[folder] + int(image[3:-4]) - 1] = (ref, dmos)
    write_live_mats(tmp_path, entries, sorted(set(meta["ref_name"])))
    table = load_dataset("live", tmp_path, labels="original")
    assert len(table) == 779 and table["content"].nunique() == 29
    folders = table["name"].str.split("/").str[0].value_counts().to_dict()
    assert folders == {"jpeg": 175, "jp2k": 169, "wn": 145, "gblur": 145, "fastfading": 145}
    assert table["score"].between(17.8, 84.6).all()  # dmos.mat, lower is better
    assert sorted(table["name"]) == sorted(meta["dist_name"])


def test_spaq_real_table_through_the_official_xlsx(tmp_path):
    meta = pd.read_csv(LABELS / "converted" / "meta_info_SPAQDataset.csv")
    (tmp_path / "Annotations").mkdir()
    meta.iloc[:, :7].to_excel(tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx", index=False)
    table = load_dataset("spaq", tmp_path)
    assert len(table) == 11_125 and table["score"].between(2, 96).all()


def test_shipped_official_splits_equal_the_real_tables():
    koniq = pd.read_csv(LABELS / "original" / "koniq10k_distributions_sets.csv").set_index("image_name")["set"]
    shipped = official_split("koniq10k")
    assert shipped.to_dict() == koniq.map({"training": "train", "validation": "val", "test": "test"}).to_dict()
    flive = pd.read_csv(LABELS / "original" / "flive_official_split_val_test.csv").set_index("name")["split"]
    assert official_split("flive").to_dict() == flive.to_dict()
    test640 = set(pd.read_csv(LABELS / "original" / "flive_labels640.csv")["name_image"])
    assert len(test640) == 1_827 and test640 == set(flive[flive == "test"].index)


def test_flive_real_labels_image_csv(tmp_path):
    head = pd.read_csv(LABELS / "original" / "flive_labels_image.head200.csv")
    head.to_csv(tmp_path / "labels_image.csv", index=False)
    table = load_dataset("flive", tmp_path)
    assert len(table) == 200 and table["score"].between(0, 100).all()
    expected = head["name"].map(official_split("flive")).fillna("train")
    assert table["split"].tolist() == expected.tolist()
    # the full labels_image.csv has 39,810 rows: 30,256 train + the 9,554 shipped val/test names
    assert 39_810 - len(official_split("flive")) == 30_256


def test_pipal_real_table_as_train_label_files(tmp_path):
    meta = pd.read_csv(LABELS / "converted" / "meta_info_PIPALDataset.csv")
    (tmp_path / "Train_Label").mkdir()
    for ref, rows in meta.groupby("hq_name"):
        lines = [f"{n},{e}" for n, e in zip(rows["dist_name"], rows["elo_score"], strict=True)]
        (tmp_path / "Train_Label" / f"{Path(ref).stem}.txt").write_text("\n".join(lines) + "\n")
    table = load_dataset("pipal", tmp_path)
    assert len(table) == 23_200 and table["content"].nunique() == 200
    assert table["score"].between(916, 1837).all()


def test_agiqa3k_real_data_csv(tmp_path):
    (tmp_path / "data.csv").write_bytes((LABELS / "original" / "agiqa3k_data.csv").read_bytes())
    table = load_dataset("agiqa3k", tmp_path)
    assert len(table) == 2_982 and table["content"].nunique() == 300
    assert table["score"].between(0, 4.5).all()
    generators = table["name"].str.split("_").str[0].value_counts().to_dict()
    assert generators == {"sd1.5": 1_200, "midjourney": 592, "AttnGAN": 300, "glide": 300, "xl2.2": 300,
                          "DALLE2": 290}


def test_tid2008_real_table(tmp_path):
    meta = pd.read_csv(LABELS / "converted" / "meta_info_TID2008Dataset.csv")
    lines = [f"{mos} {name}" for mos, name in zip(meta["mos"], meta["dist_name"], strict=True)]
    (tmp_path / "mos_with_names.txt").write_text("\n".join(lines) + "\n")
    table = load_dataset("tid2008", tmp_path)
    assert len(table) == 1_700 and table["content"].nunique() == 25
