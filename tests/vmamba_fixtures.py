"""Official VMamba checkpoints as tests need them: the key lists of the released files (names and shapes) and fake
checkpoints in their container format, filled with random weights."""

from __future__ import annotations

from pathlib import Path

import torch

KEYS_DIR = Path(__file__).parent / "data" / "vmamba-keys"


def official_keys(filename: str) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of an official checkpoint, from its key list in ``tests/data/vmamba-keys``."""
    keys = {}
    for line in (KEYS_DIR / filename).read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            keys[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


def fake_official_checkpoint(path: Path, filename: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file in VMamba's release format (``{"model": state_dict, "epoch": ...}``) with random weights."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) for k, shape in official_keys(filename).items()}
    torch.save({"model": state, "epoch": 262}, path)
    return state
