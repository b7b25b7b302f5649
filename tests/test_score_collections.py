"""`qmamba score` on collections: decoding workers, several processes, Parquet, quality maps and huge images."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from PIL.JpegImagePlugin import JpegImageFile

import qmamba
from qmamba.cli import main
from qmamba.inference.images import read_rgb
from qmamba.inference.quality_maps import render


@pytest.fixture(scope="session")
def photos(trained, tmp_path_factory) -> Path:
    """24 fixture images of two sizes, one corrupt file and a JPEG, in one folder."""
    root, _ = trained
    folder = tmp_path_factory.mktemp("photos")
    sources = sorted((root / "kadid" / "images").glob("I0*_01_0*.png"))
    for i in range(24):
        image = Image.open(sources[i % len(sources)])
        if i % 3 == 0:
            image = image.resize((image.width * 2, image.height * 2))
        image.save(folder / f"{i:02d}.png")
    Image.open(sources[0]).save(folder / "photo.jpg", quality=90)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def _score(ckpt: Path, folder: Path, output: Path, *options: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--ckpt_path", str(ckpt), str(folder), "-o", str(output), "--device", "cpu", *options])
    return exit_info.value.code


def _rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.read_text().splitlines()]


@pytest.mark.slow
def test_workers_two_processes_and_one_process_give_identical_outputs(trained, photos, tmp_path):
    """Decoding in workers and sharding over 2 processes change nothing: same rows, same order, same scores;
    images of different sizes batch together and the corrupt file is reported in its place."""
    ckpt = trained[1] / "checkpoints" / "best.ckpt"
    outputs = {}
    for name, options in {"main": ["--workers", "0"], "workers": ["--workers", "2", "--batch-size", "5"],
                          "devices": ["--devices", "2", "--workers", "1"]}.items():
        outputs[name] = tmp_path / f"{name}.jsonl"
        assert _score(ckpt, photos, outputs[name], *options) == 1  # the corrupt file
    rows = _rows(outputs["main"])
    assert [Path(r["path"]).name for r in rows if "score" in r] == sorted(
        [f"{i:02d}.png" for i in range(24)] + ["photo.jpg"])
    assert [Path(r["path"]).name for r in rows if "error" in r] == ["corrupt.png"]
    for name in ("workers", "devices"):
        other = _rows(outputs[name])
        scored = [(r["path"], r["score"]) for r in other if "score" in r]
        assert [p for p, _ in scored] == [r["path"] for r in rows if "score" in r], name
        np.testing.assert_allclose([s for _, s in scored], [r["score"] for r in rows if "score" in r], rtol=1e-6)
    assert not list(tmp_path.glob("*.rank*"))  # parts merged and removed


@pytest.mark.slow
def test_two_nodes_score_their_shards_and_node_zero_merges(trained, photos, tmp_path, forked_qmamba):
    """--num_nodes 2 as two machines would run it (here two processes, gloo over localhost, forked warm:
    tests/forked.py): the same rows as one process, in input order, each image once."""
    ckpt = trained[1] / "checkpoints" / "best.ckpt"
    single = tmp_path / "single.jsonl"
    _score(ckpt, photos, single, "--workers", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    output = tmp_path / "nodes.jsonl"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    nodes = [forked_qmamba("score").popen(["score", "--ckpt_path", str(ckpt), str(photos), "-o", str(output),
                                           "--device", "cpu", "--workers", "0", "--num_nodes", "2", "--node_rank",
                                           str(rank)], env=env, stderr=subprocess.PIPE) for rank in (1, 0)]
    results = [(node.wait(timeout=300), node.stderr.read()) for node in nodes]
    assert results[0][0] == 0 and "node 1 of 2 done" in results[0][1], results[0][1]
    assert results[1][0] == 1 and "25 scored, 1 skipped" in results[1][1], results[1][1]  # the corrupt file
    expected = [(r["path"], r["score"]) for r in _rows(single) if "score" in r]
    got = [(r["path"], r["score"]) for r in _rows(output) if "score" in r]
    assert [p for p, _ in got] == [p for p, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=1e-6)
    assert not list(tmp_path.glob("*.rank*"))


@pytest.mark.slow
def test_a_sharded_run_killed_before_merging_is_merged_when_resumed(trained, photos, tmp_path):
    ckpt = trained[1] / "checkpoints" / "best.ckpt"
    output = tmp_path / "s.csv"
    first = str(photos / "00.png")
    partial = output.with_name("s.csv.partial")
    partial.write_text("path,score,flag\n")
    (tmp_path / "s.csv.partial.rank1").write_text(json.dumps({"path": first, "score": 4.25}) + "\n" + '{"path": "cut')
    assert _score(ckpt, photos, output, "--devices", "2") == 1
    lines = output.read_text().splitlines()
    assert lines[1] == f"{first},4.25," and len(lines) == 1 + 25  # the part's row kept, nothing scored twice
    assert not list(tmp_path.glob("*.rank*"))


def test_parquet_output_holds_every_image_and_resumes(trained, photos, tmp_path, capsys):
    import pyarrow.parquet as pq

    ckpt = trained[1] / "checkpoints" / "best.ckpt"
    output = tmp_path / "scores.parquet"
    assert _score(ckpt, photos, output) == 1
    table = pq.read_table(output)
    assert table.num_rows == 26 and table.column_names == ["path", "score", "flag", "error"]
    header = json.loads(table.schema.metadata[b"qmamba"])
    assert header["model"]["backbone"] == "qmamba_test" and header["direction"] == "higher is better"
    errors = [r for r in table.to_pylist() if r["error"] is not None]
    assert [Path(r["path"]).name for r in errors] == ["corrupt.png"] and errors[0]["score"] is None
    capsys.readouterr()
    assert _score(ckpt, photos, output) == 1  # finished: reopened, nothing scored again
    assert "25 images already scored, 1 to go" in capsys.readouterr().err
    rows = pq.read_table(output).to_pylist()  # the corrupt file is tried again; its error row replaces the first
    assert len(rows) == 26 and [Path(r["path"]).name for r in rows if r["error"]] == ["corrupt.png"]
    assert not output.with_name("scores.parquet.partial").exists()


class Sharpness(torch.nn.Module):
    """A stand-in quality model with a known answer: the unit score of a crop is its mean absolute horizontal
    gradient, so a blurred region scores lowest."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images[..., 1:] - images[..., :-1]).abs().mean(dim=(1, 2, 3)).clamp(0, 1)


