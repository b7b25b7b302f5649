"""Tiny datasets in the official on-disk formats, generated in a test's tmp_path (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def pattern(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A smooth random RGB image (w, h) -- different content per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.random()))
                for _ in range(3)]
    return ((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8)


def noisy(image: np.ndarray, level: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, 12 * level, image.shape), 0, 255).astype(np.uint8)


def make_kadid(root: Path, refs: int = 6, levels: int = 5, size: tuple[int, int] = (48, 40)) -> pd.DataFrame:
    """KADID-10k layout: images/Ixx.png, images/Ixx_01_yy.png (one noise distortion) and dmos.csv."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(1, refs + 1):
        reference = pattern(r, size)
        Image.fromarray(reference).save(images / f"I{r:02d}.png")
        for level in range(1, levels + 1):
            name = f"I{r:02d}_01_{level:02d}.png"
            Image.fromarray(noisy(reference, level, seed=100 * r + level)).save(images / name)
            rows.append((name, f"I{r:02d}.png", round(5.0 - 0.75 * level + 0.05 * (r % 3), 3), 0.1))
    table = pd.DataFrame(rows, columns=["dist_img", "ref_img", "dmos", "var"])
    table.to_csv(root / "dmos.csv", index=False)
    return table


def make_koniq(root: Path, n: int = 20, size: tuple[int, int] = (48, 40)) -> pd.DataFrame:
    """KonIQ-10k layout: 1024x768/<id>.jpg, the scores CSV and the official split file."""
    folder = root / "1024x768"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"{1000 + i}.jpg"
        level = i % 5
        Image.fromarray(noisy(pattern(i, size), level, seed=i)).save(folder / name, quality=95)
        mos = 4.5 - 0.7 * level
        rows.append([name, 1, 2, 3, 4, 5, 15, mos, 0.5, 25 * (mos - 1),
                     "test" if i % 5 == 0 else "validation" if i % 5 == 1 else "training"])
    columns = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore", "set"]
    table = pd.DataFrame(rows, columns=columns)
    table[columns[:-1]].to_csv(root / "koniq10k_scores_and_distributions.csv", index=False)
    sets = table[["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS_zscore", "SD", "set"]]
    sets.rename(columns={"MOS_zscore": "MOS"}).to_csv(root / "koniq10k_distributions_sets.csv", index=False)
    return table
