"""Every dataset loader on a tiny fixture in its official layout: counts, score direction, quirks and splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from iqa_fixtures import (
    make_agiqa3k,
    make_csiq,
    make_flive,
    make_koniq,
    make_live,
    make_livec,
    make_pipal,
    make_spaq,
    make_tid2013,
)
from PIL import Image

from qmamba.data import DATASETS, DatasetConfig, DatasetError, IQADataModule, load_dataset
from qmamba.data.catalog import official_split
from qmamba.data.checks import check_images
from qmamba.data.splits import make_splits

PAPER_DATASETS = ("koniq10k", "livec", "kadid10k", "spaq", "flive", "tid2013", "live", "csiq")


def content_disjoint(table: pd.DataFrame, splits: dict[str, np.ndarray]) -> bool:
    groups = [set(table.loc[splits[s], "content"]) for s in ("train", "val", "test")]
    return not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_registry_covers_the_paper_datasets_and_more():
    assert set(PAPER_DATASETS) | {"pipal", "agiqa3k", "tid2008"} <= set(DATASETS)
    assert [n for n, i in DATASETS.items() if i.lower_better] == ["live", "csiq"]


def test_livec_drops_the_seven_training_images_by_name(tmp_path):
    names = make_livec(tmp_path, n=12)
    table = load_dataset("livec", tmp_path)
    assert len(table) == 12 and not table["name"].str.startswith("t").any()
    assert table["name"].tolist() == names[7:]
    assert table["score"].tolist() == [40.0 + 3 * i for i in range(7, 19)]  # MOS stay with their images
    assert table["content"].isna().all() and all(Path(p).is_file() for p in table["path"])
    splits = make_splits(table, "random", seed=1, test_fraction=0.25)
    assert len(splits["test"]) == 3 and len(splits["train"]) == 9


def test_spaq_reads_the_xlsx_and_resizes_once_after_exif_rotation(tmp_path):
    make_spaq(tmp_path, n=6, size=(160, 120))
    table = load_dataset("spaq", tmp_path)
    assert len(table) == 6 and table["score"].tolist() == [20.0, 30.0, 40.0, 50.0, 60.0, 70.0]
    checks = check_images(table["path"], table["name"], short_side=60, cache_dir=tmp_path / "cache")
    assert all(c.problem is None for c in checks)
    assert checks[0].size == (60, 80)  # 160x120 with EXIF "rotate 90": displayed portrait, shorter side 60
    assert checks[1].size == (80, 60)
    cached = Path(checks[1].path)
    assert cached.parent == tmp_path / "cache" and cached.suffix == ".png"
    stamp = cached.stat().st_mtime_ns
    again = check_images(table["path"], table["name"], short_side=60, cache_dir=tmp_path / "cache")
    assert again == checks and cached.stat().st_mtime_ns == stamp  # reused, not rewritten


def test_spaq_datamodule_trains_on_the_cached_copies(tmp_path):
    make_spaq(tmp_path / "spaq", n=6, size=(160, 120))
    dm = IQADataModule([DatasetConfig("spaq", str(tmp_path / "spaq"), short_side=64)], batch_size=2, crop_size=32,
                       eval_crops=1, val_fraction=0.0, num_workers=0)
    dm.setup("fit")
    train = dm.split("train")[0]
    assert all("qmamba_short64" in p for p in train.paths)
    assert min(Image.open(train.paths[0]).size) == 64


def test_flive_official_split_ships_with_qmamba(tmp_path):
    split = official_split("flive")
    assert split.value_counts().to_dict() == {"val": 7_727, "test": 1_827}
    val, test = split[split == "val"].index[:2].tolist(), split[split == "test"].index[:2].tolist()
    make_flive(tmp_path, val + test + ["blur_dataset/never_in_val_or_test.jpg"])
    table = load_dataset("flive", tmp_path)
    assert table["split"].tolist() == ["val", "val", "test", "test", "train"]
    assert table["path"].iloc[0] == str(tmp_path.resolve() / val[0])
    assert [len(v) for v in make_splits(table, "official", 0).values()] == [1, 2, 2]


def test_koniq_falls_back_to_the_shipped_official_split(tmp_path):
    make_koniq(tmp_path, n=5)
    (tmp_path / "koniq10k_distributions_sets.csv").unlink()
    shipped = official_split("koniq10k")
    assert shipped.value_counts().to_dict() == {"train": 7_058, "test": 2_015, "val": 1_000}
    scores = pd.read_csv(tmp_path / "koniq10k_scores_and_distributions.csv")
    scores["image_name"] = shipped.index[:5]
    scores.to_csv(tmp_path / "koniq10k_scores_and_distributions.csv", index=False)
    table = load_dataset("koniq10k", tmp_path)
    assert table["split"].tolist() == shipped.iloc[:5].tolist()


def test_tid2013_mixed_case_names_and_reference_split(tmp_path):
    make_tid2013(tmp_path, refs=5)
    table = load_dataset("tid2013", tmp_path)
    assert len(table) == 15 and table["content"].nunique() == 5
    assert all(Path(p).is_file() for p in table["path"])  # labels and files disagree on case; resolved
    splits = make_splits(table, "content", seed=0, test_fraction=0.2)
    assert len(splits["test"]) == 3 and content_disjoint(table, splits)


@pytest.mark.parametrize("labels, offset", [("realigned", 1.5), ("original", 0.0)])
def test_live_keeps_distorted_images_with_their_dmos(tmp_path, labels, offset):
    names = make_live(tmp_path, refs=5, per_folder=3)
    table = load_dataset("live", tmp_path, labels=labels)
    assert table["name"].tolist() == names and len(table) == 15
    assert all(Path(p).is_file() for p in table["path"])
    assert table["score"].tolist() == [20.0 + 15 * k + offset for _ in range(5) for k in range(3)]
    assert DATASETS["live"].lower_better and table["content"].nunique() == 5
    splits = make_splits(table, "content", seed=3, test_fraction=0.2)
    assert content_disjoint(table, splits)


def test_csiq_xlsx_and_label_txt_agree(tmp_path):
    make_csiq(tmp_path)
    txt = load_dataset("csiq", tmp_path, labels="txt")
    xlsx = load_dataset("csiq", tmp_path, labels="xlsx")
    pd.testing.assert_frame_equal(txt, xlsx)
    assert len(txt) == 24 and txt["content"].nunique() == 4 and all(Path(p).is_file() for p in txt["path"])
    (tmp_path / "csiq_label.txt").unlink()
    pd.testing.assert_frame_equal(load_dataset("csiq", tmp_path), xlsx)  # auto: the official xlsx alone


def test_pipal_and_agiqa3k(tmp_path):
    make_pipal(tmp_path / "pipal", refs=4, per_ref=3)
    pipal = load_dataset("pipal", tmp_path / "pipal")
    assert len(pipal) == 12 and pipal["content"].nunique() == 4 and pipal["score"].between(900, 1850).all()
    make_agiqa3k(tmp_path / "agiqa", prompts=4)
    agiqa = load_dataset("agiqa3k", tmp_path / "agiqa")
    assert len(agiqa) == 8 and agiqa["content"].nunique() == 4
    assert load_dataset("agiqa3k", tmp_path / "agiqa", score="mos_align")["score"].eq(2.0).all()
    for table in (pipal, agiqa):
        assert all(Path(p).is_file() for p in table["path"])


def test_corrupt_and_missing_images_are_named_together_before_training(tmp_path):
    make_livec(tmp_path, n=8)
    (tmp_path / "Images" / "101.bmp").unlink()
    (tmp_path / "Images" / "102.JPG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dm = IQADataModule([DatasetConfig("livec", str(tmp_path))], crop_size=32, num_workers=0)
    with pytest.raises(DatasetError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "livec: 2 of 8 images cannot be used" in message
    assert "1 missing" in message and "101.bmp" in message
    assert "1 unreadable" in message and "102.JPG" in message


def test_truncated_image_caught_by_full_check_only(tmp_path):
    make_livec(tmp_path, n=4)
    path = tmp_path / "Images" / "100.JPG"
    path.write_bytes(path.read_bytes()[:-300])
    table = load_dataset("livec", tmp_path)
    assert [c.problem for c in check_images(table["path"], table["name"], mode="header")] == [None] * 4
    assert [c.problem for c in check_images(table["path"], table["name"], mode="full")][0] == "unreadable"


def test_small_images_error_or_drop(tmp_path):
    make_livec(tmp_path, n=6)
    Image.new("RGB", (20, 30)).save(tmp_path / "Images" / "103.bmp")
    config = DatasetConfig("livec", str(tmp_path))
    with pytest.raises(DatasetError, match=r"1 too small: .*103\.bmp \(20x30 < 32x32 crop\)"):
        IQADataModule([config], crop_size=32, num_workers=0).setup("fit")
    dm = IQADataModule([config], crop_size=32, num_workers=0, small_images="drop", test_fraction=0.4,
                       val_fraction=0.0)
    dm.setup("fit")
    used = [p for split in ("train", "test") for p in dm.split(split)[0].paths]
    assert len(used) == 5 and not any(p.endswith("103.bmp") for p in used)
