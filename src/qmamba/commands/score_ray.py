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
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

from qmamba.commands.score_parts import score_into_parts
from qmamba.errors import UsageError
from qmamba.inference.sources import Shard, shard_of
from qmamba.redaction import without_password

__all__ = ["check_reachable", "check_resources", "run"]

# the driver's object-store settings and credentials, given to the tasks that read images so that they read the
# buckets the driver checked (a cluster whose nodes hold their own credentials needs none of them)
FORWARDED_ENVIRONMENT = ("AWS_", "GOOGLE_", "AZURE_", "FSSPEC_")
_RAY_TOKEN_SETUP = "ray._private.authentication.authentication_token_setup"  # the logger of Ray's notice below


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
                           sha256=args.sha256, precision=args.precision, compile=args.compile,
                           concurrency=args.concurrency,
                           gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                           limits=args.limits)
        return scorer

    def batches(scored: set[str]) -> Iterator[Any]:
        todo = [i for i in items if isinstance(i, Shard) or i not in scored]
        if not todo:
            return
        ray.data.DataContext.get_current().enable_progress_bars = False  # qmamba's own line says how far it is
        forwarded = TaskEnvironment({k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENVIRONMENT)})
        yield from scorer.score_inputs(todo, scored, forwarded, args.limits).iter_batches(  # type: ignore[union-attr]
            batch_size=None, batch_format="pyarrow")

    names = {str(i) for i in items}
    shards = {without_password(i) for i in items if isinstance(i, Shard)}  # as member keys name them
    connected = ray.is_initialized()  # called from Python that holds a Ray session: use it
    address = args.address or os.environ.get("RAY_ADDRESS")
    # a cluster of this machine started for this run keeps its session (logs, sockets) in a folder of its own, where
    # Ray would put /tmp/ray (RAY_TMPDIR, TMPDIR, /tmp), removed when the run ends; Ray leaves its sessions otherwise
    session = None if connected or address else tempfile.mkdtemp(prefix="qmamba-ray-", dir=os.environ.get("RAY_TMPDIR"))
    try:
        if not connected:  # the cluster is reached, or refused, before the output is created or the model loaded
            check_reachable(address, args.limits.timeout)
            if session:
                logging.getLogger(_RAY_TOKEN_SETUP).addFilter(_without_default_token_notice)
            ray.init(address=address, logging_level=logging.WARNING, **({"_temp_dir": session} if session else {}))
            stop.install()  # ray.init took SIGTERM
        check_resources(ray.cluster_resources(), args, address=address or "started for this run")
        score_into_parts(args, errors, describe, batches,
                         lambda key: key in names or shard_of(key, shards) is not None, stop, progress)
    finally:
        if not connected:
            ray.shutdown()
        if session:
            shutil.rmtree(session, ignore_errors=True)


def _without_default_token_notice(record: logging.LogRecord) -> bool:
    """Drop Ray's notice that a new local cluster uses token authentication, its default: Ray gives it the first time
    a process starts one, so a run on a cluster started for it began with a warning line about nothing to fix (and
    a refused output was two lines, not one)."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def check_reachable(address: str | None, timeout: float) -> None:
    """Open and close a TCP connection to the head node of ``address`` (``host:port`` or ``ray://host:port``)
    within ``timeout`` seconds: Ray's own connect waits for a cluster that is not there for minutes. ``auto`` and no
    address (a cluster of this machine) need no check."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: name the head node as host:port (its GCS, 6379 by default) or "
                         "ray://host:port (Ray Client, 10001), or auto for a cluster of this machine")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise UsageError(f"--address {address}: cannot reach the Ray cluster ({reason} within {timeout:g} s, "
                         "--timeout); is its head node running (ray start --head) and is the port open?") from None


def check_resources(resources: dict[str, float], args: argparse.Namespace, address: str) -> None:
    """Refuse actors the cluster can never place (Ray would wait for them forever, warning after a minute)."""
    for option, kind, wanted in (("--gpus-per-worker", "GPU", args.gpus_per_worker),
                                 ("--cpus-per-worker", "CPU", args.cpus_per_worker)):
        have = resources.get(kind, 0.0)
        if wanted > have:
            fix = "0 scores on CPUs" if kind == "GPU" else f"at most {have:g}"
            raise UsageError(f"{option} {wanted:g}: the Ray cluster ({address}) has {have:g} {kind}s in all, so no "
                             f"scoring actor could ever start; use a cluster with {kind}s or {option} {fix}")
