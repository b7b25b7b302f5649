"""Data layer: official-format loaders, split protocols, image reading, transforms, score scales, DataModule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from iqa_fixtures import make_kadid, make_koniq, pattern
from PIL import Image

from qmamba.data import (
    DatasetConfig,
    DatasetError,
    IQADataModule,
    dataset_info,
    load_dataset,
)
from qmamba.data.splits import make_splits
from qmamba.data.transforms import TrainCrop
from qmamba.inference.images import ImageReadError, read_rgb
from qmamba.inference.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalCrops,
    ImageTooSmallError,
    Preprocessing,
    crop_grid,
)
from qmamba.inference.scale import ScoreScale


def test_kadid_loader_reads_the_official_layout(tmp_path):
    make_kadid(tmp_path, refs=4)
    table = load_dataset("kadid10k", tmp_path)
    assert len(table) == 4 * 5
    assert table["content"].nunique() == 4
    assert table["path"].map(lambda p: p.endswith(".png")).all()
    info = dataset_info("kadid10k")
    assert info.score_range == (1.0, 5.0) and not info.lower_better and info.protocol == "content"


def test_koniq_loader_reads_scores_and_official_split(tmp_path):
    make_koniq(tmp_path, n=20)
    table = load_dataset("koniq10k", tmp_path)
    assert len(table) == 20 and table["content"].isna().all()
    assert table["score"].between(0, 100).all()
    assert table["split"].value_counts().to_dict() == {"train": 12, "test": 4, "val": 4}
    mos = load_dataset("koniq10k", tmp_path, score="MOS")
    assert mos["score"].between(1, 5).all()


def test_missing_folder_and_label_file_name_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*data/README.md"):
        load_dataset("kadid10k", tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"expected .*dmos\.csv"):
        load_dataset("kadid10k", tmp_path)


def test_bad_label_rows_are_rejected(tmp_path):
    table = make_kadid(tmp_path, refs=2).astype({"dmos": object})
    table.loc[3, "dmos"] = "n/a"
    table.to_csv(tmp_path / "dmos.csv", index=False)
    with pytest.raises(DatasetError, match="no valid score"):
        load_dataset("kadid10k", tmp_path)
    table.loc[3, "dmos"] = 3.0
    pd.concat([table, table.iloc[:1]]).to_csv(tmp_path / "dmos.csv", index=False)
    with pytest.raises(DatasetError, match="duplicate"):
        load_dataset("kadid10k", tmp_path)


@pytest.mark.parametrize("protocol", ["content", "random"])
def test_splits_are_disjoint_deterministic_and_seeded(tmp_path, protocol):
    make_kadid(tmp_path, refs=10)
    table = load_dataset("kadid10k", tmp_path)
    splits = make_splits(table, protocol, seed=3, test_fraction=0.2, val_fraction=0.1)
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(table)))
    if protocol == "content":
        groups = [set(table.loc[idx, "content"]) for idx in splits.values()]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
        assert [len(g) for g in groups] == [7, 1, 2]
    again = make_splits(table, protocol, seed=3, test_fraction=0.2, val_fraction=0.1)
    assert all(np.array_equal(splits[s], again[s]) for s in splits)
    other = make_splits(table, protocol, seed=4, test_fraction=0.2, val_fraction=0.1)
    assert not np.array_equal(splits["test"], other["test"])


def test_read_rgb_converts_modes_and_reports_corrupt_files(tmp_path):
    rgb = pattern(0)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "sixteen.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ("gray.png", "rgba.png", "sixteen.png", "cmyk.jpg"):
        image = read_rgb(tmp_path / name)
        assert image.shape == (*rgb.shape[:2], 3) and image.dtype == np.uint8, name
    assert np.array_equal(read_rgb(tmp_path / "sixteen.png")[..., 0], rgb[..., 0])  # 16-bit rescaled, not stretched
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        read_rgb(tmp_path / "broken.jpg")
    with pytest.raises(ImageReadError, match="not found"):
        read_rgb(tmp_path / "absent.png")


def test_float_tiffs_from_0_to_1_decode_exactly_and_other_ranges_are_refused(tmp_path):
    gray = pattern(0)[..., 0]
    Image.fromarray(gray.astype(np.float32) / 255.0).save(tmp_path / "unit.tif")  # mode F, values 0-1
    assert np.array_equal(read_rgb(tmp_path / "unit.tif"), np.repeat(gray[..., None], 3, -1))
    Image.fromarray(gray.astype(np.float32) * 4.0).save(tmp_path / "hdr.tif")
    with pytest.raises(ImageReadError, match=r"hdr.tif: a 32-bit float image must hold values in 0-1 \(this one "
                                             r"spans 0 to 1016\); save it as 8 or 16 bits"):
        read_rgb(tmp_path / "hdr.tif")


def test_eval_crops_are_deterministic_and_cover_the_image():
    image = pattern(1, size=(80, 60))
    crops = EvalCrops(Preprocessing(32, eval_crops=5))
    a, b = crops(image), crops(image)
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b)
    grid = crop_grid(60, 80, 32, 4)
    assert grid[0] == (0, 0) and grid[-1] == (28, 48)
    assert crop_grid(60, 80, 32, 1) == [(14, 24)]


def test_train_crops_are_random_native_resolution_and_seeded():
    image = pattern(2, size=(80, 60))
    first = TrainCrop(Preprocessing(32), seed=0)(image)
    transform = TrainCrop(Preprocessing(32), seed=0)
    crops = [transform(image) for _ in range(4)]
    assert crops[0].shape == (3, 32, 32)
    assert torch.equal(first, crops[0])  # same seed, same first crop
    assert not all(torch.equal(crops[0], c) for c in crops[1:])
    seeded = transform(image, seed=123)
    assert torch.equal(TrainCrop(Preprocessing(32), seed=99)(image, seed=123), seeded)  # the item's seed alone
    assert not all(torch.equal(transform(image, seed=s), seeded) for s in range(124, 130))
    with pytest.raises(ImageTooSmallError, match="smaller than the 96x96 crop"):
        TrainCrop(Preprocessing(96), seed=0)(image)
    with pytest.raises(ImageTooSmallError, match="smaller than the 96x96 crop"):
        EvalCrops(Preprocessing(96))(image)


def test_training_and_evaluation_preprocess_a_crop_identically():
    """A training crop and an evaluation crop of the same pixels are the same tensor (up to the flip), normalised
    with the ImageNet statistics on the [0, 1] scale."""
    image = pattern(3, size=(32, 32))  # one possible crop position, so only the flip is random
    preprocessing = Preprocessing(32, eval_crops=1)
    evaluated = EvalCrops(preprocessing)(image)[0]
    expected = (torch.from_numpy(image).float().permute(2, 0, 1) / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(evaluated, expected, rtol=1e-5, atol=1e-5)
    transform = TrainCrop(preprocessing, seed=0)
    trained = [transform(image) for _ in range(16)]
    flips = [torch.equal(t, evaluated.flip(-1)) for t in trained]
    assert all(torch.equal(t, evaluated) or flip for t, flip in zip(trained, flips, strict=True))
    assert 0 < sum(flips) < 16  # both branches were compared


def test_preprocessing_round_trips_through_a_checkpoint_dict():
    custom = Preprocessing(48, eval_crops=3, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    assert Preprocessing.from_dict(custom.as_dict()) == custom
    assert all(isinstance(v, (int, list)) for v in custom.as_dict().values())  # weights_only-safe
    image = np.full((48, 48, 3), 204, np.uint8)
    assert torch.allclose(EvalCrops(custom)(image), torch.full((3, 3, 48, 48), 2.0))  # (0.8 - 0.4) / 0.2
    with pytest.raises(ValueError, match="eval_crops must be >= 1"):
        Preprocessing(32, eval_crops=0)


def test_score_scale_round_trip_and_direction():
    dmos = ScoreScale(0.0, 100.0, lower_better=True)
    values = np.array([0.0, 25.0, 100.0])
    assert np.allclose(dmos.to_unit(values), [1.0, 0.75, 0.0])
    assert np.allclose(dmos.to_native(dmos.to_unit(values)), values)


def test_datamodule_builds_per_dataset_loaders(tmp_path):
    make_kadid(tmp_path / "kadid", refs=6)
    make_koniq(tmp_path / "koniq", n=20)
    dm = IQADataModule(
        [DatasetConfig("kadid10k", str(tmp_path / "kadid"), label="a"),
         DatasetConfig("koniq10k", str(tmp_path / "koniq"))],
        batch_size=4, crop_size=32, eval_crops=3, test_fraction=0.34, val_fraction=0.17, num_workers=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and ((batch["target"] >= 0) & (batch["target"] <= 1)).all()
    val = dm.val_dataloader()
    assert len(val) == 2 and next(iter(val[0]))["image"].shape[1:] == (3, 3, 32, 32)
    assert [len(d) for d in dm.split("test")] == [2 * 5, 4]  # koniq: official split from its split file
    with pytest.raises(ValueError, match="unique"):
        IQADataModule([DatasetConfig("kadid10k"), DatasetConfig("kadid10k")])


def test_missing_images_fail_before_training(tmp_path):
    make_kadid(tmp_path, refs=3)
    (tmp_path / "images" / "I02_01_03.png").unlink()
    dm = IQADataModule([DatasetConfig("kadid10k", str(tmp_path))], num_workers=0)
    with pytest.raises(DatasetError, match="I02_01_03.png"):
        dm.setup("fit")


def test_demo_builders_write_loadable_official_formats(tmp_path):
    from qmamba.data.demo import build_kadid_style, build_koniq_style, dead_leaves, simulated_mos

    kadid = build_kadid_style(tmp_path / "kadid", sources=("astronaut",), dead_leaves_count=1)
    table = load_dataset("kadid10k", tmp_path / "kadid")
    assert len(table) == len(kadid) == 2 * 7 * 5 and table["content"].nunique() == 2
    assert table["score"].between(1, 5).all()
    # content-dependent: the same distortion and level scores differently on the two references
    same_level = table[table["name"].str.endswith("_02_03.png")]["score"]
    assert same_level.nunique() == 2
    build_koniq_style(tmp_path / "koniq", sources=("astronaut", "coffee", "rocket", "chelsea", "brick"),
                      crops_per_source=2, dead_leaves_count=5, variants=2)
    koniq = load_dataset("koniq10k", tmp_path / "koniq")
    assert len(koniq) == 5 * 2 * 2 + 5 * 2 and set(koniq["split"]) == {"train", "val", "test"}
    # held-out content: all crops of a photograph share a split, and every split has photographs and scenes
    content = koniq["name"].str[:-4].astype(int).sub(10_000_000) // 1000
    assert (koniq.groupby(content)["split"].nunique() == 1).all()
    for split, contents in content.groupby(koniq["split"]):
        assert (contents < 5).any() and (contents >= 5).any(), split
    image = dead_leaves(seed=3)
    assert image.shape == (192, 256, 3) and image.std() > 10
    assert simulated_mos(image, image, severity=0.0) == pytest.approx(5.0)
