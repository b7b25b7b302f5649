"""Your own ratings: a table dataset gives the official loaders' splits and metrics, reads pyiqa's files as pyiqa
does, reports every bad row at once before anything is written, and trains models that score on the table's scale."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from iqa_fixtures import make_kadid
from PIL import Image

from qmamba.cli import main
from qmamba.data import DatasetConfig, DatasetError, IQADataModule
from qmamba.data.tables import TableSpec
from qmamba.files.plain_pickle import PlainPickleError, read_plain_pickle
from qmamba.training import QMambaIQA

TINY = (Path(__file__).parent / "conf" / "tiny.yaml").read_text()
REPO = Path(__file__).parents[1]


def tiny_config(path: Path, dataset: str, **replace: str) -> Path:
    """The tiny test config with its one dataset replaced by ``dataset`` (a YAML flow mapping)."""
    text = TINY.replace("{name: kadid10k, root: KADID_ROOT, label: tiny_kadid}", dataset)
    for old, new in replace.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path


def kadid_table(root: Path, **columns: object) -> Path:
    """The KADID-format fixture at ``root`` written as a table of its own: file, mos, ref (+ ``columns``)."""
    labels = pd.read_csv(root / "dmos.csv")
    table = pd.DataFrame({"file": "images/" + labels["dist_img"], "mos": labels["dmos"],
                          "ref": labels["ref_img"].str[:-4], **columns})
    table.to_csv(root / "ratings.csv", index=False)
    return root / "ratings.csv"


def same_data(official: IQADataModule, table: IQADataModule) -> None:
    for split in ("train", "val", "test"):
        ours, theirs = table.split(split)[0], official.split(split)[0]
        assert list(map(str, ours.paths)) == list(map(str, theirs.paths)), split
        np.testing.assert_array_equal(ours.targets, theirs.targets)


def test_the_demo_sets_as_tables_give_the_official_loaders_splits_and_test_metrics(tmp_path):
    from qmamba.data.demo import build_kadid_style, build_koniq_style

    kadid = build_kadid_style(tmp_path / "kadid", sources=("astronaut",), dead_leaves_count=2)
    pd.DataFrame({"image": "kadid/images/" + kadid["dist_img"], "dmos": kadid["dmos"], "reference": kadid["ref_img"]}
                 ).to_parquet(tmp_path / "kadid.parquet")
    koniq = build_koniq_style(tmp_path / "koniq", sources=("astronaut", "coffee", "rocket"), crops_per_source=2,
                              dead_leaves_count=4, variants=2)
    sets = {"training": "train", "validation": "val", "test": "test"}
    rows = [{"path": str(tmp_path / "koniq" / "1024x768" / n), "score": s, "split": sets[v]}
            for n, s, v in zip(koniq["image_name"], koniq["MOS_zscore"].round(4), koniq["set"], strict=True)]
    (tmp_path / "koniq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    common = {"crop_size": 32, "eval_crops": 2, "num_workers": 0, "batch_size": 8}
    pairs = [
        (DatasetConfig("kadid10k", str(tmp_path / "kadid")),
         DatasetConfig("mine", score_range=(1, 5), table=TableSpec(
             str(tmp_path / "kadid.parquet"), lower_better=False, path="image", score="dmos", group="reference"))),
        (DatasetConfig("koniq10k", str(tmp_path / "koniq")),
         DatasetConfig("ours", score_range=(0, 100), table=TableSpec(str(tmp_path / "koniq.jsonl"),
                                                                     lower_better=False, split="split"))),
    ]
    torch.manual_seed(0)
    model = QMambaIQA(backbone="qmamba_test")
    for official_config, table_config in pairs:
        official, table = IQADataModule([official_config], **common), IQADataModule([table_config], **common)
        same_data(official, table)
        metrics = []
        for datamodule in (official, table):
            trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=tmp_path)
            metrics.append(trainer.test(model, datamodule=datamodule, verbose=False)[0])
        assert list(metrics[0].values()) == pytest.approx(list(metrics[1].values()), abs=1e-6)
        assert all(np.isfinite(v) for v in metrics[0].values()) and len(metrics[0]) >= 2


def test_a_tables_columns_under_their_default_names_are_read_and_said(tmp_path, caplog):
    """data/README.md names std, split and group as default columns, but they were read only when the config named
    them: a KADID-style table's group column was ignored, and its references fell on both sides of a random split."""
    labels = make_kadid(tmp_path, refs=6, levels=5)
    ratings = pd.DataFrame({"path": "images/" + labels["dist_img"], "score": labels["dmos"],
                            "group": labels["ref_img"].str[:-4], "std": labels["var"]})

    def prepared(table: pd.DataFrame, **columns: str) -> tuple[IQADataModule, str]:
        table.to_csv(tmp_path / "ratings.csv", index=False)
        spec = TableSpec(str(tmp_path / "ratings.csv"), lower_better=False, **columns)
        datamodule = IQADataModule([DatasetConfig("mine", score_range=(1, 5), table=spec)], crop_size=32,
                                   eval_crops=2, num_workers=0, batch_size=8, check_images="off")
        return datamodule, datamodule.summary()[0]

    def groups(datamodule: IQADataModule, split: str) -> set[str]:
        return {Path(path).name[:3] for path in datamodule.split(split)[0].paths}

    with caplog.at_level(logging.INFO, logger="qmamba"):
        datamodule, summary = prepared(ratings)
    assert "mine: path from 'path', score from 'score', std from 'std', group from 'group' (no split column)" in \
        caplog.text
    assert summary.startswith("mine: 30 images, scores 1-5 (higher is better); content split: train ")
    assert not groups(datamodule, "train") & groups(datamodule, "test") and len(groups(datamodule, "test")) >= 1

    ratings["split"] = np.where(ratings["group"].isin(["I01", "I02"]), "test", "train")
    datamodule, summary = prepared(ratings)
    assert "; official split: " in summary and groups(datamodule, "test") == {"I01", "I02"}
    _, summary = prepared(ratings.drop(columns="split"), group="")  # "" keeps a column of the default name out
    assert "; random split: " in summary


