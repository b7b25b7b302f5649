r"""Where ``qmamba score`` writes: CSV, JSON Lines, JSON or Parquet rows, streamed into ``<output>.partial`` as they
come and renamed to ``<output>`` when every input was handled; what an earlier run of the same command scored.

A row is written whole and flushed with its batch, so a kill leaves at most a cut-short last line, which resuming
drops. Parquet is written from JSON Lines at the end (a Parquet file is unreadable until closed), so it resumes like
the text formats; a JSON document cannot be resumed and starts over. Images that failed are tried again by a rerun,
so their earlier error rows are dropped when it reopens the output.

Any file name round-trips: a name that is not valid UTF-8 (a POSIX name is bytes) is written as its bytes in CSV,
as ``\udcXX`` escapes in JSON and, in Parquet (whose strings must be UTF-8), as ``\xNN`` in the ``path`` column with
the exact bytes in the file's metadata; names with line or record separators (``\r``, ``\x1c``, ``\x85``,
``\u2028``) are quoted in CSV and escaped in JSON, and every reader splits records on ``\n`` alone.

Nothing is written through a symbolic link: an output, partial file or part that is a link is refused, files are
opened with ``O_NOFOLLOW``, and temporary files are created exclusively. The output is locked (``.<name>.lock``
next to it) for the run's life, so a second run on the same output is refused instead of interleaving its rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

from qmamba.errors import UsageError
from qmamba.files.atomic import atomic_writer, write_text_atomic
from qmamba.files.run_folder import ProcessLock

__all__ = ["PartialOutput", "RowWriter", "is_utf8", "json_lines", "open_for_writing", "output_kind", "read_text",
           "refuse_link", "scored_paths", "whole_lines"]


def refuse_link(path: Path, what: str) -> None:
    if path.is_symlink():
        raise UsageError(f"{what} {path} is a symbolic link; qmamba score does not write through links (remove it, "
                         "or name what it points to)")


def open_for_writing(path: Path, mode: str = "w") -> IO[str]:
    """``path`` opened for text writing (``w`` truncates, ``a`` appends) without following a link at its name."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        refuse_link(path, "the file")  # O_NOFOLLOW's ELOOP
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    return os.fdopen(fd, mode, encoding="utf-8", errors="surrogateescape", newline="")


def read_text(path: Path) -> str:
    """A file written by :func:`open_for_writing`, exactly as written (no newline translation, names' bytes kept)."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def json_lines(text: str) -> list[dict[str, Any]]:
    """The objects of JSON Lines text; records end at ``\n`` only (str.splitlines would also split at characters
    that a JSON string may hold)."""
    return [json.loads(line) for line in text.split("\n") if line.strip()]


class RowWriter:
    """Streams rows as CSV (``path,score,flag``, quoted as needed), JSON Lines (one object per image, errors
    included) or one JSON document closed at the end."""

    def __init__(self, stream: IO[str], kind: str, header: dict[str, Any], resumed: bool) -> None:
        self.stream, self.kind, self.rows = stream, kind, 0
        self.writer = csv.writer(stream, lineterminator="\n")
        self.quoted = csv.writer(stream, lineterminator="\n", quoting=csv.QUOTE_ALL)  # csv leaves a bare \r unquoted
        if kind == "json":
            self.stream.write(json.dumps(header, indent=2)[:-2] + ',\n  "scores": [')
        elif kind == "csv" and not resumed:
            self.writer.writerow(["path", "score", "flag"])

    def write(self, rows: list[tuple[str, float, str]], errors: list[tuple[str, str]]) -> None:
        for path, score, flag in rows:
            entry = {"path": path, "score": score, **({"flag": flag} if flag else {})}
            if self.kind == "json":
                self.stream.write(("," if self.rows else "") + "\n    " + json.dumps(entry))
            elif self.kind in ("jsonl", "parquet"):  # Parquet streams JSON Lines until the run completes
                self.stream.write(json.dumps(entry) + "\n")
            else:
                (self.quoted if "\r" in path else self.writer).writerow([path, f"{score:.6g}", flag])
            self.rows += 1
        if self.kind in ("jsonl", "parquet"):
            self.stream.writelines(json.dumps({"path": p, "error": e}) + "\n" for p, e in errors)
        self.stream.flush()

    def close(self, errors: list[tuple[str, str]], complete: bool) -> None:
        if self.kind == "json":
            listed = [{"path": p, "error": e} for p, e in errors]
            self.stream.write(f'\n  ],\n  "errors": {json.dumps(listed)},\n  "complete": {json.dumps(complete)}\n}}\n')
        self.stream.flush()


def whole_lines(path: Path, trim: bool = False) -> str:
    """A streamed file's text without a last line that a kill cut short (rows are written whole, so only a kill
    mid-write leaves one); ``trim`` also rewrites the file without it, before appending to it."""
    text = read_text(path)
    complete = text[: text.rfind("\n") + 1]
    if trim and complete != text:
        write_text_atomic(path, complete, errors="surrogateescape")
    return complete


def scored_paths(partial: Path, kind: str, trim: bool = True) -> set[str]:
    """Paths with a score in an earlier run's output; ``trim`` rewrites it without a last line a kill cut short."""
    complete = whole_lines(partial, trim)
    if kind in ("jsonl", "parquet"):
        return {e["path"] for e in json_lines(complete) if "score" in e}
    rows = list(csv.reader(io.StringIO(complete, newline="")))
    return {row[0] for row in rows[1:] if len(row) >= 2 and row[1]}


