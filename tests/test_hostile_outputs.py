"""`qmamba score`'s outputs against a hostile file system and careless reruns (issue 25): links are never followed,
maps stay inside their folder, one run per output, and reruns do not duplicate rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from score_runs import ray_cluster, run_score

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



@pytest.mark.parametrize("planted", ["output", "partial"])
def test_a_symlinked_output_or_partial_file_is_refused_and_its_target_untouched(trained, images, tmp_path, capsys,
                                                                                 planted):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    output = tmp_path / "scores.csv"
    (output if planted == "output" else output.with_name("scores.csv.partial")).symlink_to(victim)
    assert run_score(trained, str(images), "-o", str(output)) == 2
    err = capsys.readouterr().err
    assert "is a symbolic link" in err.splitlines()[-1] and "Traceback" not in err
    assert victim.read_text() == "precious"


def test_a_link_planted_where_a_temporary_would_go_is_not_followed(trained, images, tmp_path):
    """Parquet is written through a temporary file: one with a fixed name would follow a planted link."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    output = tmp_path / "scores.parquet"
    (tmp_path / ".scores.parquet.tmp").symlink_to(victim)
    assert run_score(trained, str(images), "-o", str(output)) == 1  # the corrupt image
    assert victim.read_text() == "precious" and output.is_file() and not output.is_symlink()


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=[ray_cluster, pytest.mark.slow])])
def test_a_folder_output_that_is_a_link_is_refused_and_its_target_untouched(trained, images, tmp_path, capsys,
                                                                            engine):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linkdir").symlink_to(elsewhere, target_is_directory=True)
    engine_args = ["--engine", "ray"] if engine == "ray" else ["--device", "cpu"]
    assert run_score(trained, str(images), *engine_args, "-o", f"{tmp_path / 'linkdir'}/", device=None) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a symbolic link" in err[0] and str(tmp_path / "linkdir") in err[0]
    assert not any(elsewhere.iterdir())


