"""Shared test configuration: CPU by default, `gpu` tests skipped without CUDA; the tiny-run work folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from iqa_fixtures import make_kadid

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A KADID-format fixture and the tiny run config pointing at it; cwd = tmp_path (runs/ lands there)."""
    make_kadid(tmp_path / "kadid")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG.read_text().replace("KADID_ROOT", str(tmp_path / "kadid")))
    monkeypatch.chdir(tmp_path)
    return tmp_path, config


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained one epoch through the CLI on a KADID-format fixture: (fixture root, run folder)."""
    from qmamba.cli import main

    root = tmp_path_factory.mktemp("score")
    make_kadid(root / "kadid")
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG.read_text().replace("KADID_ROOT", str(root / "kadid")).replace(
        "save_dir: runs", f"save_dir: {root / 'runs'}"))
    main(["fit", "--config", str(config)])
    return root, root / "runs" / "tiny"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A folder on a tmpfs that holds 32 KiB (mounted for the test, as root; skipped where mounting is not
    allowed): a disk that fills up, for real."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()}): needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
