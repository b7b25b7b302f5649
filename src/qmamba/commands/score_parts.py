"""A folder or bucket prefix of Parquet parts: where ``qmamba score`` writes when ``--output`` is a URI or ends with
``/``, and always with ``--engine ray``, as the rows arrive.

    scores/part-20261202T071500-3f2a-000000.parquet   path, score, flag, error (error null): the scored images
    scores/errors-20261202T071500-3f2a-000001.parquet the images that could not be scored, with the reason
    scores/_qmamba.json                               the model, the scale and the counts, once the run is complete

Every part records what scored it in its Parquet metadata (``qmamba``: the checkpoint's SHA-256, the dataset whose
scale the scores are on, the crops, ``max_side`` and ``clip``). A rerun resumes only from parts whose record is its
own and whose keys are among its inputs; a folder holding anything else (another model's parts, files qmamba did
not write) is one line naming it before any work, and nothing in it is touched.

Any reader of Parquet datasets reads the folder as one table (``pyarrow.parquet.read_table("scores/")``,
``ray.data.read_parquet``, Spark, DuckDB's ``'scores/*.parquet'``): names starting with ``_`` or ``.`` are not data.

Each part is written whole before it has its name: on a file system as a hidden temporary file renamed into place,
on an object store as one upload, which the store publishes only when it completes. So a killed run leaves whole
parts and nothing else that counts, and a rerun of the same command reads the keys its parts hold and scores the
rest. Error parts are deleted by a rerun, whose images are tried again, as in the local engine. A local folder is
locked for the run's life; a bucket prefix cannot be, so two runs must not share one.

:func:`score_into_parts` is such a run for either engine: the engine says what the model is and yields its rows as
Arrow tables (:func:`qmamba.inference.scoring.results_table`); the run writes them as parts of ``--part-rows`` rows
or of what arrived in the last minute, drops a key it has already written (a batch an engine retried), stops at a
signal after writing what arrived, and marks the output complete.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from qmamba.commands.score_outputs import is_utf8, refuse_link
from qmamba.errors import QMambaError, UsageError
from qmamba.files.atomic import atomic_writer
from qmamba.files.run_folder import ProcessLock
from qmamba.files.weights import file_sha256
from qmamba.inference.sources import is_uri
from qmamba.redaction import without_password

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["PART_ROWS", "PartsOutput", "arrow_keys", "is_folder_output", "score_into_parts", "scored_as"]

SUMMARY = "_qmamba.json"
LOCK = ".qmamba.lock"
RECORD = b"qmamba"  # the key of a part's Parquet metadata that records what scored its rows
PART_ROWS = 10_000  # rows per part at most, by default (--part-rows)
PART_SECONDS = 60.0  # a part is written at least this often while rows arrive
SHOWN_ERRORS = 20  # failures printed at the end; all are in the error parts


def arrow_keys(keys: list[str], errors: list[tuple[str, str]]) -> list[str]:
    """The keys a Parquet part can hold; a name that is not UTF-8 (a POSIX name's bytes) cannot be an Arrow string
    and joins ``errors``."""
    errors += [(k, "a name that is not UTF-8 cannot be a Parquet string; write a .csv or .jsonl output with the "
                   "local engine") for k in keys if not is_utf8(k)]
    return [k for k in keys if is_utf8(k)]


def is_folder_output(output: str | None) -> bool:
    """An ``--output`` written as Parquet parts: a URI (a bucket prefix) or a name ending with ``/``."""
    return bool(output) and (is_uri(output) or output.endswith("/"))  # type: ignore[union-attr]


class PartsOutput:
    """A folder of Parquet parts at a local path or an fsspec URI, checked writable on creation."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = _filesystem(url)
        self.local = not is_uri(url) or url.startswith("file://")
        self.run = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        self.parts = 0
        self.lock: ProcessLock | None = None
        if self.fs.isfile(self.root):
            raise UsageError(f"--output {url} is a file; a folder or bucket output holds Parquet parts (name a "
                             "folder or prefix, such as scores/)")
        self.created = not self.fs.exists(self.root)  # removed again if it cannot be written
        if self.local:
            refuse_link(Path(self.root), "--output")  # a folder's parts would land wherever the link points
            self.lock = ProcessLock(Path(self.root) / LOCK, f"--output {url}", "write to another --output")
            try:
                self.lock.acquire()  # creates the folder too, and shows that it can be written
            except OSError as err:
                raise UsageError(f"cannot write --output {url}: {err.strerror or err} (choose a writable "
                                 "folder)") from None
        else:
            self._check_writable()
        entries = self._entries()
        links = [name for entry, name in entries if self.local and os.path.islink(entry)]
        foreign = [name for _, name in entries if not _is_own(name)]
        if links or foreign:
            self.abandon()
            if links:
                raise UsageError(f"--output {url} holds {links[0]}, a symbolic link; qmamba score neither reads nor "
                                 "writes through links in its output (remove it)")
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise UsageError(f"--output {url} holds {', '.join(sorted(foreign)[:3])}{more}, which qmamba score did not "
                             "write; a folder output holds only its parts: name a new or empty folder or prefix")
        self.record: dict[str, Any] = {}

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _entries(self) -> list[tuple[str, str]]:
        """(path, name) of everything in the folder."""
        if not self.fs.isdir(self.root):
            return []
        return [(entry, entry.rstrip("/").rsplit("/", 1)[-1]) for entry in self.fs.ls(self.root, detail=False)]

    def _check_writable(self) -> None:
        """Write and delete a small object: a bucket without write access or without credentials is one line now,
        not after the first scores."""
        probe = self._path(f".qmamba-probe-{self.run}")
        try:
            with self.fs.open(probe, "wb") as f:
                f.write(b"qmamba")
            self.fs.rm(probe)
        except Exception as err:  # noqa: BLE001 - each fsspec backend raises its own (PermissionError, botocore, ...)
            self.abandon()
            raise UsageError(f"cannot write --output {self.url}: {_reason(err)} (choose a writable folder or bucket, "
                             "with credentials that may write to it)") from None

    def scored(self, record: dict[str, Any], among_inputs: Callable[[str], bool]) -> set[str]:
        """The keys with a score in the parts an earlier run left, once every part and summary there is shown to
        be ``record``'s (what this run scores with, which every part it writes records) and every key to be
        ``among_inputs``; then the earlier run's error parts, leftover temporary files and summary are removed
        (failed images are tried again, and the output is incomplete until this run ends)."""
        import pyarrow.parquet as pq

        self.record = record
        keys: set[str] = set()
        stale = []
        for entry, name in self._entries():
            if name.startswith(("part-", "errors-")) and name.endswith(".parquet"):
                try:
                    table = pq.read_table(entry, columns=["path", "score"], filesystem=self.fs)
                except Exception as err:  # noqa: BLE001 - pyarrow's errors for a file that is no Parquet
                    raise UsageError(f"--output {self.url}: {name} is not a Parquet part of qmamba score ({err}); "
                                     "move it out of the folder and rerun") from None
                metadata = table.schema.metadata or {}
                self._check_record(name, json.loads(metadata[RECORD]) if RECORD in metadata else None)
                if name.startswith("part-"):
                    keys.update(k for k, s in zip(table["path"].to_pylist(), table["score"].to_pylist(),
                                                  strict=True) if s is not None)
                else:
                    stale.append(entry)
            elif name == SUMMARY:
                try:
                    summary = json.loads(self.fs.cat_file(entry))
                except ValueError:
                    summary = {}
                self._check_record(name, summary.get("record") if isinstance(summary, dict) else None)
                stale.append(entry)
            elif _is_temporary(name):
                stale.append(entry)
        strangers = [key for key in keys if not among_inputs(key)]
        if strangers:
            raise UsageError(f"--output {self.url} holds scores of {len(strangers)} images that are not among this "
                             f"run's inputs ({sorted(strangers)[0]}, ...); a run resumes only its own output: give "
                             "the same inputs, or write to another --output")
        for entry in stale:
            self.fs.rm(entry)
        return keys

    def _check_record(self, name: str, found: dict[str, Any] | None) -> None:
        if found == self.record:
            return
        if found is None:
            what = "which has no record of what scored it (written by another program, or by an older qmamba)"
        else:
            shown = {"checkpoint_sha256": lambda digest: f"{str(digest)[:12]}..."}
            what = "scored with " + ", ".join(
                f"{key} {shown.get(key, str)(found.get(key))} (this run: {shown.get(key, str)(value)})"
                for key, value in self.record.items() if found.get(key) != value)
        raise UsageError(f"--output {self.url} holds {name}, {what}; a run resumes only its own parts: write to "
                         "another --output")

    def write(self, table: pa.Table) -> None:
        """The rows with a score as one part, those with an error as another, each with this run's record."""
        import pyarrow.compute as pc

        table = table.replace_schema_metadata({**(table.schema.metadata or {}), RECORD: json.dumps(self.record)})
        failed = pc.is_valid(table["error"])
        for prefix, rows in (("part", table.filter(pc.invert(failed))), ("errors", table.filter(failed))):
            if rows.num_rows:
                self._write_part(f"{prefix}-{self.run}-{self.parts:06d}.parquet", rows)
                self.parts += 1

    def _write_part(self, name: str, rows: pa.Table) -> None:
        import pyarrow.parquet as pq

        self._publish(name, lambda f: pq.write_table(rows, f))

    def _publish(self, name: str, write: Callable[[IO[bytes]], object]) -> None:
        """``name`` written whole or not at all: one upload to an object store (an object appears only when its
        upload completes), on a file system a hidden temporary file (a random name, created exclusively) renamed
        into place, which replaces a link planted at the name instead of writing through it."""
        if self.local:
            with atomic_writer(self._path(name)) as f:
                write(f)
            return
        try:
            with self.fs.open(self._path(name), "wb") as f:
                write(f)
        except Exception as err:  # noqa: BLE001 - a store that refuses one key (a policy per prefix) or went away
            raise QMambaError(f"cannot write {self._path(name)} to --output {self.url}: {_reason(err)}; the parts "
                              "written before it are kept: rerun the same command once it can be written") from None

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the output complete: ``_qmamba.json`` with the model, the scale and the counts."""
        self._publish(SUMMARY, lambda f: f.write(json.dumps(summary, indent=2).encode() + b"\n"))

    def abandon(self) -> None:
        """The run could not start: unlock, and remove the folder if this run created it."""
        self.unlock()
        if self.created and self.local:
            Path(self.root).rmdir()

    def unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _reason(err: Exception) -> str:
    """An object store's refusal in one line (fsspec backends raise OSError subclasses or their own types)."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
    return reason.splitlines()[0]


def _is_own(name: str) -> bool:
    """A name that :class:`PartsOutput` writes."""
    return (name.startswith(("part-", "errors-")) and name.endswith(".parquet")) or name in (SUMMARY, LOCK) \
        or name.startswith(".qmamba-probe-") or _is_temporary(name)


def _is_temporary(name: str) -> bool:
    """A temporary file of :meth:`PartsOutput._publish` that a killed run left (nothing else in the folder is
    touched)."""
    return name.endswith(".tmp") and name.startswith((".part-", ".errors-", f".{SUMMARY}"))


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system and path of an output folder (a local path needs fsspec too: the Ray extra has it)."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise UsageError(f'writing --output {url} needs fsspec: pip install "qmamba[ray]"') from None
    try:
        fs, root = url_to_fs(url)
    except (ImportError, ValueError) as err:  # fsspec names the package of an unknown protocol
        raise UsageError(f"--output {url}: {err}") from None
    if not is_uri(url):
        root = os.path.abspath(root)
    return fs, root


def score_into_parts(args: argparse.Namespace, errors: list[tuple[str, str]], describe: Callable[[], Any],
                     batches: Callable[[set[str]], Iterator[pa.Table]], among_inputs: Callable[[str], bool],
                     stop: Any, progress: Any) -> None:
    """Score into the parts folder ``args.output``: ``describe()`` checks the model and returns its
    :class:`~qmamba.inference.scoring.Scorer` (or what has its ``info``, ``scale`` and ``dataset``), ``batches(scored)``
    yields the rows of every image not in ``scored``; ``among_inputs(key)`` says whether a key an earlier run
    scored is one of this run's images; ``errors`` are the inputs that led nowhere. ``stop`` catches SIGINT and
    SIGTERM (its ``signal`` is set), ``progress`` counts the images."""
    output = PartsOutput(args.output)
    try:
        scorer = describe()
    except BaseException:
        output.abandon()
        raise
    try:
        record = scoring_record(args, scorer)
        scored = output.scored(record, among_inputs)
        if scored:
            print(f"qmamba score: resuming {args.output}: {len(scored)} images already scored", file=sys.stderr)
        written, failed = _collect(batches(scored), scored, output, args.part_rows, stop, progress)
        failed += errors
        output.write(_error_rows(errors))
        if stop.signal is None:
            output.finish({"model": scorer.info, **scorer.scale.as_header(), "scored": len(scored) + written,
                           "errors": len(failed), "record": record})
    finally:
        output.unlock()
    _report(args, scorer, written, failed, stop.signal)


def scoring_record(args: argparse.Namespace, scorer: Any) -> dict[str, Any]:
    """What the scores of a run depend on: the weights (the checkpoint's SHA-256, not its path: a copy resumes),
    the dataset whose scale they are on, the crops, ``max_side``, ``clip`` and the precision (bf16 scores differ
    from fp32's in their last digits: a resume never mixes them)."""
    info = scorer.info
    return {"checkpoint_sha256": file_sha256(scorer.weights), "dataset": scorer.dataset,
            "score_range": [scorer.scale.low, scorer.scale.high], "crops": info["crops"],
            "crop_size": info["crop_size"], "max_side": info["max_side"], "clip": bool(args.clip),
            "precision": info["precision"]}


def scored_as(scorer: Any) -> str:
    """What the numbers of a run are, for its last line: the dataset's scale in words and the precision."""
    return f"{scorer.dataset} scale: {scorer.scale.describe()}; {scorer.info['precision']}"


def _collect(tables: Iterator[pa.Table], scored: set[str], output: PartsOutput, part_rows: int, stop: Any,
             progress: Any) -> tuple[int, list[tuple[str, str]]]:
    """Write the engine's rows as parts until they end or a signal arrives; the scores written and the failures."""
    import pyarrow as pa

    seen = set(scored)
    pending: list[pa.Table] = []
    written, failed, last = 0, [], time.monotonic()
    try:
        for table in tables:
            keys = table["path"].to_pylist()
            new = [k not in seen for k in keys]  # a retried batch's rows, never twice
            seen.update(keys)
            pending.append(table.filter(pa.array(new, pa.bool_())))
            progress.update(sum(new))
            timed = time.monotonic() - last >= PART_SECONDS
            if timed or sum(t.num_rows for t in pending) >= part_rows:
                written += _flush(output, pending, failed, part_rows, whole=timed)
                last = time.monotonic()
            if stop.signal is not None:
                break
        written += _flush(output, pending, failed, part_rows, whole=True)
    finally:
        progress.close()
        if hasattr(tables, "close"):
            tables.close()  # the engine's own clean-up (Ray's session) runs now, not when garbage collected
    return written, failed


def _flush(output: PartsOutput, pending: list[pa.Table], failed: list[tuple[str, str]], part_rows: int,
           whole: bool) -> int:
    """Write ``pending`` as parts of at most ``part_rows`` rows: all of it when ``whole``, else the full parts only,
    the rest left pending. The scores written; the failures are appended to ``failed``."""
    import pyarrow as pa

    if not pending:
        return 0
    table = pa.concat_tables(pending)
    pending.clear()
    end = table.num_rows if whole else table.num_rows - table.num_rows % part_rows
    written = 0
    for start in range(0, end, part_rows):
        part = table.slice(start, min(part_rows, end - start))
        output.write(part)
        errors = part.filter(part["error"].is_valid())
        failed += zip(errors["path"].to_pylist(), errors["error"].to_pylist(), strict=True)
        written += part.num_rows - errors.num_rows
    if end < table.num_rows:
        pending.append(table.slice(end))
    return written


def _error_rows(errors: list[tuple[str, str]]) -> pa.Table:
    """Inputs that lead nowhere as error rows."""
    from qmamba.inference.scoring import results_table

    return results_table([p for p, _ in errors], [(None, None, e) for _, e in errors])


def _report(args: argparse.Namespace, scorer: Any, written: int, failed: list[tuple[str, str]],
            signal_number: int | None) -> None:
    for path, error in failed[:SHOWN_ERRORS]:
        print(f"qmamba score: skipped {without_password(path)}: {error}", file=sys.stderr)
    if len(failed) > SHOWN_ERRORS:
        print(f"qmamba score: ... and {len(failed) - SHOWN_ERRORS} more, each with its reason in the errors-*.parquet "
              f"parts of {args.output}", file=sys.stderr)
    if signal_number is not None:
        print(f"qmamba score: {signal.Signals(signal_number).name}: {written} scores written to {args.output} (the "
              "run stopped early; rerun the same command to resume)", file=sys.stderr)
        raise SystemExit(128 + signal_number)
    print(f"qmamba score: {written} scored, {len(failed)} skipped to {args.output} ({scored_as(scorer)})",
          file=sys.stderr)
    if failed:
        raise SystemExit(1)