def output_kind(output: Path | None) -> str:
    suffix = output.suffix.lower() if output else ".csv"
    return {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "csv")


class PartialOutput:
    """``<output>.partial``: prepared before the model loads (so that a bad path costs nothing), holding what an
    earlier run of the same command scored (a finished output is reopened), and renamed to ``<output>`` at the end."""

    def __init__(self, output: Path) -> None:
        if output.is_dir():
            raise UsageError(f"--output {output} is a folder; name a file such as {output / 'scores.csv'}")
        self.output, self.path = output, output.with_name(output.name + ".partial")
        refuse_link(output, "--output")
        refuse_link(self.path, "the partial output")
        self.kind = output_kind(output)
        self.reopened = self.created = False
        self.lock = ProcessLock(output.with_name(f".{output.name}.lock"), f"--output {output}",
                                "write to another --output")
        try:
            self.lock.acquire()  # creates the output's folder too
            try:
                if output.is_file() and not self.path.exists() and self.kind == "parquet":
                    _parquet_to_jsonl(output, self.path)  # the finished file stays until the new one replaces it
                elif output.is_file() and not self.path.exists():
                    os.replace(output, self.path)
                    self.reopened = True
                self.created = not self.path.exists()
                open_for_writing(self.path, "a").close()
            except BaseException:
                self.lock.release()
                raise
        except OSError as err:
            raise UsageError(f"cannot write --output {output}: {err.strerror or err} (choose a writable "
                             "file)") from None

    def finish(self, header: dict[str, Any]) -> None:
        """Give the complete output its final name (Parquet: written from the JSON Lines, then renamed)."""
        if self.kind == "parquet":
            with atomic_writer(self.output) as stream:
                _jsonl_to_parquet(self.path, stream, header)
            self.path.unlink()
        else:
            os.replace(self.path, self.output)

    def rollback(self) -> None:
        """Leave everything as it was (the run could not start)."""
        if self.reopened:
            os.replace(self.path, self.output)
        elif self.created:
            self.path.unlink(missing_ok=True)
        self.unlock()

    def unlock(self) -> None:
        self.lock.release()

    def open(self) -> tuple[IO[str], set[str]]:
        """The stream to write and the images already scored in it (JSON documents cannot be resumed); an earlier
        run's error rows are dropped, as its failed images are tried again."""
        scored: set[str] = set()
        if self.kind in ("jsonl", "parquet"):
            lines = whole_lines(self.path).split("\n")
            kept = [line + "\n" for line in lines if line.strip() and "score" in json.loads(line)]
            if len(kept) < len(lines):
                write_text_atomic(self.path, "".join(kept))
        if self.kind != "json":
            scored = scored_paths(self.path, self.kind)
        elif not self.created:
            print(f"qmamba score: {self.path} is JSON, which cannot be resumed: starting over (use .csv or .jsonl "
                  "for resumable runs)", file=sys.stderr)
        return open_for_writing(self.path, "a" if scored else "w"), scored


def _jsonl_to_parquet(source: Path, target: IO[bytes], header: dict[str, Any]) -> None:
    """The rows of :func:`qmamba.inference.scoring.results_table` (one per image); the model and scale go into the
    file's metadata, with the exact bytes of names that are not UTF-8."""
    import pyarrow.parquet as pq

    from qmamba.inference.scoring import results_table

    entries = json_lines(read_text(source))
    exact = {str(i): os.fsencode(e["path"]).hex() for i, e in enumerate(entries) if not is_utf8(e["path"])}
    table = results_table([e["path"] for e in entries], [
        (e["score"], e.get("flag", ""), None) if "score" in e else (None, None, e.get("error")) for e in entries])
    pq.write_table(table.replace_schema_metadata({"qmamba": json.dumps(header), **(
        {"qmamba_path_bytes": json.dumps(exact)} if exact else {})}), target)


def is_utf8(name: str) -> bool:
    """False for a POSIX name whose bytes are not UTF-8 (held as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a POSIX name, held as surrogates
        return False
    return True


def _parquet_to_jsonl(source: Path, target: Path) -> None:
    """A finished Parquet output as the JSON Lines a resumed run appends to."""
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    exact = json.loads((table.schema.metadata or {}).get(b"qmamba_path_bytes", b"{}"))
    with open_for_writing(target) as out:
        for i, row in enumerate(table.to_pylist()):
            path = os.fsdecode(bytes.fromhex(exact[str(i)])) if str(i) in exact else row["path"]
            entry = {"path": path, "error": row["error"]} if row["error"] is not None else {
                "path": path, "score": row["score"], **({"flag": row["flag"]} if row["flag"] else {})}
            out.write(json.dumps(entry) + "\n")