def pyiqa_splits(count: int, splits: int = 3) -> dict[int, dict[str, list[int]]]:
    """A split file as pyiqa's preparation scripts build one: seeded shuffles of the row indices, 6:2:2 (train / val /
    test), keyed 1..N."""
    random.seed(123)
    result = {}
    for index in range(1, splits + 1):
        rows = list(range(count))
        random.shuffle(rows)
        train, val = int(0.6 * count), int(0.8 * count)
        result[index] = {"train": rows[:train], "val": rows[train:val], "test": rows[val:]}
    return result


def test_pyiqa_meta_info_with_its_split_file_or_split_columns_selects_pyiqas_rows(tmp_path):
    make_kadid(tmp_path / "kadid", refs=5, levels=4)
    images = tmp_path / "kadid" / "images"
    names = sorted(p.name for p in images.glob("*.png"))
    meta = pd.DataFrame({"img_name": names, "mos": np.linspace(1.2, 4.8, len(names)), "std": 0.5})
    splits = pyiqa_splits(len(names))
    for index, split in splits.items():  # pyiqa's newer meta files carry the same splits as columns
        column = [""] * len(names)
        for phase, rows in split.items():
            for row in rows:
                column[row] = phase
        meta[f"ratio622_seed123_split_{index:02d}"] = column
    meta.to_csv(tmp_path / "meta_info.csv", index=False)
    with open(tmp_path / "split.pkl", "wb") as f:
        pickle.dump(splits, f)

    def selected(**spec: object) -> dict[str, set[str]]:
        config = DatasetConfig("pyiqa", str(images), score_range=(1, 5), table=TableSpec(
            str(tmp_path / "meta_info.csv"), lower_better=False, format="pyiqa", **spec))
        datamodule = IQADataModule([config], crop_size=32, num_workers=0, check_images="off")
        return {s: {Path(p).name for p in datamodule.split(s)[0].paths} for s in ("train", "val", "test")}

    for index in (1, 3):
        expected = {phase: {names[i] for i in rows} for phase, rows in splits[index].items()}
        assert selected(split_file=str(tmp_path / "split.pkl"), split_index=index) == expected
        assert selected(split_index=index, split_ratio="622") == expected
        assert selected(split_index=f"ratio622_seed123_split_{index:02d}") == expected
    assert selected(split_file=str(tmp_path / "split.pkl")) == {  # pyiqa's default split_index is 1
        phase: {names[i] for i in rows} for phase, rows in splits[1].items()}
    # repeated rows: ten million once took 42 s and 1.2 GB without a word
    for train, message in [([0] * 10_000, "lists 10,000 rows for train but the table has 25: it repeats rows"),
                           ([0, 1, 1, 2], "lists 1 rows of train more than once")]:
        with open(tmp_path / "split.pkl", "wb") as f:
            pickle.dump({1: {**splits[1], "train": train}}, f)
        with pytest.raises(DatasetError, match=message):
            selected(split_file=str(tmp_path / "split.pkl"))


