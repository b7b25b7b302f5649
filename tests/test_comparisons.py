"""Learning quality from comparisons: the comparisons table (pooling, the split by image, every bad input in one
report), the preference losses and the held-out pair metrics against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from iqa_fixtures import make_kadid
from scipy.stats import norm

from qmamba.cli import main
from qmamba.data import ComparisonSpec, DatasetConfig, IQADataModule
from qmamba.data.comparisons import load_comparisons
from qmamba.errors import UsageError
from qmamba.inference.scale import ScoreScale
from qmamba.training.losses import IQALoss, fidelity, in_batch_pairs, preference_probability
from qmamba.training.metrics import pair_metrics

TINY = (Path(__file__).parent / "conf" / "tiny.yaml").read_text()


def test_pair_accuracy_and_log_likelihood_equal_a_count_by_hand():
    scores = np.array([0.9, 0.1, 0.5, 0.5])
    first, second = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 0])
    judged = np.array([1.0, 0.25, 0.5, 0.0])  # image 0 beat 1 every time; 1 beat 2 once in 4; ...
    weight = np.array([2.0, 4.0, 1.0, 3.0])
    predicted = np.array([0.8, 0.4, 0.5, 0.3])
    # judgements agreeing with the scores: 0 > 1 (2 of 2); 1 < 2 (3 of 4 said 2 was better); 2 = 3 a tie (half of
    # 1); 3 < 0 (3 of 3 said 0 was better)
    accuracy = (2 + 3 + 0.5 + 3) / 10
    likelihood = (2 * math.log(0.8) + (1 * math.log(0.4) + 3 * math.log(0.6)) + (0.5 * math.log(0.5) * 2)
                  + 3 * math.log(0.7)) / 10
    metrics = pair_metrics(scores, first, second, judged, weight, predicted)
    assert metrics["pair_accuracy"] == pytest.approx(accuracy)
    assert metrics["log_likelihood"] == pytest.approx(likelihood)
    assert metrics["pairs"] == 4
    assert math.isnan(pair_metrics(scores, first[:0], second[:0], judged[:0], weight[:0], predicted[:0])
                      ["pair_accuracy"])


def test_the_preference_links_and_the_fidelity_loss():
    difference = torch.tensor([-1.0, 0.0, 0.3, 2.0])
    thurstone = preference_probability(difference, 0.5)
    np.testing.assert_allclose(thurstone.numpy(), norm.cdf(difference.numpy() / 0.5), rtol=1e-6)
    logistic = preference_probability(difference, 0.5, "bradley_terry")
    np.testing.assert_allclose(logistic.numpy(), 1 / (1 + np.exp(-math.pi / math.sqrt(3) * difference.numpy() / 0.5)),
                               rtol=1e-6)
    assert fidelity(thurstone, thurstone).item() == pytest.approx(0.0, abs=1e-3)
    p, g = torch.tensor([0.9, 0.2]), torch.tensor([0.6, 0.5])
    by_hand = 1 - np.sqrt(p.numpy() * g.numpy()) - np.sqrt((1 - p.numpy()) * (1 - g.numpy()))
    assert fidelity(p, g).item() == pytest.approx(by_hand.mean(), abs=1e-6)
    assert fidelity(p, g, torch.tensor([3.0, 1.0])).item() == pytest.approx((3 * by_hand[0] + by_hand[1]) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="link must be"):
        preference_probability(difference, 1.0, "probit")  # type: ignore[arg-type]


def test_in_batch_pairs_stay_within_a_dataset_and_use_the_ratings_deviation_when_known():
    pred = torch.tensor([0.2, 0.4, 0.9, 0.1])
    target = torch.tensor([0.3, 0.3, 0.8, 0.5])
    groups = torch.tensor([0, 0, 1, 1])
    nan = torch.full((4,), float("nan"))
    predicted, judged = in_batch_pairs(pred, target, groups, nan, sigma=0.1, link="thurstone")
    # pairs (0, 1) and (2, 3) only; without deviations the judgement is the order of the MOS, a tie 0.5
    np.testing.assert_allclose(judged.numpy(), [0.5, 1.0])
    np.testing.assert_allclose(predicted.numpy(), norm.cdf(np.array([-0.2, 0.8]) / (math.sqrt(2) * 0.1)), rtol=1e-5)
    std = torch.tensor([0.1, 0.2, 0.1, 0.3])
    predicted, judged = in_batch_pairs(pred, target, groups, std, sigma=0.1, link="thurstone")
    spread = np.sqrt([0.1**2 + 0.2**2, 0.1**2 + 0.3**2])
    np.testing.assert_allclose(judged.numpy(), norm.cdf(np.array([0.0, 0.3]) / spread), rtol=1e-5)
    np.testing.assert_allclose(predicted.numpy(), norm.cdf(np.array([-0.2, 0.8]) / spread), rtol=1e-5)
    # UNIQUE's loss is least where the scores are the MOS: consistent with a regression loss added to it
    exact, judged = in_batch_pairs(target, target, groups, std, sigma=0.1, link="thurstone")
    assert fidelity(exact, judged).item() == pytest.approx(0.0, abs=1e-3)
    alone = IQALoss("fidelity")
    assert alone(target, target, groups, std).item() < alone(pred, target, groups, std).item()
    with pytest.raises(ValueError, match="pair_sigma must be > 0"):
        IQALoss(pair_sigma=0.0)


def write_pairs(root: Path, rows: list[dict[str, object]], name: str = "pairs.csv") -> Path:
    pd.DataFrame(rows).to_csv(root / name, index=False)
    return root / name


def test_a_comparisons_table_pools_repeated_judgements_and_splits_by_image(tmp_path):
    make_kadid(tmp_path / "kadid", refs=6, levels=5)
    images = sorted(f"images/{p.name}" for p in (tmp_path / "kadid" / "images").glob("I*_01_*.png"))
    rng = np.random.default_rng(0)
    rows = [{"a": images[i], "b": images[(i + 1) % 30], "winner": "first"} for i in range(30)]  # a ring: connected
    rows += [{"a": images[int(i)], "b": images[int(j)], "winner": rng.choice(["first", "second", "tie"])}
             for i, j in rng.integers(0, 30, (200, 2)) if i != j]
    rows += [{"a": images[1], "b": images[0], "winner": images[0]}, {"a": images[0], "b": images[1], "winner": "b"}]
    spec = ComparisonSpec(str(write_pairs(tmp_path / "kadid", rows)), first="a", second="b", winner="winner")
    comparisons, report = load_comparisons(spec, "mine", None)
    assert not report
    assert len(comparisons.images) == 30 and comparisons.images["row"].iloc[0] == 1
    names = comparisons.images["name"].tolist()
    pair = comparisons.pairs[(comparisons.pairs["first"] == names.index(images[0]))
                             & (comparisons.pairs["second"] == names.index(images[1]))]
    # images[0] vs images[1]: won in row 1 (first), won again (named by path, in reversed order), lost once ("b")
    assert pair["weight"].item() == 3 + sum(1 for r in rows[30:-2] if {r["a"], r["b"]} == set(images[:2]))
    assert len(comparisons.pairs) == len({frozenset((r["a"], r["b"])) for r in rows})

    datamodule = IQADataModule([DatasetConfig("mine", comparisons=spec)], crop_size=32, eval_crops=2, num_workers=0,
                               batch_size=4, test_fraction=0.3, val_fraction=0.2)
    sides = {s: {str(p) for p in datamodule.split(s)[0].paths} for s in ("val", "test")}
    train = datamodule.split("train")[0]
    trained_on = {str(train.images.paths[i]) for i in np.concatenate([train.first, train.second])}
    assert not (trained_on & sides["test"]) and not (trained_on & sides["val"]) and not (sides["val"] & sides["test"])
    for split in ("val", "test"):
        held_out = datamodule.held_out_pairs(split, 0)
        assert len(held_out) and held_out[["first", "second"]].to_numpy().max() < len(sides[split])
    item = train[0]
    assert item["image"].shape == (2, 3, 32, 32) and set(item) == {"image", "judged", "weight", "index", "dataset"}
    assert datamodule.summary()[0].startswith("mine: 30 images in comparisons; random split, images train ")


def test_every_bad_comparison_is_one_report_before_training_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    make_kadid(tmp_path / "kadid", refs=4, levels=5)
    monkeypatch.chdir(tmp_path)
    image = [f"images/I{r:02d}_01_{level:02d}.png" for r in range(1, 5) for level in range(1, 6)]
    rows = [{"first": image[i], "second": image[i + 1], "p": 0.7, "split": "train"} for i in range(9)]
    rows += [{"first": image[i], "second": image[i + 1], "p": 0.6, "split": "test"} for i in range(10, 14)]
    rows += [{"first": image[16], "second": image[17], "p": 0.5, "split": "test"}]  # a piece of its own
    rows += [
        {"first": image[0], "second": image[0], "p": 0.5, "split": "train"},  # one image twice
        {"first": image[1], "second": image[2], "p": 1.5, "split": "train"},  # p outside [0, 1]
        {"first": image[2], "second": "images/nothere.png", "p": 0.5, "split": "train"},  # a missing image
        {"first": image[3], "second": image[10], "p": 0.5, "split": "test"},  # image[3] is also a training image
    ]
    rows = [{**row, "count": 3} for row in rows]
    rows += [{"first": image[4], "second": image[5], "p": 0.7, "split": "train", "count": count}
             for count in (float("inf"), 1e30)]  # each would outweigh every other row
    write_pairs(tmp_path / "kadid", rows)
    dataset = "{name: mine, root: kadid, comparisons: {file: kadid/pairs.csv, split: split}}"
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.replace("{name: kadid10k, root: KADID_ROOT, label: tiny_kadid}", dataset))
    for command in (["data", "check", "--config", str(config)], ["fit", "--config", str(config)]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 1
        report = capsys.readouterr().err
        assert "Traceback" not in report and report.startswith("qmamba: error: mine: "), report
        for expected in (
            f"comparisons of an image with itself: row 15: {image[0]} vs {image[0]}",
            f"p values outside [0, 1]: row 16: {image[1]} vs {image[2]} ('1.5')",
            f"2 counts that are not numbers in (0, 1e+09]: row 19: {image[4]} vs {image[5]} ('inf'); row 20: ",
            f"images in comparisons of two splits: {image[3]}: train (row 3), test (row 18)",
            "missing: row 17: ", "nothere.png",
            "comparison graphs in pieces: the 10 images of the train split form 2 components that no comparison "
            "links (images per component: 6, 4); the 7 images of the test split form 2 components",
        ):
            assert expected in report, (expected, report)
        assert not (tmp_path / "runs").exists()

    for dataset, message in [
        ("{name: mine, comparisons: {file: kadid/pairs.csv, p: p, winner: p}}", "give either p"),
        ("{name: mine, comparisons: {file: kadid/pairs.csv, first: left}}", "has no first column 'left'"),
        ("{name: mine, comparisons: {file: kadid/pairs.csv}, score_range: [1, 5]}", "comparisons have no score scale"),
        ("{name: mine, comparisons: {file: kadid/pairs.csv, first_group: split}}",
         "gives first_group ('split') but no second_group"),
    ]:
        config.write_text(TINY.replace("{name: kadid10k, root: KADID_ROOT, label: tiny_kadid}", dataset))
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(config)])
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error
        assert not (tmp_path / "runs").exists()


def test_a_fitted_scale_has_no_bounds_and_refuses_clipping():
    scale = ScoreScale.fitted_scale(0.4, 0.2, "a Thurstone scale")
    np.testing.assert_allclose(scale.to_native(np.array([0.4, 0.6, 0.0])), [0.0, 1.0, -2.0])
    assert scale.out_of_range(100.0) == "" and scale.report(100.0, clip=False) == (100.0, "")
    assert ScoreScale.from_dict(scale.as_dict()).fitted == "a Thurstone scale"
    with pytest.raises(UsageError, match="fitted scale .a Thurstone scale.: score without clipping"):
        scale.check_clip("mine")
    ScoreScale(1, 5, False).check_clip("kadid")


RECIPE = """seed_everything: 0
trainer:
  accelerator: cpu
  max_epochs: 20
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: runs, name: NAME, version: ""}
model:
  class_path: qmamba.training.QMambaIQA
  init_args:
    backbone: qmamba_test
    MODEL
    optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 2.0e-3, weight_decay: 0.05}}
    scheduler: {class_path: qmamba.training.WarmupCosine, init_args: {warmup_epochs: 1}}