def _textured(size: int = 160) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def test_quality_map_puts_the_worst_window_where_the_image_was_blurred(trained, tmp_path):
    scorer = qmamba.load(trained[1] / "checkpoints" / "best.ckpt", device="cpu")
    scorer.model = Sharpness()
    image = _textured()
    blurred = image.crop((96, 32, 160, 96)).filter(ImageFilter.GaussianBlur(3))
    image.paste(blurred, (96, 32))  # rows 32-96, columns 96-160
    qmap = scorer.quality_map(image)
    assert qmap.scores.shape == (len(qmap.tops), len(qmap.lefts)) and qmap.size == 32
    top, left = qmap.worst_window(scorer.scale)
    assert 32 <= top and top + 32 <= 96 and 96 <= left and left + 32 <= 160
    dense = qmap.dense()
    assert dense.shape == (160, 160) and dense[48:80, 112:144].mean() < dense[:, :64].mean()
    picture = np.asarray(render(np.asarray(image), qmap, scorer.scale)).astype(int)
    red_minus_green = picture[..., 0] - picture[..., 1]
    assert red_minus_green[48:80, 112:144].mean() > red_minus_green[:, :64].mean() + 20  # red where it is worst


def test_maps_option_writes_one_png_per_scored_image(trained, photos, tmp_path):
    ckpt = trained[1] / "checkpoints" / "best.ckpt"
    assert _score(ckpt, photos, tmp_path / "s.csv", "--maps", str(tmp_path / "maps"), "--workers", "0") == 1
    maps = sorted(tmp_path.joinpath("maps").rglob("*.png"))
    assert [m.name for m in maps] == sorted([f"{i:02d}.png.png" for i in range(24)] + ["photo.jpg.png"])
    expected = Path(*photos.parts[1:]) / "03.png.png"  # an absolute input path, without its root
    assert Image.open(tmp_path / "maps" / expected).size == Image.open(photos / "03.png").size


def test_huge_jpegs_decode_at_a_reduced_scale_only_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "panorama.jpg"
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((1500, 4000, 3)) * 255).astype(np.uint8)).save(path, quality=85)
    drafts = []
    original = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, mode, size: drafts.append(size) or original(self, mode,
                                                                                                         size))
    assert read_rgb(path).shape == (1500, 4000, 3) and drafts == []  # native by default
    small = read_rgb(path, max_side=900)
    assert small.shape == (338, 900, 3) and drafts == [(900, 337)]  # the decoder gave 1/4 scale, then Lanczos


def test_progress_in_a_log_prints_rate_and_time_left(capsys):
    from qmamba.commands.score import _Progress

    progress = _Progress(100, every=0.0)
    progress.update(40)
    progress.close()
    line = capsys.readouterr().err.strip()
    assert line.startswith("qmamba score: 40 of 100 images,") and "img/s" in line and "to go" in line


def test_parquet_without_pyarrow_is_refused_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else
                        find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--ckpt_path", "x.ckpt", str(tmp_path), "-o", str(tmp_path / "s.parquet")])
    assert exit_info.value.code == 2 and "Parquet output needs pyarrow" in capsys.readouterr().err
    assert not (tmp_path / "s.parquet.partial").exists()