class _Runs:
    """Unpickled, this would create the file it names: the proof that nothing in a split file runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("payload, refused", [
    ("runs", "names pathlib"), (np.arange(3), "names numpy"), ({1: {"train": {1, 2}}}, "holds a set"),
    ({1: {"train": [1.5]}}, "holds a float"), ([None], "holds a NoneType"),
])
def test_a_split_file_holding_anything_but_plain_data_is_refused_and_nothing_in_it_runs(tmp_path, payload, refused):
    planted = tmp_path / "planted"
    if isinstance(payload, str):
        payload = {1: {"train": [0], "test": _Runs(str(planted))}}
    (tmp_path / "split.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(PlainPickleError, match=refused):
        read_plain_pickle(tmp_path / "split.pkl")
    assert not planted.exists()
    cycle: list[object] = [1, "a"]
    cycle.append(cycle)
    (tmp_path / "cycle.pkl").write_bytes(pickle.dumps({1: cycle}))
    assert read_plain_pickle(tmp_path / "cycle.pkl")[1][:2] == [1, "a"]


def bad_kadid_table(root: Path) -> Path:
    """The fixture's table with one of every row problem (and a clean remainder)."""
    table = pd.read_csv(kadid_table(root)).astype(object)
    Image.new("RGB", (20, 20)).save(root / "images" / "small.png")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    table.loc[0, "mos"] = "n/a"
    table.loc[1, "mos"] = 9.5
    table.loc[2, "file"] = "../outside.png"
    table.loc[3, "file"] = "images/nothere.png"
    table.loc[4, "file"] = "images/small.png"
    table.loc[5, "file"] = "images/broken.png"
    # links: out of the root to an image (it would be trained on) and to a system file (it would be opened); one to
    # an image elsewhere in the root, which is read there
    Image.new("RGB", (64, 64)).save(root.parent / "elsewhere.png")
    (root / "images" / "link-out.png").symlink_to(root.parent / "elsewhere.png")
    (root / "images" / "passwd.png").symlink_to("/etc/passwd")
    (root / "extra").mkdir()
    (root / "extra" / "inside.png").write_bytes((root / "images" / "I02_01_01.png").read_bytes())
    (root / "images" / "link-in.png").symlink_to("../extra/inside.png")
    table.loc[8, "file"] = "images/link-out.png"
    table.loc[9, "file"] = "images/passwd.png"
    table.loc[10, "file"] = "images/link-in.png"
    table.loc[11, "file"] = "https://reader:hunter2@127.0.0.1:9/private.png"  # its password is never shown
    table["split"] = "train"
    table.loc[table["ref"] == "I02", "split"] = "test"
    table.loc[6, "split"] = "holdout"
    table.loc[table.index[-1], "split"] = "test"  # I06 (else train) now sits on both sides
    table = pd.concat([table, table.iloc[[7]].assign(mos=1.0)])
    table.to_csv(root / "bad.csv", index=False)
    return root / "bad.csv"


