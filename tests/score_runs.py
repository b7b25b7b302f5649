"""Running ``qmamba score`` in-process from tests, as a user would from a shell, and reading what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qmamba
from qmamba.cli import main

# Tests that start or use a Ray cluster run one after another on one pytest-xdist worker: a cluster of this machine
# is the machine's (/tmp/ray), and test_score_ray checks that a run's cluster leaves no session or process behind.
ray_cluster = pytest.mark.xdist_group("ray")


def run_score(trained, *args: str, device: str | None = "cpu") -> int:  # noqa: ANN001 (the (root, run) pair)
    """qmamba score with the trained test model (on ``device``); its exit status (0 when it returns)."""
    try:
        main(["score", "--ckpt_path", str(trained[1] / "checkpoints" / "best.ckpt"),
              *(["--device", device] if device else []), *args])
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def rows_of(path: Path) -> dict[str, dict]:
    """A JSON Lines output's rows by path."""
    return {e["path"]: e for e in (json.loads(line) for line in path.read_text().splitlines() if line)}


def file_scores(trained, files: dict[str, Path]) -> dict[str, float]:  # noqa: ANN001
    """The test model's scores of image files, one by one through qmamba.load, under the names given."""
    scorer = qmamba.load(trained[1] / "checkpoints" / "best.ckpt", device="cpu")
    return dict(zip(files, scorer.score([str(p) for p in files.values()]), strict=True))


def parts_of(folder: Path) -> dict[str, dict]:
    """The rows of a folder of Parquet parts by key; a key twice fails the test."""
    import pyarrow.parquet as pq

    rows = pq.read_table(folder).to_pylist() if any(folder.glob("*.parquet")) else []
    keys = [r["path"] for r in rows]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    return {r["path"]: r for r in rows}


def bucket_parts(client, prefix: str, folder: Path) -> dict[str, dict]:  # noqa: ANN001 (a boto3 client)
    """:func:`parts_of` the objects under ``prefix`` of the test bucket ``iqa``, downloaded into a new ``folder``."""
    folder.mkdir(parents=True)
    for entry in client.list_objects_v2(Bucket="iqa", Prefix=prefix).get("Contents", []):
        client.download_file("iqa", entry["Key"], str(folder / Path(entry["Key"]).name))
    return parts_of(folder)
