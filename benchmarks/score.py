"""``qmamba score`` throughput on generated 1024x768 JPEGs next to the data floor, per number of decoding workers.

    python benchmarks/score.py runs/demo/checkpoints/best.ckpt            # the demo model (make demo)
    python benchmarks/score.py runs/demo/checkpoints/best.ckpt --tiny     # + a QMamba-T checkpoint made here
    python benchmarks/score.py CKPT --images 2000 --tiny-images 64 --workers 0 2
    python benchmarks/score.py CKPT --shards 8      # + the same JPEGs in 8 tar shards (WebDataset's format)
    python benchmarks/score.py CKPT --shards 8 --ray   # + the Ray engine on both (pip install "qmamba[ray]")
    python benchmarks/score.py CKPT --precision fp32 bf16   # each row in both precisions (score --precision)

For each checkpoint and each ``--workers`` value, in one process: the data floor (decode and crop every file the
way the checkpoint's evaluation does, through the same DataLoader, no model) and the scoring loop of ``qmamba
score`` (``qmamba.load(...).iter_batches(files, workers)``: decode, crops, batched forward, score mapping), as
img/s; "x floor" is the scoring time over the floor's. With ``--shards N`` the same JPEGs are also written into N tar
shards and scored as their members (``qmamba.inference.sources.expand``), so loose files and shards compare in one
run. With ``--ray`` each source is also scored by the Ray engine's pipeline (``qmamba score --engine ray`` without
its Parquet parts) on a cluster of this machine, against the local engine with one decoding worker (the same
shape: one core decodes while the model runs). Then the start-up of ``qmamba --help`` and ``qmamba score
--help`` in fresh processes. The JPEGs are synthetic photographs (smooth gradients and blocky texture) written once
to --workdir, in KonIQ-10k's layout with random MOS, so that ``--tiny`` can train QMamba-T (224 px crops) for one
step through the real CLI: its scores are meaningless, its speed is QMamba-T's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

import qmamba
import qmamba.inference.scoring
from qmamba.heap import keep_freed_memory

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



def make_shards(root: Path, paths: list[str], shards: int) -> list[str]:
    """The JPEGs in ``shards`` tar files (WebDataset's layout: member ``<key>.jpg``); their member keys."""
    import tarfile

    from qmamba.inference.sources import expand

    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        shard = root / f"{s:06d}.tar"
        if not shard.exists():
            with tarfile.open(shard, "w") as archive:
                for path in paths[s::shards]:
                    archive.add(path, arcname=Path(path).name)
    keys, missing = expand([str(root / f"{{{0:06d}..{shards - 1:06d}}}.tar")])
    assert not missing and len(keys) == len(paths)
    return keys


def data_floor(scorer: qmamba.inference.scoring.Scorer, paths: list[str], workers: int) -> float:
    """Seconds to decode and crop ``paths`` as the scorer does, without the model."""
    start = time.perf_counter()
    for batch in _prepared(scorer, paths, workers):
        assert all(item.error is None for item in batch), batch
    return time.perf_counter() - start


def _prepared(scorer: qmamba.inference.scoring.Scorer, paths: list[str], workers: int):
    from qmamba.inference.scoring import Preparer, _as_list, _Decoded, _init_worker

    prepare = Preparer(scorer.crops, scorer.max_side)
    if not workers:
        return ([prepare(i, p)] for i, p in enumerate(paths))
    return torch.utils.data.DataLoader(_Decoded(paths, prepare), batch_size=scorer.batch_size, num_workers=workers,
                                       collate_fn=_as_list, worker_init_fn=_init_worker, prefetch_factor=4)


def scoring(scorer: qmamba.inference.scoring.Scorer, paths: list[str], workers: int) -> float:
    """Seconds for ``qmamba score``'s loop over ``paths``."""
    start = time.perf_counter()
    for batch in scorer.iter_batches(paths, workers=workers):
        assert all(r.error is None for r in batch), batch
    return time.perf_counter() - start


def ray_engine(ckpt: Path, inputs: list[str], count: int, batch_size: int, device: str, precision: str
               ) -> tuple[float, float, float]:
    """``qmamba score --engine ray``'s pipeline over ``inputs`` on the Ray session of this process (shards named
    whole, as the engine reads them: one task each): img/s from the driver's checks to the last row, seconds to the
    first row (the workers' start: they import torch and load the model), and img/s after it (nan when every row
    came in the first block)."""
    from qmamba.inference.ray_data import RayScorer
    from qmamba.inference.sources import expand

    start = time.perf_counter()
    items, missing = expand(inputs, list_shards=False)
    assert not missing, missing
    scorer = RayScorer(ckpt, batch_size=batch_size, gpus_per_worker=1.0 if device.startswith("cuda") else 0.0,
                       precision=precision)
    rows, first = 0, None
    for table in scorer.score_inputs(items, set()).iter_batches(batch_size=None, batch_format="pyarrow"):
        assert table["error"].null_count == table.num_rows, table["error"]
        first = first or (time.perf_counter(), table.num_rows)
        rows += table.num_rows
    end = time.perf_counter()
    assert first is not None and rows == count, (rows, count)
    then = (rows - first[1]) / (end - first[0]) if rows > first[1] else float("nan")  # nan: all came at once
    return rows / (end - start), first[0] - start, then


def startup(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qmamba", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="qmamba checkpoints to score with")
    parser.add_argument("--tiny", action="store_true", help="also a QMamba-T checkpoint (one training step)")
    parser.add_argument("--images", type=int, default=2000, help="JPEGs scored per checkpoint")
    parser.add_argument("--tiny-images", type=int, default=64, help="JPEGs for QMamba-T (about 2 img/s on 2 cores)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass, as qmamba score's default")
    parser.add_argument("--workdir", type=Path, default=Path("runs/benchmark_score"))
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda on a GPU machine)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "auto"],
                        help="qmamba score --precision values, each measured")
    parser.add_argument("--shards", type=int, default=0, help="also score the JPEGs from this many tar shards")
    parser.add_argument("--ray", action="store_true", help="also the Ray engine (a Ray cluster of this machine) on "
                        "each source, against the local engine with one decoding worker")
    args = parser.parse_args()
    keep_freed_memory()  # as the qmamba command's process runs

    if not args.checkpoints and not args.tiny:
        parser.error("give a checkpoint or --tiny")
    paths = make_jpegs(args.workdir / "jpegs", max(args.images, args.tiny_images))
    runs = [(Path(c), args.images) for c in args.checkpoints]
    runs += [(tiny_checkpoint(args.workdir), args.tiny_images)] if args.tiny else []
    if args.ray:
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_start = time.perf_counter() - start
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, model on {args.device} ({where}), {os.cpu_count()} cores, JPEGs of 1024x768, "
          f"batch {args.batch_size}")
    print(f"| {'model':<12} | {'precision':>9} | {'crops':>9} | {'images':>6} | {'source':>10} | {'workers':>7} | "
          f"{'data floor img/s':>16} | {'score img/s':>11} | {'x floor':>7} |")
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 12}|{'-' * 9}|{'-' * 18}|{'-' * 13}|{'-' * 9}|")
    engines = []  # (model, source, local img/s with one worker, Ray img/s)
    for (ckpt, count), precision in ((run, p) for run in runs for p in args.precision):
        scorer = qmamba.load(ckpt, device=args.device, batch_size=args.batch_size, precision=precision)
        sources = {"loose": (paths[:count], paths[:count])}
        if args.shards:
            shard_folder = args.workdir / f"shards_{count}"
            keys = make_shards(shard_folder, paths[:count], args.shards)
            sources[f"{args.shards} shards"] = (keys, [str(shard_folder / f"{{000000..{args.shards - 1:06d}}}.tar")])
        scoring(scorer, paths[: 2 * args.batch_size], 0)  # warm-up: kernel compilation, allocator, page cache
        for source, (files, inputs) in sources.items():
            data_floor(scorer, files, 0)  # the page cache
            for workers in args.workers:
                floor, scored = data_floor(scorer, files, workers), scoring(scorer, files, workers)
                crops = f"{scorer.crops.count}x{scorer.crops.size}"
                print(f"| {scorer.info['backbone']:<12} | {scorer.info['precision']:>9} | {crops:>9} | {count:>6} | "
                      f"{source:>10} | {workers:>7} | "
                      f"{count / floor:>16.1f} | {count / scored:>11.1f} | {scored / floor:>7.2f} |", flush=True)
            if args.ray:
                local = count / scoring(scorer, files, 1)
                engines.append((f"{scorer.info['backbone']} {scorer.info['precision']}", source, local, *ray_engine(
                    ckpt, inputs, count, args.batch_size, args.device, precision)))
    if args.ray:
        print(f"\nRay engine on a cluster of this machine (started once, in {ray_start:.1f} s) against the local "
              "engine with 1 decoding worker: img/s of the whole run (from the driver's checks to the last row), "
              "seconds to the first row (workers starting), img/s after it, and the ratios to the local engine:")
        print(f"| {'model':<17} | {'source':>10} | {'local img/s':>11} | {'Ray img/s':>9} | {'first row s':>11} | "
              f"{'then img/s':>10} | {'Ray / local':>11} | {'then / local':>12} |")
        print(f"|{'-' * 19}|{'-' * 12}|{'-' * 13}|{'-' * 11}|{'-' * 13}|{'-' * 12}|{'-' * 13}|{'-' * 14}|")
        for model, source, local, whole, first, then in engines:
            print(f"| {model:<17} | {source:>10} | {local:>11.1f} | {whole:>9.1f} | {first:>11.1f} | {then:>10.1f} | "
                  f"{whole / local:>11.2f} | {then / local:>12.2f} |")
    print(f"\nstart-up: `qmamba --help` {startup('--help'):.2f} s, `qmamba score --help` "
          f"{startup('score', '--help'):.2f} s, `qmamba --version` {startup('--version'):.2f} s")


if __name__ == "__main__":
    main()
