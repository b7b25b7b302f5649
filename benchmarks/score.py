"""Scoring throughput of trained checkpoints on a folder of 1024x768 JPEGs, per selective-scan backend.

    python benchmarks/score.py runs/demo/checkpoints/best.ckpt            # the demo model (make demo)
    python benchmarks/score.py --tiny                                     # + a QMamba-T checkpoint made here
    python benchmarks/score.py CKPT... --images 48 --rounds 3 --backends cpu torch

Times what ``qmamba score FOLDER`` does after start-up (decode, the checkpoint's evaluation crops, batched forward,
score mapping) with ``qmamba.load(...).iter_scores``; backends are interleaved per round and the table shows the
median img/s. The JPEGs are synthetic photographs (smooth gradients and blocky texture) written once to --workdir,
in KonIQ-10k's layout with random MOS, so that ``--tiny`` can train QMamba-T (224 px crops) on them for one step
through the real CLI: a checkpoint with QMamba-T's architecture and preprocessing (its scores are meaningless, its
speed is QMamba-T's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

import qmamba
from qmamba.models import set_scan_backend

TINY_CONFIG = """
seed_everything: 0
trainer:
  accelerator: {accelerator}
  precision: {precision}
  max_steps: {steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {runs}, name: qmamba_tiny, version: ""}}
model:
  class_path: qmamba.training.QMambaIQA
  init_args: {{backbone: qmamba_tiny}}
data:
  class_path: qmamba.data.IQADataModule
  init_args:
    datasets: [{{name: koniq10k, root: {koniq}}}]
    batch_size: {batch}
    crop_size: 224
    num_workers: 0
"""


def fit_qmamba_tiny(workdir: Path, koniq: Path, steps: int = 1, batch: int = 2, accelerator: str = "cpu",
                    precision: str = "32-true") -> Path:
    """Train QMamba-T for ``steps`` steps through the real CLI on a KonIQ-format folder; returns last.ckpt."""
    from qmamba.cli import main

    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "qmamba_tiny.yaml"
    config.write_text(TINY_CONFIG.format(runs=workdir / "runs", koniq=koniq, steps=steps, batch=batch,
                                         accelerator=accelerator, precision=precision))
    main(["fit", "--config", str(config)])
    return workdir / "runs" / "qmamba_tiny" / "checkpoints" / "last.ckpt"


def make_jpegs(root: Path, count: int, width: int = 1024, height: int = 768) -> list[str]:
    """``count`` JPEGs in KonIQ-10k's layout under ``root`` (images in 1024x768/, the score and split tables)."""
    folder = root / "1024x768"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    paths = []
    for i in range(count):
        path = folder / f"photo_{i:04d}.jpg"
        if not path.exists():
            base = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(4 * (x + y) + 0.5 * i)], -1)
            texture = rng.normal(0, 0.15, (height // 8, width // 8, 3)).repeat(8, 0).repeat(8, 1)
            image = np.clip(127.5 + 100 * (base + texture), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(path, quality=90)
        paths.append(str(path))
    names = [Path(p).name for p in paths]
    sets = ["test" if i % 8 == 7 else "validation" if i % 8 == 6 else "training" for i in range(count)]
    pd.DataFrame({"image_name": names, "MOS_zscore": rng.uniform(0, 100, count)}).to_csv(
        root / "koniq10k_scores_and_distributions.csv", index=False)
    pd.DataFrame({"image_name": names, "set": sets}).to_csv(root / "koniq10k_distributions_sets.csv", index=False)
    return paths


def tiny_checkpoint(workdir: Path) -> Path:
    """QMamba-T trained for one step through the CLI on the JPEGs of :func:`make_jpegs`."""
    ckpt = workdir / "runs" / "qmamba_tiny" / "checkpoints" / "last.ckpt"
    return ckpt if ckpt.exists() else fit_qmamba_tiny(workdir, workdir / "jpegs")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="qmamba checkpoints to score with")
    parser.add_argument("--tiny", action="store_true", help="also a QMamba-T checkpoint (one training step)")
    parser.add_argument("--images", type=int, default=32, help="JPEGs in the folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass, as qmamba score's default")
    parser.add_argument("--backends", nargs="+", default=["cpu", "torch"])
    parser.add_argument("--workdir", type=Path, default=Path("runs/benchmark_score"))
    args = parser.parse_args()

    if not args.checkpoints and not args.tiny:
        parser.error("give a checkpoint or --tiny")
    paths = make_jpegs(args.workdir / "jpegs", args.images)
    checkpoints = [Path(c) for c in args.checkpoints] + ([tiny_checkpoint(args.workdir)] if args.tiny else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(paths)} JPEGs of 1024x768, "
          f"median of {args.rounds} rounds")
    print(f"| {'checkpoint':<50} | {'model':<12} | {'crops':>5} | {'backend':<7} | {'img/s':>6} |")
    print(f"|{'-' * 52}|{'-' * 14}|{'-' * 7}|{'-' * 9}|{'-' * 8}|")
    for ckpt in checkpoints:
        scorer = qmamba.load(ckpt, device="cpu", batch_size=args.batch_size)
        times: dict[str, list[float]] = {backend: [] for backend in args.backends}
        for backend in args.backends:  # warm-up: kernel compilation, allocator
            set_scan_backend(scorer.model, backend)
            list(scorer.iter_scores(paths[: args.batch_size]))
        for _ in range(args.rounds):
            for backend in args.backends:
                set_scan_backend(scorer.model, backend)
                start = time.perf_counter()
                for _, _, error in scorer.iter_scores(paths):
                    assert error is None, error
                times[backend].append(time.perf_counter() - start)
        for backend, seconds in times.items():
            print(f"| {str(ckpt)[-50:]:<50} | {scorer.info.get('backbone', '?'):<12} | {scorer.crops.count:>5} | "
                  f"{backend:<7} | {len(paths) / statistics.median(seconds):>6.2f} |")


if __name__ == "__main__":
    main()
