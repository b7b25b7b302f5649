"""``qmamba score --engine ray``: the same scores from a Ray cluster, written as Parquet parts to a folder or bucket.

    qmamba score --engine ray --ckpt_path best.ckpt 'shards/{000000..000999}.tar' -o scores/
    ray job submit --address http://head:8265 -- qmamba score --engine ray --ckpt_path best.ckpt \\
        --gpus-per-worker 1 --concurrency 8 's3://bucket/shards/{000000..099999}.tar' -o s3://bucket/scores/

This process, the driver, expands the inputs (tables read, folders walked, the first header of every shard read: a
missing shard, a bucket without credentials or an unwritable output is one line before any work), checks the
checkpoint, reads the keys an earlier run wrote, and starts the pipeline of :mod:`qmamba.inference.ray_data`: one
reading task per shard (streamed once) or per batch of files, decoding in CPU tasks, the model in an actor pool.
It then only collects rows (a key and a score: the images never pass through it) and writes them as parts of
``--part-rows`` rows, or of what arrived in the last minute (:mod:`qmamba.commands.score_parts`).

Failures: Ray restarts a killed scoring actor and retries its batch; a killed driver loses at most the rows not yet in
a part, and rerunning the same command scores exactly those (every key once in the output). SIGINT and SIGTERM
write what has arrived and exit 130 / 143.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from qmamba.commands.score_outputs import is_utf8
from qmamba.commands.score_parts import PartsOutput
from qmamba.inference.sources import Shard, expand

__all__ = ["run"]

# the driver's object-store settings and credentials, given to the job's workers so that they read the buckets the
# driver checked (a cluster whose nodes hold their own credentials needs none of them)
FORWARDED_ENVIRONMENT = ("AWS_", "GOOGLE_", "AZURE_", "FSSPEC_")
PART_SECONDS = 60.0  # a part is written at least this often while rows arrive
SHOWN_ERRORS = 20  # failures printed at the end; all are in the error parts


def run(args: argparse.Namespace, inputs: list[str], stop: Any, progress: Any) -> None:
    """Score ``inputs`` on Ray into the parts folder ``args.output``; ``stop`` catches SIGINT and SIGTERM (its
    ``signal`` is set), ``progress`` counts the images."""
    from qmamba.inference.ray_data import RayScorer, import_ray

    ray = import_ray()
    items, errors = expand(inputs, args.column, list_shards=False)
    items = list(dict.fromkeys(items))
    errors += [(i, "the Ray engine needs UTF-8 names (Arrow strings); score it with the local engine")
               for i in items if not is_utf8(i)]
    items = [i for i in items if is_utf8(i)]
    output = PartsOutput(args.output)
    try:
        scorer = RayScorer(args.ckpt_path, crops=args.crops, dataset=args.dataset, batch_size=args.batch_size,
                           max_side=args.max_side, clip=args.clip, trusted=args.trust_checkpoint,
                           compile=args.compile, concurrency=args.concurrency,
                           gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker)
        scored = output.scored()
        todo = [i for i in items if isinstance(i, Shard) or i not in scored]
        if scored:
            print(f"qmamba score: resuming {args.output}: {len(scored)} images already scored", file=sys.stderr)
        written, failed = _collect(ray, scorer, todo, scored, output, args, stop, progress)
        failed += errors
        output.write(_error_rows(errors))
        if stop.signal is None:
            scale = scorer.described.scale
            output.finish({"model": scorer.info, "score_range": [scale.low, scale.high],
                           "direction": scale.direction, "scored": len(scored) + written, "errors": len(failed)})
    finally:
        output.unlock()
    _report(args, scorer, written, failed, stop.signal)


def _collect(ray: Any, scorer: Any, todo: list[str], scored: set[str], output: PartsOutput,
             args: argparse.Namespace, stop: Any, progress: Any) -> tuple[int, list[tuple[str, str]]]:
    """Run the pipeline and write its rows as parts until it ends or a signal arrives; the number of scores
    written and the failures."""
    if not todo:
        return 0, []
    import pyarrow as pa

    connected = ray.is_initialized()  # called from Python that holds a Ray session: use it
    if not connected:
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENVIRONMENT)}
        ray.init(address=args.address, logging_level=logging.WARNING, runtime_env={"env_vars": forwarded})
    ray.data.DataContext.get_current().enable_progress_bars = False  # qmamba's own line says how far it is
    seen = set(scored)
    pending: list[pa.Table] = []
    written, failed, last = 0, [], time.monotonic()
    try:
        for table in scorer.score_inputs(todo, scored).iter_batches(batch_size=None, batch_format="pyarrow"):
            new = [k not in seen for k in table["path"].to_pylist()]  # a retried batch's rows, never twice
            table = table.filter(pa.array(new, pa.bool_()))
            seen.update(table["path"].to_pylist())
            pending.append(table)
            progress.update(table.num_rows)
            if sum(t.num_rows for t in pending) >= args.part_rows or time.monotonic() - last >= PART_SECONDS:
                written, failed = _flush(output, pending, written, failed)
                last = time.monotonic()
            if stop.signal is not None:
                break
        written, failed = _flush(output, pending, written, failed)
    finally:
        progress.close()
        if not connected:
            ray.shutdown()
    return written, failed


def _flush(output: PartsOutput, pending: list[Any], written: int, failed: list[tuple[str, str]]
           ) -> tuple[int, list[tuple[str, str]]]:
    import pyarrow as pa

    if pending:
        table = pa.concat_tables(pending)
        output.write(table)
        errors = table.filter(table["error"].is_valid())
        written += table.num_rows - errors.num_rows
        failed = failed + list(zip(errors["path"].to_pylist(), errors["error"].to_pylist(), strict=True))
        pending.clear()
    return written, failed


def _error_rows(errors: list[tuple[str, str]]) -> Any:
    """Inputs that lead nowhere as error rows (names kept readable where they are not UTF-8)."""
    import pyarrow as pa

    paths = [os.fsencode(p).decode("utf-8", "backslashreplace") for p, _ in errors]
    return pa.table({"path": pa.array(paths, pa.string()), "score": pa.array([None] * len(errors), pa.float64()),
                     "flag": pa.array([None] * len(errors), pa.string()),
                     "error": pa.array([e for _, e in errors], pa.string())})


def _report(args: argparse.Namespace, scorer: Any, written: int, failed: list[tuple[str, str]],
            signal_number: int | None) -> None:
    for path, error in failed[:SHOWN_ERRORS]:
        print(f"qmamba score: skipped {path}: {error}", file=sys.stderr)
    if len(failed) > SHOWN_ERRORS:
        print(f"qmamba score: ... and {len(failed) - SHOWN_ERRORS} more, each with its reason in the errors-*.parquet "
              f"parts of {args.output}", file=sys.stderr)
    if signal_number is not None:
        import signal

        print(f"qmamba score: {signal.Signals(signal_number).name}: {written} scores written to {args.output} (the "
              "run stopped early; rerun the same command to resume)", file=sys.stderr)
        raise SystemExit(128 + signal_number)
    scale = scorer.described.scale
    print(f"qmamba score: {written} scored, {len(failed)} skipped to {args.output} ({scorer.described.dataset} scale "
          f"{scale.low:g}-{scale.high:g}, {scale.direction})", file=sys.stderr)
    if failed:
        raise SystemExit(1)


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options that mean nothing to the engine chosen are refused, not ignored."""
    ray_only = {"address": None, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0, "concurrency": 1,
                "part_rows": 10_000}
    if args.engine != "ray":
        for name, default in ray_only.items():
            if getattr(args, name) != default:
                parser.error(f"--{name.replace('_', '-')} applies to --engine ray only")
        return
    local_only = {"maps": None, "devices": 1, "num_nodes": 1, "workers": None, "device": None}
    for name, default in local_only.items():
        if getattr(args, name) != default:
            hint = {"device": " (use --gpus-per-worker)", "devices": " (use --concurrency)",
                    "num_nodes": " (Ray spreads the work over its cluster)",
                    "workers": " (Ray decodes in its CPU tasks)"}.get(name, "")
            parser.error(f"--{name.replace('_', '-')} applies to the local engine only{hint}")
    if not args.output:
        parser.error("--engine ray needs --output: a folder or bucket prefix for its Parquet parts (-o scores/)")
    if args.output.lower().endswith((".csv", ".jsonl", ".json")):
        parser.error(f"--engine ray writes Parquet parts into a folder or bucket prefix, not {args.output}: name a "
                     "folder such as scores/")
    if args.part_rows < 1 or args.concurrency < 1 or args.gpus_per_worker < 0 or args.cpus_per_worker <= 0:
        parser.error("--part-rows and --concurrency must be >= 1, --gpus-per-worker >= 0, --cpus-per-worker > 0")
