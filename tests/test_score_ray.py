"""``qmamba score --engine ray`` and ``qmamba.ray.score_dataset`` on a Ray cluster started here
(``ray.init(num_cpus=2)``): the keys and scores of the local engine, resume, a scoring actor killed mid-batch, a driver
killed and rerun, a bucket behind a real S3 API, and the bad inputs refused before any work."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
from forked import ForkedProcess, Zygote
from score_runs import bucket_parts, file_scores, parts_of, ray_cluster, rows_of, run_score

pytestmark = [pytest.mark.slow, ray_cluster]


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of this machine with 2 CPUs; its address, for drivers in other processes."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def ray_score(trained, *args: str) -> int:  # noqa: ANN001
    """qmamba score --engine ray in this process (its Ray session is the test cluster's); the exit status."""
    return run_score(trained, "--engine", "ray", *args, device=None)


def member_scores(trained, collection) -> dict[str, float]:  # noqa: ANN001
    """The collection's images scored as extracted files one by one, by member name."""
    return file_scores(trained, collection[1])


def test_both_engines_give_the_files_scores_for_shards_a_table_and_a_folder(trained, collection, cluster, tmp_path):
    shards, files = collection
    table = tmp_path / "images.parquet"
    names = list(files)[:4]
    pq.write_table(_table({"path": [str(files[n]) for n in names]}), table)
    inputs = [str(shards / "{000000..000003}.tar"), str(table), str(files[names[0]].parent)]
    assert run_score(trained, *inputs, "-o", str(tmp_path / "local.jsonl")) == 1  # the corrupt member, the text
    local = rows_of(tmp_path / "local.jsonl")
    assert ray_score(trained, *inputs, "-o", str(tmp_path / "ray")) == 1
    remote = parts_of(tmp_path / "ray")
    assert remote.keys() == local.keys()
    for key, row in local.items():
        if "error" in row:
            assert remote[key]["error"] == row["error"] and remote[key]["score"] is None, key
        else:
            assert remote[key]["score"] == pytest.approx(row["score"], rel=1e-6, abs=1e-6), key
            assert remote[key]["flag"] == row.get("flag", "")
    expected = member_scores(trained, collection)
    for key, row in remote.items():
        name = key.rsplit("#", 1)[-1].rsplit("/", 1)[-1]
        if row["score"] is not None:
            assert row["score"] == pytest.approx(expected[name], rel=1e-6, abs=1e-6), key
    summary = (tmp_path / "ray" / "_qmamba.json").read_text()
    assert '"scored": 24' in summary and '"errors": 2' in summary  # 12 members, 12 loose files (the table's among them)

    errors_before = sorted(p.name for p in (tmp_path / "ray").glob("errors-*"))
    assert ray_score(trained, *inputs, "-o", str(tmp_path / "ray")) == 1  # resumed: only the failures again
    assert parts_of(tmp_path / "ray").keys() == remote.keys()
    assert sorted(p.name for p in (tmp_path / "ray").glob("errors-*")) != errors_before  # retried, replaced


def _table(columns: dict[str, list]):  # noqa: ANN202
    import pyarrow as pa

    return pa.table(columns)


def test_score_dataset_scores_a_users_dataset_of_paths_or_bytes(trained, collection, cluster):
    import qmamba.ray
    from qmamba.errors import UsageError

    _, files = collection
    expected = file_scores(trained, files)
    checkpoint = trained[1] / "checkpoints" / "best.ckpt"
    paths = ray.data.from_items([{"url": str(p), "id": n} for n, p in files.items()])
    by_path = qmamba.ray.score_dataset(paths, checkpoint, column="url", batch_size=4).take_all()
    assert sorted(r["path"] for r in by_path) == sorted(str(p) for p in files.values())
    np.testing.assert_allclose([r["score"] for r in sorted(by_path, key=lambda r: r["path"])],
                               [expected[n] for n in sorted(files, key=lambda n: str(files[n]))], rtol=1e-6)
    no_bytes = ray.data.from_items([{"url": str(p), "bytes": None} for p in files.values()])  # null: read the url
    assert sorted(r["score"] for r in qmamba.ray.score_dataset(no_bytes, checkpoint, column="url",
                                                               image_column="bytes").take_all()) == pytest.approx(
        sorted(expected.values()), rel=1e-6)
    folder = next(iter(files.values())).parent
    raw = ray.data.read_binary_files(str(folder), include_paths=True)
    by_bytes = {Path(r["path"]).name: r["score"] for r in qmamba.ray.score_dataset(
        raw, checkpoint, column="path", image_column="bytes").take_all()}
    assert by_bytes == pytest.approx(expected, rel=1e-6)
    with pytest.raises(UsageError, match="no column picture"):
        qmamba.ray.score_dataset(paths, checkpoint, column="picture")


@pytest.fixture(scope="module")
def many(trained, tmp_path_factory) -> tuple[list[str], int]:  # noqa: ANN001
    """6 shards of 40 small PNGs each (one block each: a kill after the first part lands mid-run): (shard paths,
    image count)."""
    root = tmp_path_factory.mktemp("many")
    sources = sorted((trained[0] / "kadid" / "images").glob("*.png"))
    shards = []
    for s in range(6):
        shard = root / f"{s:06d}.tar"
        with tarfile.open(shard, "w") as archive:
            for i in range(40):
                archive.add(sources[(40 * s + i) % len(sources)], arcname=f"{s}_{i:03d}.png")
        shards.append(str(shard))
    return shards, 240


def _driver(qmamba: Zygote, trained, cluster: str, inputs: list[str], output: str, env: dict | None = None,  # noqa: ANN001
            ) -> ForkedProcess:
    """qmamba score --engine ray in its own process (forked warm: tests/forked.py), a driver of the test cluster, one
    image per batch."""
    command = ["score", "--engine", "ray", "--address", cluster, "--ckpt_path",
               str(trained[1] / "checkpoints" / "best.ckpt"), *inputs, "-o", output, "--batch-size", "1",
               "--part-rows", "8"]
    return qmamba.popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def _scoring_actors() -> list[int]:
    """Processes of the scoring actors that are in the middle of a batch (Ray titles them by their method)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "MapBatches(_Model)).submit" in title:
            found.append(int(entry.name))
    return found


def _wait_for(condition, process: ForkedProcess, timeout: float = 240.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    pytest.fail("the run never got there")


def test_a_scoring_actor_killed_mid_batch_is_restarted_and_every_key_is_scored_once(trained, many, cluster,
                                                                                      tmp_path, forked_qmamba):
    shards, count = many
    output = tmp_path / "scores"
    driver = _driver(forked_qmamba("score"), trained, cluster, shards, str(output))
    victim = _wait_for(_scoring_actors, driver)[0]
    os.kill(victim, signal.SIGKILL)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    rows = parts_of(output)
    assert len(rows) == count and all(r["score"] is not None for r in rows.values())
    assert f"{count} scored, 0 skipped" in err


def test_a_driver_killed_and_rerun_on_a_bucket_scores_every_key_exactly_once(trained, many, cluster, bucket,
                                                                            tmp_path, forked_qmamba):
    """Shards read from a bucket, parts written back to it; the driver killed after its first part, then rerun.
    The bucket's secret reaches the reading tasks and no file of the Ray session."""
    client, env = bucket
    shards, count = many
    for shard in shards:
        client.upload_file(shard, "iqa", f"shards/{Path(shard).name}")
    inputs, output = ["s3://iqa/shards/{000000..000005}.tar"], "s3://iqa/scores/"

    driver = _driver(forked_qmamba("score"), trained, cluster, inputs, output, env)
    _wait_for(lambda: client.list_objects_v2(Bucket="iqa", Prefix="scores/part-").get("KeyCount", 0), driver)
    driver.kill()
    driver.communicate()
    before = bucket_parts(client, "scores/", tmp_path / "before")
    assert 0 < len(before) < count, "the kill came after the run had finished"
    rerun = _driver(forked_qmamba("score"), trained, cluster, inputs, output, env)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"resuming {output}: {len(before)} images already scored" in err
    after = bucket_parts(client, "scores/", tmp_path / "after")
    assert len(after) == count and all(k.startswith("s3://iqa/shards/00000") and ".tar#" in k for k in after)
    assert all(after[k]["score"] == before[k]["score"] for k in before)
    assert client.list_objects_v2(Bucket="iqa", Prefix="scores/_qmamba.json")["KeyCount"] == 1
    with tarfile.open(shards[0]) as archive:  # the same scores as the extracted files
        archive.extractall(tmp_path / "extracted", filter="data")
    by_member = {k.rsplit("#", 1)[1]: r["score"] for k, r in after.items()}
    extracted = {p.name: p for p in sorted((tmp_path / "extracted").iterdir())}
    for name, score in file_scores(trained, extracted).items():
        assert by_member[name] == pytest.approx(score, rel=1e-6), name
    assert _session_files_holding(env["AWS_SECRET_ACCESS_KEY"]) == []


def test_sigterm_to_a_driver_writes_what_arrived_and_exits_143(trained, many, cluster, tmp_path, forked_qmamba):
    """ray.init's own SIGTERM handler exited at once: Ray's C++ abort, exit 134. Now as SIGINT: the rows that
    arrived are written as parts, one line says so, and a rerun finishes."""
    shards, count = many
    output = tmp_path / "scores"
    driver = _driver(forked_qmamba("score"), trained, cluster, shards, f"{output}/")
    _wait_for(lambda: list(output.glob("part-*.parquet")), driver)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 143, err
    assert "SIGTERM" in err.strip().splitlines()[-1] and "stopped early" in err.strip().splitlines()[-1]
    written = len(parts_of(output))
    assert 0 < written < count and not (output / "_qmamba.json").exists()
    assert max(pq.read_metadata(p).num_rows for p in output.glob("part-*.parquet")) <= 8  # --part-rows 8 (was 40)


def test_a_cluster_started_for_a_run_leaves_no_session_files_and_no_processes(trained, collection, tmp_path,
                                                                            request, forked_qmamba):
    """Every run on a cluster of this machine left /tmp/ray/session_* (about 400 KB of logs): its session is now a
    folder of the run's own, removed with the cluster's processes when the run ends."""
    temp = Path(tempfile.mkdtemp(dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    sessions = set(Path("/tmp/ray").glob("session_*"))
    # RAY_AUTH_MODE too: the test cluster's ray.init set it in this process, and a user's shell has none
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    environment["TMPDIR"] = str(temp)
    output = tmp_path / "scores"
    result = forked_qmamba("score").run(["score", "--engine", "ray", "--ckpt_path",
                                         str(trained[1] / "checkpoints" / "best.ckpt"),
                                         str(collection[0] / "000001.tar"), "-o", f"{output}/"],
                                        timeout=300, env=environment)
    assert result.returncode in (0, 1) and parts_of(output), result.stderr  # shard 1 may hold a corrupt member
    assert "Token authentication" not in result.stderr, result.stderr  # Ray's notice of its default, dropped
    assert list(temp.iterdir()) == [] and set(Path("/tmp/ray").glob("session_*")) <= sessions

    def left() -> list[str]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if str(temp).encode() in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                continue
        return found

    deadline = time.monotonic() + 30  # ray.shutdown ends them; an agent may take a moment to exit
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left() == []


def _session_files_holding(text: str) -> list[str]:
    """The files of the test cluster's Ray session (its logs among them) that hold ``text``."""
    from ray._private.worker import _global_node

    session = Path(_global_node.get_session_dir_path())
    needle = text.encode()
    return [str(p) for p in session.rglob("*") if p.is_file() and not p.is_socket() and needle in p.read_bytes()]


def test_a_cluster_that_is_not_there_is_one_line_within_the_timeout_and_nothing_is_created(trained, collection,
                                                                                             tmp_path, forked_qmamba):
    """Ray's own connect waited on an address without a cluster until killed at 150 s, and left the output folder."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        output = tmp_path / "scores"
        started = time.monotonic()
        result = forked_qmamba("score").run(["score", "--engine", "ray", "--address", address, "--ckpt_path",
                                             str(trained[1] / "checkpoints" / "best.ckpt"),
                                             str(collection[0] / "000000.tar"), "-o", f"{output}/", "--timeout", "5"],
                                            timeout=120)
        err = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(err) == 1, result.stderr
        assert err[0].startswith(f"qmamba: error: --address {address}: cannot reach the Ray cluster")
        assert time.monotonic() - started < 60 and not output.exists()


def test_workers_the_cluster_cannot_place_are_one_line_before_any_work(trained, collection, cluster, tmp_path,
                                                                       capsys):
    """--gpus-per-worker 1 on a cluster without GPUs waited forever (Ray: "the job may hang forever")."""
    for option, value, message in (("--gpus-per-worker", "1", "has 0 GPUs in all"),
                                   ("--cpus-per-worker", "64", "has 2 CPUs in all")):
        output = tmp_path / "scores"
        assert ray_score(trained, str(collection[0] / "000000.tar"), "-o", f"{output}/", option, value) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"qmamba: error: {option} {value}: the Ray cluster") and message in err[-1], err
        assert not output.exists()


def test_bad_input_is_one_line_before_any_work(trained, collection, bucket, tmp_path, capsys, forked_qmamba):
    client, env = bucket
    shards, files = collection
    table = tmp_path / "images.parquet"
    pq.write_table(_table({"url": [str(p) for p in files.values()]}), table)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    good = str(shards / "000000.tar")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [
        ([good, "-o", f"{a_file}/scores/"], f"cannot write --output {a_file}/scores/"),
        ([str(shards / "000009.tar"), "-o", str(tmp_path / "a")], f"shard {shards / '000009.tar'} does not exist"),
        ([str(table), "--column", "picture", "-o", str(tmp_path / "b")], "has no column picture"),
        ([good, "-o", str(read_only / "scores")], f"cannot write --output {read_only / 'scores'}"),
        ([good, "-o", str(tmp_path / "scores.csv")], "--engine ray writes Parquet parts into a folder or bucket"),
        ([good, "-o", str(tmp_path / "r.parquet")], "--engine ray writes Parquet parts into a folder or bucket"),
        ([good, "-o", "s3://no-such-bucket/scores/"], "cannot write --output s3://no-such-bucket/scores/"),
        ([good, "-o", str(tmp_path / "c"), "--workers", "2"], "--workers applies to the local engine only"),
    ]
    if os.geteuid() == 0:  # root writes anywhere: the read-only folder is no test there
        cases = [c for c in cases if "read_only" not in c[0][-1]]
    for args, message in cases:
        assert ray_score(trained, *args) in (1, 2), args
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), (args, err)
        assert not any((tmp_path / name).exists() for name in "abc"), args  # nothing written

    no_credentials = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    no_credentials.update(AWS_ENDPOINT_URL=env["AWS_ENDPOINT_URL"], AWS_CONFIG_FILE=os.devnull,
                          AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    client.upload_file(good, "iqa", "shards/000000.tar")
    result = forked_qmamba("score").run(["score", "--engine", "ray", "--ckpt_path",
                                         str(trained[1] / "checkpoints" / "best.ckpt"), "s3://iqa/shards/000000.tar",
                                         "-o", str(tmp_path / "anon")], timeout=300, env=no_credentials)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert err[-1].startswith("qmamba: error: cannot open shard s3://iqa/shards/000000.tar: ")
    assert "credentials" in err[-1].lower()

