"""Scoring with a trained checkpoint: `qmamba score` and `qmamba.load`, bad files reported, outputs as predicted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from iqa_fixtures import make_kadid
from PIL import Image

import qmamba
from qmamba.cli import main
from qmamba.preprocessing import IMAGENET_MEAN

CONF = Path(__file__).parent / "conf" / "tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained one epoch through the CLI, and its run folder."""
    root = tmp_path_factory.mktemp("score")
    make_kadid(root / "kadid")
    config = root / "tiny.yaml"
    config.write_text(CONF.read_text().replace("KADID_ROOT", str(root / "kadid")).replace(
        "save_dir: runs", f"save_dir: {root / 'runs'}"))
    main(["fit", "--config", str(config)])
    return root, root / "runs" / "tiny"


@pytest.fixture
def folder(trained, tmp_path):
    """Two RGB PNGs, a grayscale and an RGBA image (one in a sub-folder), a corrupt JPEG and a text file."""
    root, _ = trained
    images = sorted((root / "kadid" / "images").glob("I0*_01_0*.png"))[:2]
    for image in images:
        (tmp_path / image.name).write_bytes(image.read_bytes())
    Image.open(images[0]).convert("L").save(tmp_path / "gray.png")
    (tmp_path / "sub").mkdir()
    Image.open(images[1]).convert("RGBA").save(tmp_path / "sub" / "rgba.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (tmp_path / "notes.txt").write_text("not an image, not listed")
    return tmp_path


def test_score_folder_reports_the_bad_file_and_exits_nonzero(trained, folder, capsys):
    _, run = trained
    ckpt = str(run / "checkpoints" / "best.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--ckpt_path", ckpt, str(folder), "--output", str(folder / "scores.csv")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err and "4 scored, 1 skipped" in err
    table = pd.read_csv(folder / "scores.csv")
    names = [Path(p).name for p in table["path"]]
    assert sorted(names) == sorted(["I01_01_01.png", "I01_01_02.png", "gray.png", "rgba.png"])
    assert np.isfinite(table["score"]).all()

    with pytest.raises(SystemExit):
        main(["score", "--ckpt_path", ckpt, str(folder), "-o", str(folder / "scores.json"), "--crops", "1"])
    payload = json.loads((folder / "scores.json").read_text())
    assert payload["direction"] == "higher is better" and payload["score_range"] == [1.0, 5.0]
    assert payload["model"]["backbone"] == "qmamba_test" and payload["model"]["crops"] == 1
    assert len(payload["scores"]) == 4 and [Path(e["path"]).name for e in payload["errors"]] == ["broken.jpg"]


def test_scores_equal_predict_outputs_for_the_same_crops(trained):
    root, run = trained
    main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", "best",
          "--trainer.callbacks+=qmamba.training.callbacks.PredictionWriter"])
    predicted = pd.read_csv(run / "predictions.csv")
    scorer = qmamba.load(run / "checkpoints" / "best.ckpt", device="cpu")
    scores = scorer.score(predicted["path"].tolist())
    np.testing.assert_allclose(scores, predicted["score"], rtol=1e-5)


def test_python_api_accepts_paths_pil_arrays_and_tensors(trained):
    root, run = trained
    scorer = qmamba.load(run / "checkpoints" / "best.ckpt", device="cpu", batch_size=2)
    path = root / "kadid" / "images" / "I02_01_03.png"
    array = np.asarray(Image.open(path).convert("RGB"))
    expected = scorer.score(str(path))
    assert isinstance(expected, float)
    as_tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
    batch = scorer.score([path, Image.open(path), array, as_tensor, array.astype(np.float32) / 255.0])
    np.testing.assert_allclose(batch, [expected] * 5, rtol=1e-5)
    with pytest.raises(ValueError, match="image 1"):
        scorer.score([path, np.zeros((8, 8, 3), np.uint8)])  # smaller than the crop: named, not padded
    with pytest.raises(qmamba.scoring.CheckpointError, match="does not exist"):
        qmamba.load(root / "missing.ckpt")


@pytest.mark.slow
def test_onnx_export_matches_pytorch(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from qmamba.export import verify_onnx

    _, run = trained
    ckpt = run / "checkpoints" / "best.ckpt"
    main(["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "q.onnx")])
    assert "max relative difference" in capsys.readouterr().out
    scorer = qmamba.load(ckpt, device="cpu")
    assert verify_onnx(scorer, tmp_path / "q.onnx", batches=(1, 4, 7)) < 1e-4
    meta = {p.key: json.loads(p.value) for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert meta["crop_size"] == 32 and meta["score_range"]["low"] == 1.0 and len(meta["mean"]) == 3


def test_scoring_and_export_import_no_training_stack():
    """Using a trained model needs torch, numpy, PIL and qmamba's models: not Lightning, albumentations or pandas."""
    code = ("import sys, qmamba.scoring, qmamba.export, qmamba.trained; "
            "bad = [m for m in ('lightning', 'albumentations', 'pandas') if m in sys.modules]; print(bad); "
            "sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scorer_normalises_with_the_statistics_the_checkpoint_records(trained, tmp_path):
    """The checkpoint's preprocessing, not a constant, decides how images are normalised before scoring."""
    _, run = trained
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    recorded = checkpoint["qmamba"]["preprocessing"]
    assert recorded["mean"] == list(IMAGENET_MEAN) and recorded["crop_size"] == 32
    checkpoint["qmamba"]["preprocessing"] = {**recorded, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    torch.save(checkpoint, tmp_path / "custom.ckpt")
    image = np.full((40, 40, 3), 255, np.uint8)
    default, custom = qmamba.load(run / "checkpoints" / "best.ckpt", device="cpu"), qmamba.load(
        tmp_path / "custom.ckpt", device="cpu")
    assert torch.allclose(custom.crops(image), torch.ones(2, 3, 32, 32))  # (1 - 0.5) / 0.5
    assert not torch.allclose(default.crops(image), custom.crops(image))
    with torch.no_grad():
        expected = custom.scale.to_native(custom.model(custom.crops(image)).mean()).item()
    assert custom.score(image) == pytest.approx(expected, rel=1e-5)