data:
  class_path: qmamba.data.IQADataModule
  init_args:
    datasets: DATASETS
    crop_size: 32
    eval_crops: 2
    num_workers: 0
    cache_images: true
    DATA
"""


def recipe(path: Path, name: str, datasets: str, model: str = "plcc_weight: 1.0",
           data: str = "{batch_size: 16, train_repeats: 4}") -> Path:
    """The test's recipe (20 epochs of the test model, as many steps of 16 images per run) as a config file."""
    options = "\n    ".join(f"{k}: {v}" for k, v in (item.split(": ") for item in data.strip("{}").split(", ")))
    path.write_text(RECIPE.replace("NAME", name).replace("DATASETS", datasets).replace("MODEL", model)
                    .replace("DATA", options))
    return path


def scored_set(root: Path, size: tuple[int, int]) -> pd.DataFrame:
    """A KADID-format set (24 references x 5 noise levels) as a table of MOS with demo_kadid's split, and its
    comparisons as the demo sets' (pairs within each split, Thurstone's p with the votes' noise)."""
    from qmamba.data.demo import DEMO_SPLIT, simulated_comparisons
    from qmamba.data.splits import make_splits

    labels = make_kadid(root, refs=24, levels=5, size=size)
    rows = make_splits(pd.DataFrame({"content": labels["ref_img"]}), "content", DEMO_SPLIT["seed"],
                       DEMO_SPLIT["test_fraction"], DEMO_SPLIT["val_fraction"])
    split = pd.Series("", index=labels.index)
    for name, members in rows.items():
        split.iloc[members] = name
    table = pd.DataFrame({"path": "images/" + labels["dist_img"], "mos": labels["dmos"], "split": split})
    table.to_csv(root / "mos.csv", index=False)
    simulated_comparisons(table["path"], table["mos"], split).to_csv(root / "pairs.csv", index=False)
    return table