@pytest.mark.slow
def test_every_bad_row_is_in_one_report_before_training_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    make_kadid(tmp_path / "kadid", refs=6, levels=5)
    bad_kadid_table(tmp_path / "kadid")
    monkeypatch.chdir(tmp_path)
    table = "{file: kadid/bad.csv, path: file, score: mos, group: ref, split: split, lower_better: false}"
    config = tiny_config(tmp_path / "bad.yaml", f"{{name: mine, root: kadid, table: {table}, score_range: [1, 5]}}")
    for command in (["data", "check", "--config", str(config)], ["fit", "--config", str(config)]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 1
        report = capsys.readouterr().err
        assert "Traceback" not in report and report.startswith("qmamba: error: mine: 11 of 31 images cannot be "
                                                                "used;")
        for expected in ("scores that are not numbers: row 1: images/I01_01_01.png ('n/a')",
                         "scores outside the declared 1-5 scale: row 2:",
                         "4 paths outside the root: row 3: ../outside.png; row 9: images/link-out.png; row 10: "
                         "images/passwd.png; row 12: https://reader:***@127.0.0.1:9/private.png ->",
                         "missing: row 4:", "too small: row 5:", "unreadable: row 6:",
                         "split values other than train / val / test: row 7:",
                         "images listed twice with different scores:", "row 8 (", "row 31 (1)",
                         "groups in two splits: I06 in train and test"):
            assert expected in report, expected
        assert "link-in" not in report and "hunter2" not in report
        assert not (tmp_path / "runs").exists()

    ratings = "file: kadid/ratings.csv, path: file, score: mos"
    for dataset, message in [
        (f"{{name: mine, table: {{{ratings}, lower_better: false}}}}",
         "declare the scores' scale with score_range: [low, high] (qmamba never guesses it; the table's scores span "
         "1.25 to 4.35)"),
        (f"{{name: mine, table: {{{ratings}}}, score_range: [1, 5]}}", "declare the scores' direction"),
        ("{name: mine, table: {file: kadid/ratings.csv, path: image, lower_better: false}, score_range: [1, 5]}",
         "has no path column 'image', score column 'score'"),
        ("{name: mine, table: {file: kadid/nothere.csv, lower_better: false}, score_range: [1, 5]}",
         "the table kadid/nothere.csv does not exist"),
        (f"{{name: mine, table: {{{ratings}, lower_better: false, split_file: kadid/ratings.csv}}, "
         "score_range: [1, 5]}",
         "cannot read mine: the split file kadid/ratings.csv: not a readable pickle"),
    ]:
        config = tiny_config(tmp_path / "bad.yaml", dataset)
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(config)])
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error
        assert not (tmp_path / "runs").exists()

    good = f"{{name: mine, table: {{{ratings}, group: ref, lower_better: false}}, score_range: [1, 5]}}"
    config = tiny_config(tmp_path / "good.yaml", good)
    main(["data", "check", "--config", str(config)])
    assert capsys.readouterr().out.splitlines()[-1] == \
        "mine: 30 images, scores 1-5 (higher is better); content split: train 15, val 5, test 10"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # make runs three fits in fresh processes
