"""`qmamba score`'s outputs against a hostile file system and careless reruns (issue 25): links are never followed,
maps stay inside their folder, one run per output, and reruns do not duplicate rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmamba.cli import main


@pytest.fixture
def images(trained, tmp_path) -> Path:
    """Two good PNGs and a corrupt one."""
    root, _ = trained
    folder = tmp_path / "imgs"
    folder.mkdir()
    for source in sorted((root / "kadid" / "images").glob("I0*_01_0*.png"))[:2]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def _score(trained, *args: str) -> int:
    """qmamba score's exit status (0 when it returns)."""
    try:
        main(["score", "--ckpt_path", str(trained[1] / "checkpoints" / "best.ckpt"), "--device", "cpu", *args])
    except SystemExit as exit_info:
        return exit_info.code
    return 0


@pytest.mark.parametrize("planted", ["output", "partial"])
def test_a_symlinked_output_or_partial_file_is_refused_and_its_target_untouched(trained, images, tmp_path, capsys,
                                                                                 planted):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    output = tmp_path / "scores.csv"
    (output if planted == "output" else output.with_name("scores.csv.partial")).symlink_to(victim)
    assert _score(trained, str(images), "-o", str(output)) == 2
    err = capsys.readouterr().err
    assert "is a symbolic link" in err.splitlines()[-1] and "Traceback" not in err
    assert victim.read_text() == "precious"


def test_a_link_planted_where_a_temporary_would_go_is_not_followed(trained, images, tmp_path):
    """Parquet is written through a temporary file: one with a fixed name would follow a planted link."""
    pytest.importorskip("pyarrow")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    output = tmp_path / "scores.parquet"
    (tmp_path / ".scores.parquet.tmp").symlink_to(victim)
    assert _score(trained, str(images), "-o", str(output)) == 1  # the corrupt image
    assert victim.read_text() == "precious" and output.is_file() and not output.is_symlink()


def test_maps_of_inputs_above_the_working_folder_stay_inside_the_maps_folder(trained, images, tmp_path,
                                                                             monkeypatch):
    from qmamba.score_command import map_path

    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    maps = work / "maps"
    escaping = os.path.join("..", "..", "imgs", "I01_01_01.png")
    assert map_path(maps, escaping) == maps / Path(*images.parts[1:]) / "I01_01_01.png.png"
    assert map_path(maps, "a/../b.png") == maps / "b.png.png"  # below the working folder: keeps its name
    assert _score(trained, escaping, "-o", str(work / "s.csv"), "--maps", str(maps)) == 0
    written = [p for p in tmp_path.rglob("*.png.png")]
    assert written and all(p.is_relative_to(maps) for p in written)


def test_a_link_inside_the_maps_folder_that_leads_out_is_refused(trained, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    maps = tmp_path / "maps"
    maps.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (maps / "imgs").symlink_to(outside)
    assert _score(trained, "imgs/I01_01_01.png", "-o", "s.csv", "--maps", "maps") == 2
    assert "leads out of it" in capsys.readouterr().err and list(outside.iterdir()) == []


def test_two_runs_on_one_output_are_refused_and_a_stale_lock_is_taken_over(trained, images, tmp_path, capsys):
    output = tmp_path / "scores.csv"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".scores.csv.lock"
        lock.write_text(f"{holder.pid} {os.uname().nodename}")
        assert _score(trained, str(images), "-o", str(output)) == 1
        err = capsys.readouterr().err.splitlines()[-1]
        assert f"--output {output} is in use by another qmamba run (pid {holder.pid}" in err
        assert not output.exists() and not output.with_name("scores.csv.partial").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert _score(trained, str(images), "-o", str(output)) == 1  # the holder is gone: its lock is stale
    assert len(output.read_text().splitlines()) == 3 and not lock.exists()  # header + 2 scores, lock released


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_rerunning_a_finished_output_does_not_repeat_its_error_rows(trained, images, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    output = tmp_path / f"scores{suffix}"
    for _ in range(3):
        assert _score(trained, str(images), "-o", str(output)) == 1
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(output).to_pylist()
        errors = [r for r in rows if r["error"] is not None]
    else:
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        errors = [r for r in rows if "error" in r]
    assert len(rows) == 3 and [Path(r["path"]).name for r in errors] == ["corrupt.png"]


def test_a_symlinked_shard_part_is_refused(trained, images, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    output = tmp_path / "scores.jsonl"
    output.with_name("scores.jsonl.partial.rank1").symlink_to(victim)
    assert _score(trained, str(images), "-o", str(output), "--devices", "2", "--workers", "0") == 2
    err = capsys.readouterr().err
    assert "the shard part" in err.splitlines()[-1] and "is a symbolic link" in err and "Traceback" not in err
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("command", ["score", "serve"])
def test_a_dataset_the_model_was_not_trained_on_is_one_line(trained, images, capsys, command):
    if command == "serve":
        pytest.importorskip("uvicorn", reason="qmamba serve needs its extra")
    args = [str(images / "I01_01_01.png")] if command == "score" else []
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--ckpt_path", str(trained[1] / "checkpoints" / "best.ckpt"), "--device", "cpu",
              "--dataset", "koniq", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "the model was trained on tiny_kadid: choose one of them" in err.splitlines()[-1]
