"""Scoring with a trained checkpoint: `qmamba score` and `qmamba.load`, bad files reported, outputs as predicted."""

from __future__ import annotations

import argparse
import csv
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import qmamba
from qmamba.cli import main
from qmamba.errors import QMambaError
from qmamba.files.checkpoint import CheckpointError
from qmamba.inference.preprocessing import IMAGENET_MEAN


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
    with pytest.raises(QMambaError, match="does not exist"):
        qmamba.load(root / "missing.ckpt")


@pytest.mark.slow
def test_onnx_export_from_a_fresh_process_matches_pytorch(trained, tmp_path):
    """A fresh process has no cached scan-order tables: export must not build them while tracing."""
    import onnx

    from qmamba.inference.export import verify_onnx

    _, run = trained
    ckpt = run / "checkpoints" / "best.ckpt"
    result = subprocess.run([sys.executable, "-m", "qmamba", "export", "--ckpt_path", str(ckpt), "--output",
                             str(tmp_path / "q.onnx")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max relative difference" in result.stdout
    scorer = qmamba.load(ckpt, device="cpu")
    assert verify_onnx(scorer, tmp_path / "q.onnx", batches=(1, 4, 7)) < 1e-4
    meta = {p.key: json.loads(p.value) for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert meta["crop_size"] == 32 and meta["score_range"]["low"] == 1.0 and len(meta["mean"]) == 3


@pytest.mark.slow
def test_scoring_and_export_import_no_training_stack():
    """Using a trained model needs torch, numpy, PIL and qmamba's models: not Lightning, albumentations or pandas."""
    code = ("import sys, qmamba.inference, qmamba.inference.scoring, qmamba.inference.export, qmamba.commands.score, "
            "qmamba.commands.serve, qmamba.commands.export, qmamba.inference.quality_maps, "
            "qmamba.commands.publish, qmamba.inference.model_sources, qmamba.files.model_folder; "
            "qmamba.commands.serve.create_app; "
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


def test_score_output_path_is_checked_before_any_image(trained, folder, tmp_path, capsys):
    _, run = trained
    ckpt = str(run / "checkpoints" / "best.ckpt")
    (tmp_path / "a_file").write_text("x")
    for output, reason in [(tmp_path, "is a folder"), (tmp_path / "a_file" / "scores.csv", "cannot write")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["score", "--ckpt_path", ckpt, str(folder), "-o", str(output)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and reason in err.splitlines()[-1] and "Traceback" not in err
        assert "scored" not in err  # refused before the model was even loaded
    for option in ("--crops", "--batch-size"):
        with pytest.raises(SystemExit) as exit_info:
            main(["score", "--ckpt_path", ckpt, str(folder), option, "0"])
        assert exit_info.value.code == 2 and f"{option} must be >= 1, got 0" in capsys.readouterr().err


def test_stdout_csv_is_quoted_and_symlinks_are_followed_once(trained, tmp_path, capsys):
    root, run = trained
    source = next((root / "kadid" / "images").glob("I01_01_01.png"))
    photos = tmp_path / "photos"
    (photos / "real").mkdir(parents=True)
    (photos / "real" / "a,b.png").write_bytes(source.read_bytes())
    (photos / "linked").symlink_to(photos / "real")  # the same folder twice
    (photos / "real" / "loop").symlink_to(photos)  # a loop back up
    (photos / "dangling.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(SystemExit) as exit_info:  # the bad links are reported, so the exit code says so
        main(["score", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), str(photos)])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["path", "score", "flag"] and len(rows) == 3  # a,b.png through real/ and through linked/
    assert sorted(Path(r[0]).name for r in rows[1:]) == ["a,b.png", "a,b.png"]
    assert "dangling.png: broken symbolic link" in err and "symbolic link loop" in err


def test_out_of_range_scores_are_flagged_or_clipped(trained, tmp_path, capsys):
    """A KADID model reports on KADID's 1-5 scale; a prediction outside it is flagged, never silently kept."""
    root, run = trained
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["qmamba"]["scales"][0].update(low=1.0, high=1.0001)  # every prediction now falls outside
    torch.save(checkpoint, tmp_path / "narrow.ckpt")
    image = str(next((root / "kadid" / "images").glob("I01_01_03.png")))
    main(["score", "--ckpt_path", str(tmp_path / "narrow.ckpt"), image, "-o", str(tmp_path / "s.json")])
    entry = json.loads((tmp_path / "s.json").read_text())["scores"][0]
    assert entry["flag"] in ("above range", "below range") and not 1.0 <= entry["score"] <= 1.0001
    main(["score", "--ckpt_path", str(tmp_path / "narrow.ckpt"), image, "--clip", "-o", str(tmp_path / "s.csv")])
    row = pd.read_csv(tmp_path / "s.csv").iloc[0]
    assert 1.0 <= row["score"] <= 1.0001 and row["flag"].startswith("clipped")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_a_signal_finishes_the_batch_and_keeps_every_score(trained, tmp_path, signum, forked_qmamba):
    root, run = trained
    images = tmp_path / "many"
    images.mkdir()
    source = next((root / "kadid" / "images").glob("I01_01_01.png")).read_bytes()
    for i in range(400):
        (images / f"{i:03d}.png").write_bytes(source)
    output = tmp_path / "scores.csv"
    process = forked_qmamba("score").popen(["score", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
                                            str(images), "-o", str(output), "--batch-size", "2", "--device", "cpu"],
                                           stderr=subprocess.PIPE)
    partial = tmp_path / "scores.csv.partial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not partial.exists() or partial.read_text().count("\n") < 5):
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert not output.exists()  # an unfinished run never takes the final name
    table = pd.read_csv(partial)
    written = int(err.split("images; ")[1].split(" scores written")[0])
    assert 4 <= written == len(table) < 400 and table["score"].notna().all()
    assert table["path"].tolist() == sorted(str(p) for p in images.iterdir())[: len(table)]


@pytest.mark.parametrize("damage, message", [
    ("empty", "is empty (0 bytes)"), ("random bytes", "is not a PyTorch checkpoint"),
    ("truncated", "is damaged or truncated"), ("plain state dict", "is not a checkpoint written by qmamba training"),
    ("NaN weights", "NaN or infinite weights in 2 tensors (backbone.patch_embed.0.weight, head.regressor.1.weight)"),
])
def test_bad_checkpoints_are_one_line(trained, tmp_path, capsys, damage, message):
    root, run = trained
    good = (run / "checkpoints" / "best.ckpt").read_bytes()
    bad = tmp_path / "bad.ckpt"
    if damage == "plain state dict":
        torch.save(torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"], bad)
    elif damage == "NaN weights":
        checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
        checkpoint["state_dict"]["model.backbone.patch_embed.0.weight"][0, 0, 0, 0] = float("nan")
        checkpoint["state_dict"]["model.head.regressor.1.weight"].fill_(float("inf"))
        torch.save(checkpoint, bad)
        with pytest.raises(CheckpointError, match="NaN or infinite weights"):  # the Python API too
            qmamba.load(bad)
    else:
        contents = {"empty": b"", "random bytes": bytes(range(7, 250)), "truncated": good[: len(good) // 2]}
        bad.write_bytes(contents[damage])
    image = str(next((root / "kadid" / "images").glob("I01_01_01.png")))
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--ckpt_path", str(bad), image])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and message in err[0] and err[0].startswith("qmamba: error:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_score_on_cuda_without_a_gpu_is_one_line(trained, capsys):
    root, run = trained
    image = str(next((root / "kadid" / "images").glob("I01_01_01.png")))
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), image, "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == ["qmamba: error: device cuda: no CUDA GPU is visible here; use the "
                                                 "CPU (device cpu)"]


def test_paths_from_a_list_file_and_stdin_score_the_rest_and_name_the_bad_ones(trained, folder, tmp_path,
                                                                                 monkeypatch, capsys):
    _, run = trained
    good = sorted(str(p) for p in folder.glob("I0*.png"))
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join([good[0], str(folder / "broken.jpg"), "", str(tmp_path / "gone.png")]) + "\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{good[1]}\n".encode())))
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), "--list", str(listing), "-", "-o",
              str(tmp_path / "s.jsonl"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err  # something was skipped
    entries = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert sorted(e["path"] for e in entries if "score" in e) == good
    assert {Path(e["path"]).name: e["error"] for e in entries if "error" in e}.keys() == {"broken.jpg", "gone.png"}
    assert "skipped" in err and "gone.png: no such file or folder" in err


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_killed_scoring_run_resumes_to_the_uninterrupted_output(trained, tmp_path, suffix, forked_qmamba):
    """SIGKILL mid-run, then the same command again: every image exactly once, with the uninterrupted scores (the
    four runs forked from a process that has imported what `qmamba score` imports: tests/forked.py)."""
    root, run = trained
    qmamba = forked_qmamba("score")
    images = tmp_path / "many"
    images.mkdir()
    sources = sorted((root / "kadid" / "images").glob("I0*_01_0*.png"))
    for i in range(240):
        (images / f"{i:03d}.png").write_bytes(sources[i % len(sources)].read_bytes())

    def command(output: Path) -> list[str]:
        return ["score", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), str(images), "-o", str(output),
                "--batch-size", "2", "--device", "cpu"]

    def rows(output: Path) -> dict[str, float]:
        if suffix == ".csv":
            table = pd.read_csv(output)
            assert table["path"].is_unique
            return dict(zip(table["path"], table["score"], strict=True))
        entries = [json.loads(line) for line in output.read_text().splitlines()]
        assert len({e["path"] for e in entries}) == len(entries)
        return {e["path"]: round(e["score"], 6) for e in entries}

    whole = tmp_path / f"whole{suffix}"
    assert qmamba.run(command(whole), timeout=600).returncode == 0
    output = tmp_path / f"killed{suffix}"
    partial = output.with_name(output.name + ".partial")
    process = qmamba.popen(command(output), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not partial.exists() or partial.read_text().count("\n") < 40):
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=60)
    assert not output.exists() and 0 < partial.read_text().count("\n") < 240
    resumed = qmamba.run(command(output), timeout=600)
    assert resumed.returncode == 0 and "images already scored" in resumed.stderr, resumed.stderr
    assert not partial.exists()
    expected, got = rows(whole), rows(output)
    assert got.keys() == expected.keys() and len(got) == 240
    assert all(got[k] == pytest.approx(expected[k], rel=1e-5) for k in expected)
    again = qmamba.run(command(output), timeout=600)  # finished: nothing to do
    assert again.returncode == 0 and "240 images already scored, 0 to go" in again.stderr
    assert rows(output) == got


def test_the_python_api_refuses_pickled_objects_with_qmambas_error(trained, tmp_path):
    """A checkpoint with pickled objects (which could run code) through qmamba.load and load_tuned: qmamba's
    CheckpointError with the opt-in named, not pickle's UnpicklingError."""
    from qmamba.training.prompt_tuning import load_tuned

    evil = tmp_path / "evil.ckpt"
    checkpoint = torch.load(trained[1] / "checkpoints" / "best.ckpt", weights_only=True)
    torch.save({**checkpoint, "extra": argparse.Namespace(a=1)}, evil)
    for call in (lambda: qmamba.load(evil), lambda: load_tuned(torch.nn.Linear(1, 1), evil)):
        with pytest.raises(CheckpointError, match="contains pickled Python objects.*trusted=True"):
            call()