def test_universal_training_over_a_registered_set_and_a_table_then_make_transfer_to_a_table(tmp_path, monkeypatch):
    make_kadid(tmp_path / "kadid", refs=4, levels=5)
    make_kadid(tmp_path / "mine", refs=4, levels=5)
    kadid_table(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    table = ("{name: mine, table: {file: mine/ratings.csv, path: file, score: mos, group: ref, lower_better: false}, "
             "score_range: [1, 5]}")
    tiny_config(tmp_path / "universal.yaml", f"{{name: kadid10k, root: kadid, label: tiny_kadid}}\n      - {table}")
    main(["fit", "--config", "universal.yaml"])
    run = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in (run / "splits").iterdir()) == ["mine.csv", "tiny_kadid.csv"]
    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "best"])
    results = json.loads((run / "test_results.json").read_text())["results"]
    assert sorted(results) == ["mine", "tiny_kadid"] and all(np.isfinite(r["srcc"]) for r in results.values())

    (tmp_path / "recipe.yaml").write_text(TINY.replace("save_dir: runs", "save_dir: runs"))
    (tmp_path / "source.yaml").write_text("data:\n  init_args:\n    datasets:\n"
                                          f"      - {{name: kadid10k, root: {tmp_path / 'kadid'}}}\n")
    (tmp_path / "my_ratings.yaml").write_text(f"data:\n  init_args:\n    datasets:\n      - {table}\n")
    # a make of its own, also under `make test` (whose MAKEFLAGS and MAKELEVEL would change what make prints)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(["make", "-f", str(REPO / "Makefile"), "-o", "install", "transfer", "SRC=source.yaml",
                             "DST=my_ratings.yaml", "RECIPE=recipe.yaml", f"PYTHON={sys.executable}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    transfer = pd.read_csv(tmp_path / "runs" / "transfer" / "source_to_my_ratings" / "results.csv")
    assert transfer["method"].tolist() == ["none", "styleprompt"] and (transfer["target"] == "my_ratings").all()
    assert (tmp_path / "runs" / "transfer" / "source_source" / "checkpoints" / "best.ckpt").is_file()
    benchmark = subprocess.run(["make", "--no-print-directory", "-n", "-f", str(REPO / "Makefile"), "benchmark",
                                "DATASET=my_ratings.yaml", "RECIPE=recipe.yaml", "SPLITS=3",
                                f"PYTHON={sys.executable}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=60)
    command = benchmark.stdout.replace("\\\n", " ").split()  # make -n shows the recipe's continued line as written
    assert command == [sys.executable, "-m", "qmamba", "benchmark", "--config", "recipe.yaml", "--config",
                       "my_ratings.yaml", "--splits", "3", "--out", "runs/benchmark/my_ratings"]


def test_a_model_trained_on_a_lower_is_better_0_to_10_table_scores_on_that_scale(tmp_path, monkeypatch, capsys):
    import qmamba

    make_kadid(tmp_path / "mine", refs=4, levels=5)
    labels = pd.read_csv(kadid_table(tmp_path / "mine"))
    labels["badness"] = (5 - labels["mos"]) * 2.5  # 0 (best) to 10 (worst)
    labels.to_csv(tmp_path / "mine" / "ratings.csv", index=False)
    monkeypatch.chdir(tmp_path)
    tiny_config(tmp_path / "mine.yaml", "{name: mine, table: {file: mine/ratings.csv, path: file, score: badness, "
                                        "group: ref, lower_better: true}, score_range: [0, 10]}")
    main(["fit", "--config", "mine.yaml"])
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "best.ckpt"
    scorer = qmamba.load(checkpoint, device="cpu")
    assert scorer.info["datasets"] == ["mine"]
    assert scorer.info["score_range"] == {"low": 0.0, "high": 10.0, "lower_better": True}
    image = tmp_path / "mine" / "images" / "I01_01_01.png"
    score = scorer.score(image)
    with torch.inference_mode():
        unit = float(scorer.model(scorer.crops(np.asarray(Image.open(image).convert("RGB")))).mean())
    assert score == pytest.approx(10.0 * (1.0 - unit), rel=1e-5)  # lower is better: the unit score flipped

    main(["score", "--ckpt_path", str(checkpoint), "--device", "cpu", str(image), "-o", "scores.json"])
    written = json.loads((tmp_path / "scores.json").read_text())
    assert written["score_range"] == [0.0, 10.0] and written["direction"] == "lower is better"
    assert written["scale"] == "0 to 10, lower is better"
    assert written["scores"][0]["score"] == pytest.approx(score, rel=1e-6)
    assert "(mine scale: 0 to 10, lower is better; fp32)" in capsys.readouterr().err  # what a .csv's numbers are


def test_a_table_in_a_bucket_names_images_by_uri_relative_path_and_shard_member(tmp_path, bucket):
    import webdataset

    client, _ = bucket
    make_kadid(tmp_path / "kadid", refs=3, levels=4)
    images = sorted((tmp_path / "kadid" / "images").glob("*.png"))
    with webdataset.TarWriter(str(tmp_path / "shard.tar")) as sink:
        for image in images[:4]:
            sink.write({"__key__": image.stem, "png": image.read_bytes()})
    client.upload_file(str(tmp_path / "shard.tar"), "iqa", "ratings/shards/000000.tar")
    for image in images[4:8]:
        client.upload_file(str(image), "iqa", f"ratings/images/{image.name}")
    for image in images[8:]:
        client.upload_file(str(image), "iqa", f"elsewhere/{image.name}")
    names = ([f"shards/000000.tar#{p.stem}.png" for p in images[:4]] + [f"images/{p.name}" for p in images[4:8]]
             + [f"s3://iqa/elsewhere/{p.name}" for p in images[8:]])
    table = pd.DataFrame({"path": names + ["images/missing.png"], "score": np.linspace(1, 5, len(names) + 1)})
    buffer = io.BytesIO()
    table.to_parquet(buffer)
    client.put_object(Bucket="iqa", Key="ratings/table.parquet", Body=buffer.getvalue())

    config = DatasetConfig("remote", score_range=(1, 5), table=TableSpec("s3://iqa/ratings/table.parquet",
                                                                         lower_better=False))
    with pytest.raises(DatasetError, match=r"1 of 16 images cannot be used:\n  1 unreadable: row 16: "
                                           r"s3://iqa/ratings/images/missing.png \(s3://iqa/ratings/images/missing.png "
                                           "was not found"):
        IQADataModule([config], crop_size=32, num_workers=0).prepare()
    table.iloc[:-1].to_parquet(buffer := io.BytesIO())
    client.put_object(Bucket="iqa", Key="ratings/table.parquet", Body=buffer.getvalue())
    datamodule = IQADataModule([config], crop_size=32, num_workers=0, test_fraction=0.25, val_fraction=0.0)
    datamodule.prepare()
    read = {str(p): item["image"] for split in ("train", "test") for d in datamodule.split(split)
            for p, item in zip(d.paths, d, strict=True)}
    assert len(read) == 15 and "s3://iqa/ratings/shards/000000.tar#" + images[0].name in read
    assert {"s3://iqa/ratings/images/" + images[4].name, "s3://iqa/elsewhere/" + images[8].name} <= set(read)
