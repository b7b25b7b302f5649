"""``qmamba score --engine ray``: the same scores from a Ray cluster, written as Parquet parts to a folder or bucket.

    qmamba score --engine ray --ckpt_path best.ckpt 'shards/{000000..000999}.tar' -o scores/
    ray job submit --address http://head:8265 -- qmamba score --engine ray --ckpt_path best.ckpt \\
        --gpus-per-worker 1 --concurrency 8 's3://bucket/shards/{000000..099999}.tar' -o s3://bucket/scores/

This process, the driver, has the inputs expanded by ``qmamba score`` (tables read, folders walked, the first header
of every shard read: a missing shard or a bucket without credentials is one line before any work), checks the
output and the checkpoint, reads the keys an earlier run wrote, and starts the pipeline of
:mod:`qmamba.inference.ray_data`: one reading task per shard (streamed once) or per batch of files, decoding in CPU
tasks, the model in an actor pool.
It then only collects rows (a key and a score: the images never pass through it) and writes them as parts
(:func:`qmamba.commands.score_parts.score_into_parts`).

Failures: Ray restarts a killed scoring actor and retries its batch; a killed driver loses at most the rows not yet in
a part, and rerunning the same command scores exactly those (every key once in the output). SIGINT and SIGTERM
write what has arrived and exit 130 / 143.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from typing import Any

from qmamba.commands.score_parts import score_into_parts
from qmamba.inference.sources import Shard, shard_of

__all__ = ["run"]

# the driver's object-store settings and credentials, given to the tasks that read images so that they read the
# buckets the driver checked (a cluster whose nodes hold their own credentials needs none of them)
FORWARDED_ENVIRONMENT = ("AWS_", "GOOGLE_", "AZURE_", "FSSPEC_")


def run(args: argparse.Namespace, items: list[str], errors: list[tuple[str, str]], stop: Any, progress: Any) -> None:
    """Score ``items`` (row keys and :class:`~qmamba.inference.sources.Shard` objects, each once) on Ray into the
    parts folder ``args.output``; ``errors`` are the inputs that led nowhere, ``stop`` catches SIGINT and SIGTERM (its
    ``signal`` is set), ``progress`` counts the images."""
    from qmamba.inference.ray_data import RayScorer, TaskEnvironment, import_ray

    ray = import_ray()
    scorer: RayScorer | None = None

    def describe() -> RayScorer:
        nonlocal scorer
        scorer = RayScorer(args.ckpt_path, crops=args.crops, dataset=args.dataset, batch_size=args.batch_size,
                           max_side=args.max_side, clip=args.clip, trusted=args.trust_checkpoint,
                           compile=args.compile, concurrency=args.concurrency,
                           gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker)
        return scorer

    def batches(scored: set[str]) -> Iterator[Any]:
        todo = [i for i in items if isinstance(i, Shard) or i not in scored]
        if not todo:
            return
        connected = ray.is_initialized()  # called from Python that holds a Ray session: use it
        if not connected:
            ray.init(address=args.address, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False  # qmamba's own line says how far it is
        forwarded = TaskEnvironment({k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENVIRONMENT)})
        try:
            yield from scorer.score_inputs(todo, scored, forwarded, args.limits).iter_batches(  # type: ignore[union-attr]
                batch_size=None, batch_format="pyarrow")
        finally:
            if not connected:
                ray.shutdown()

    names = {str(i) for i in items}
    shards = {str(i) for i in items if isinstance(i, Shard)}
    score_into_parts(args, errors, describe, batches, lambda key: key in names or shard_of(key, shards) is not None,
                     stop, progress)