def test_a_link_planted_in_a_folder_output_is_refused_and_its_target_untouched(trained, images, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    output = tmp_path / "scores"
    output.mkdir()
    (output / "_qmamba.json").symlink_to(victim)
    assert run_score(trained, str(images), "-o", f"{output}/") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds _qmamba.json, a symbolic link" in err[0]
    assert victim.read_text() == "precious" and (output / "_qmamba.json").is_symlink()


def test_maps_of_inputs_above_the_working_folder_stay_inside_the_maps_folder(trained, images, tmp_path,
                                                                             monkeypatch):
    from qmamba.commands.score import map_path

    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    maps = work / "maps"
    escaping = os.path.join("..", "..", "imgs", "I01_01_01.png")
    assert map_path(maps, escaping) == maps / Path(*images.parts[1:]) / "I01_01_01.png.png"
    assert map_path(maps, "a/../b.png") == maps / "b.png.png"  # below the working folder: keeps its name
    assert run_score(trained, escaping, "-o", str(work / "s.csv"), "--maps", str(maps)) == 0
    written = [p for p in tmp_path.rglob("*.png.png")]
    assert written and all(p.is_relative_to(maps) for p in written)


def test_a_link_inside_the_maps_folder_that_leads_out_is_refused(trained, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    maps = tmp_path / "maps"
    maps.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (maps / "imgs").symlink_to(outside)
    assert run_score(trained, "imgs/I01_01_01.png", "-o", "s.csv", "--maps", "maps") == 2
    assert "leads out of it" in capsys.readouterr().err and list(outside.iterdir()) == []


def test_a_maps_folder_named_through_a_link_and_dot_dot_is_the_one_the_os_finds(trained, images, tmp_path,
                                                                                 monkeypatch):
    """``--maps link/../maps`` with ``link`` -> ``far/deep``: the OS's ``link/..`` is ``far``. The folders were made
    there while the maps were written at the path with ``..`` removed as text: FileNotFoundError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "far" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "far" / "deep")
    assert run_score(trained, str(images / "I01_01_01.png"), "-o", "s.csv", "--maps", "link/../maps") == 0
    assert list((tmp_path / "far" / "maps").rglob("I01_01_01.png.png")) and not (tmp_path / "maps").exists()


def test_two_runs_on_one_output_are_refused_and_a_stale_lock_is_taken_over(trained, images, tmp_path, capsys):
    output = tmp_path / "scores.csv"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".scores.csv.lock"
        lock.write_text(f"{holder.pid} {os.uname().nodename}")
        assert run_score(trained, str(images), "-o", str(output)) == 1
        err = capsys.readouterr().err.splitlines()[-1]
        assert f"--output {output} is in use by another qmamba run (pid {holder.pid}" in err
        assert not output.exists() and not output.with_name("scores.csv.partial").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert run_score(trained, str(images), "-o", str(output)) == 1  # the holder is gone: its lock is stale
    assert len(output.read_text().splitlines()) == 3 and not lock.exists()  # header + 2 scores, lock released


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_rerunning_a_finished_output_does_not_repeat_its_error_rows(trained, images, tmp_path, suffix):
    output = tmp_path / f"scores{suffix}"
    for _ in range(3):
        assert run_score(trained, str(images), "-o", str(output)) == 1
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
    assert run_score(trained, str(images), "-o", str(output), "--devices", "2", "--workers", "0") == 2
    err = capsys.readouterr().err
    assert "the shard part" in err.splitlines()[-1] and "is a symbolic link" in err and "Traceback" not in err
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("command", ["score", "serve"])
def test_a_dataset_the_model_was_not_trained_on_is_one_line(trained, images, capsys, command):
    args = [str(images / "I01_01_01.png")] if command == "score" else []
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--ckpt_path", str(trained[1] / "checkpoints" / "best.ckpt"), "--device", "cpu",
              "--dataset", "koniq", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "the model was trained on tiny_kadid: choose one of them" in err.splitlines()[-1]


ODD_NAMES = ["a\rb.png", "c\nd.png", "e\x1cf.png", "g\x85h.png", "i\u2028j.png", 'k, "l".png', " m .png",
             os.fsdecode(b"caf\xe9.png")]  # the last is not UTF-8: a POSIX name is bytes


def _read_paths(output: Path) -> list[str]:
    """Every path an output holds, as a reader of its format gets it back (Parquet: through its metadata)."""
    if output.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(output)
        exact = json.loads((table.schema.metadata or {}).get(b"qmamba_path_bytes", b"{}"))
        return [os.fsdecode(bytes.fromhex(exact[str(i)])) if str(i) in exact else p
                for i, p in enumerate(table.column("path").to_pylist())]
    with open(output, encoding="utf-8", errors="surrogateescape", newline="") as f:
        if output.suffix == ".csv":
            import csv

            return [row[0] for row in list(csv.reader(f))[1:]]
        if output.suffix == ".json":
            return [e["path"] for e in json.load(f)["scores"]]
        return [json.loads(line)["path"] for line in f.read().split("\n") if line]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_every_file_name_round_trips_through_every_format_and_resumes(trained, images, tmp_path, capsys, suffix):
    folder = tmp_path / "odd"
    folder.mkdir()
    png = (images / sorted(p.name for p in images.glob("I0*.png"))[0]).read_bytes()
    for name in ODD_NAMES:
        with open(os.fsencode(folder) + b"/" + os.fsencode(name), "wb") as f:
            f.write(png)
    expected = sorted(str(folder / name) for name in ODD_NAMES)
    output = tmp_path / f"scores{suffix}"
    assert run_score(trained, str(folder), "-o", str(output)) == 0
    assert sorted(_read_paths(output)) == expected
    if suffix == ".parquet":  # the column itself shows the undecodable byte as Python writes it
        import pyarrow.parquet as pq

        assert str(folder / "caf\\xe9.png") in pq.read_table(output).column("path").to_pylist()
    capsys.readouterr()
    assert run_score(trained, str(folder), "-o", str(output)) == 0  # a rerun of the finished output
    assert sorted(_read_paths(output)) == expected  # every name recognised: nothing scored twice
    if suffix != ".json":  # JSON cannot resume: it starts over
        assert f"{len(ODD_NAMES)} images already scored, 0 to go" in capsys.readouterr().err


def test_names_from_a_list_file_keep_their_bytes_and_spaces(trained, images, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    png = (images / sorted(p.name for p in images.glob("I0*.png"))[0]).read_bytes()
    names = [os.fsdecode(b"caf\xe9.png"), " m .png", "e\x1cf.png"]
    for name in names:
        with open(os.fsencode(folder) + b"/" + os.fsencode(name), "wb") as f:
            f.write(png)
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"".join(os.fsencode(folder / name) + b"\r\n" for name in names))  # CRLF, as Windows writes
    output = tmp_path / "s.jsonl"
    assert run_score(trained, "--list", str(listing), "-o", str(output)) == 0
    assert sorted(_read_paths(output)) == sorted(str(folder / name) for name in names)


@pytest.mark.parametrize("devices", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_a_path_given_twice_is_scored_once_and_the_output_finished(trained, images, tmp_path, capsys, devices):
    good = sorted(str(p) for p in images.glob("I0*.png"))
    output = tmp_path / "s.csv"
    assert run_score(trained, good[0], good[1], good[0], good[1], "-o", str(output), "--devices", devices) == 0
    assert output.is_file() and not output.with_name("s.csv.partial").exists()
    assert sorted(_read_paths(output)) == good
    assert "2 repeated input path(s) are scored once" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


@pytest.mark.slow
def test_sigterm_to_the_parent_of_a_sharded_run_stops_its_shards_and_a_rerun_finishes(trained, images, tmp_path,
                                                                                        forked_qmamba):
    many = tmp_path / "many"
    many.mkdir()
    sources = sorted(images.glob("I0*.png"))
    for i in range(1500):
        (many / f"{i:04d}.png").write_bytes(sources[i % len(sources)].read_bytes())
    output = tmp_path / "s.jsonl"
    command = ["score", "--ckpt_path", str(trained[1] / "checkpoints" / "best.ckpt"), str(many), "-o", str(output),
               "--device", "cpu", "--devices", "2", "--batch-size", "4"]
    qmamba = forked_qmamba("score")  # the parent forked warm (tests/forked.py); its shards start as they always do
    parent = qmamba.popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = tmp_path / "s.jsonl.partial.rank0"
    deadline = time.monotonic() + 120
    while not (part.is_file() and part.stat().st_size > 0) and time.monotonic() < deadline:
        assert parent.poll() is None, parent.communicate()
        time.sleep(0.1)
    shards = [pid for child in _children(parent.pid) for pid in [child, *_children(child)]]
    parent.send_signal(15)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 143, err
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in shards) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in shards if Path(f"/proc/{pid}").exists()
                and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]], "shard processes outlived the parent"
    assert "SIGTERM" in err and not output.exists()
    stopped_at = len(_read_paths(tmp_path / "s.jsonl.partial"))
    assert 0 < stopped_at < 1500  # the shards stopped after their batch, not after all of their files
    rerun = qmamba.run(command, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    paths = _read_paths(output)
    assert len(paths) == len(set(paths)) == 1500  # every image exactly once


def test_a_full_disk_under_the_maps_names_the_map(trained, images, tmp_path, capsys, small_disk):
    """The maps filled the disk and the message named the scores' file."""
    from PIL import Image

    noise = tmp_path / "noise.png"  # its map (drawn over the image) is far above the disk's 32 KiB
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(noise)
    output = tmp_path / "scores.csv"
    assert run_score(trained, str(noise), "-o", str(output), "--maps", str(small_disk / "maps")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"qmamba: error: no space left on the device while writing {small_disk / 'maps'}/")
    assert ".png.png" in err[-1] and "Traceback" not in "\n".join(err)


def test_a_full_disk_while_scoring_is_one_line_and_keeps_the_scores_written(trained, images, tmp_path, capsys,
                                                                            small_disk):
    many = tmp_path / "many"
    many.mkdir()
    png = (images / sorted(p.name for p in images.glob("I0*.png"))[0]).read_bytes()
    for i in range(600):  # ~100 bytes a row: more rows than 32 KiB hold
        (many / f"image-with-a-long-name-to-fill-the-disk-sooner-{i:04d}.png").write_bytes(png)
    output = small_disk / "scores.csv"
    assert run_score(trained, str(many), "-o", str(output)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qmamba: error: no space left on the device while writing ") and "Traceback" not in err
    assert err[-1].endswith(f"every score written so far is kept in {output}.partial: free space and rerun the "
                            "same command to resume")
    partial = output.with_name("scores.csv.partial").read_text()
    rows = partial[: partial.rfind("\n")].split("\n")[1:]  # whole rows (the disk may have cut the last one)
    assert 50 < len(rows) < 600 and all(float(row.split(",")[1]) > 0 for row in rows)
    assert not output.exists()