def results_of(run: Path) -> dict[str, dict[str, float]]:
    return json.loads((run / "test_results.json").read_text())["results"]


@pytest.mark.slow  # five fits of 340 steps
def test_comparisons_train_as_far_as_scores_and_the_model_scores_on_a_fitted_scale(tmp_path, monkeypatch, capsys):
    import qmamba

    monkeypatch.chdir(tmp_path)
    table = scored_set(tmp_path / "a", (48, 40))
    mos = "[{name: a, table: {file: a/mos.csv, score: mos, split: split, lower_better: false}, score_range: [1, 5]}]"
    pairs = "[{name: a_pairs, comparisons: {file: a/pairs.csv, split: split}}]"
    training_images = int((table["split"] == "train").sum())
    recipe(tmp_path / "mos.yaml", "mos", mos)
    recipe(tmp_path / "fidelity.yaml", "fidelity", mos, model="loss: fidelity")
    # the same budget: 340 steps of 16 images (8 pairs), as many images per epoch as the score runs
    recipe(tmp_path / "pairs.yaml", "pairs", pairs,
           data=f"{{batch_size: 8, epoch_samples: {training_images * 4 // 2}}}")
    for name in ("mos", "fidelity", "pairs"):
        main(["fit", "--config", f"{name}.yaml"])
        main(["test", "--config", f"runs/{name}/config.yaml", "--ckpt_path", "best"])
    pairs_best = tmp_path / "runs" / "pairs" / "checkpoints" / "best.ckpt"
    main(["test", "--config", "mos.yaml", "--ckpt_path", str(pairs_best), "--trainer.logger.init_args.name",
          "pairs_on_mos"])
    srcc = {name: results_of(tmp_path / "runs" / name)["a"]["srcc"] for name in ("mos", "fidelity", "pairs_on_mos")}
    assert srcc["mos"] > 0.8, srcc  # the recipe learns the set
    assert srcc["pairs_on_mos"] >= 0.9 * srcc["mos"], srcc  # comparisons alone get 90 % of the way
    assert abs(srcc["fidelity"] - srcc["mos"]) <= 0.02, srcc  # the in-batch fidelity loss does as well as SmoothL1
    held_out = results_of(tmp_path / "runs" / "pairs")["a_pairs"]
    assert held_out["pair_accuracy"] > 0.8 and held_out["log_likelihood"] > math.log(0.5), held_out

    # its scores: a fitted Thurstone scale, centred on the validation images, said in every output
    scorer = qmamba.load(pairs_best, device="cpu")
    fitted = scorer.info["score_range"]["fitted"]
    assert fitted.startswith("a Thurstone scale fitted to the comparisons of a_pairs: 0 is the mean of its validation "
                             "images, 1 their standard deviation; P(A looks better than B) = Phi("), fitted
    validation = table.loc[table["split"] == "val", "path"].map(lambda p: str(tmp_path / "a" / p)).tolist()
    scores = np.array(scorer.score(validation))
    assert abs(scores.mean()) < 1e-3 and scores.std() == pytest.approx(1.0, abs=1e-3)
    capsys.readouterr()
    main(["score", "--ckpt_path", str(pairs_best), "--device", "cpu", validation[0], "-o", "scores.json"])
    written = json.loads((tmp_path / "scores.json").read_text())
    assert written["model"]["score_range"]["fitted"] == fitted
    # no bounds where there are none (the output once gave the map's two reference points as a range)
    assert written["score_range"] is None and written["scale"] == fitted
    assert f"(a_pairs scale: {fitted}; fp32)" in capsys.readouterr().err
    assert written["scores"][0]["score"] == pytest.approx(scores[0], rel=1e-5)
    with pytest.raises(SystemExit):
        main(["score", "--ckpt_path", str(pairs_best), "--device", "cpu", validation[0], "--clip"])
    assert "clipping needs a scale with bounds" in capsys.readouterr().err

    # universal training over two sets on different scales (1-5 MOS, 0-100 DMOS) with the fidelity loss alone and no
    # alignment, and a run mixing scores and comparisons
    second = scored_set(tmp_path / "b", (56, 44))
    second.assign(dmos=100 - 25 * (second["mos"] - 1)).to_csv(tmp_path / "b" / "dmos.csv", index=False)
    dmos = "{name: b, table: {file: b/dmos.csv, score: dmos, split: split, lower_better: true}, score_range: [0, 100]}"
    recipe(tmp_path / "universal.yaml", "universal", f"[{mos[1:-1]}, {dmos}]", model="loss: fidelity")
    main(["fit", "--config", "universal.yaml", "--trainer.max_epochs", "10"])
    main(["test", "--config", "runs/universal/config.yaml", "--ckpt_path", "best"])
    universal = results_of(tmp_path / "runs" / "universal")
    assert universal["a"]["srcc"] > 0.8 and universal["b"]["srcc"] > 0.8, universal
    mixed = f"[{mos[1:-1]}, {{name: b_pairs, comparisons: {{file: b/pairs.csv, split: split}}}}]"
    recipe(tmp_path / "mixed.yaml", "mixed", mixed, data="{batch_size: 8, train_repeats: 1}")
    main(["fit", "--config", "mixed.yaml", "--trainer.max_epochs", "2"])
    mixed_model = qmamba.load(tmp_path / "runs/mixed/checkpoints/best.ckpt", device="cpu", dataset="b_pairs")
    assert mixed_model.info["datasets"] == ["a", "b_pairs"] and mixed_model.scale.fitted
