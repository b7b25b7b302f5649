"""``qmamba score``: score image files and folders with a trained checkpoint, writing each batch as it is scored.

    qmamba score --ckpt_path runs/demo/checkpoints/best.ckpt photos/ extra.jpg -o scores.csv
    find /data -name '*.jpg' | qmamba score --ckpt_path best.ckpt - -o scores.jsonl      # paths on stdin
    qmamba score --ckpt_path best.ckpt --list paths.txt -o scores.csv                   # paths in a file

Rows go to ``<output>.partial`` as they come (flushed after every batch) and the file takes its final name only
when every input was handled, so a partial output is recognisable by its name. SIGINT and SIGTERM finish the
current batch, close the file and exit 130 / 143 saying how many scores it holds. Running the same command again
resumes: images already scored in the output (``.csv`` or ``.jsonl``, partial or complete) are skipped and the rest
appended; a row cut short by a kill is dropped and its image scored again. Scores outside the training dataset's
scale are flagged (``above range`` / ``below range``), or clipped with ``--clip``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
from pathlib import Path
from typing import IO, Any

from qmamba.scale import ScoreScale

__all__ = ["expand_inputs", "main"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm"}


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files from files and folders (recursive, sorted, symlinks followed once); every input or link that
    leads nowhere is returned as ``(path, reason)``."""
    files: list[str] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            _walk(path, files, errors, set())
        elif path.is_file():
            files.append(str(path))
        elif path.is_symlink():
            errors.append((str(path), "broken symbolic link"))
        else:
            errors.append((str(path), "no such file or folder"))
    return files, errors


def _walk(folder: Path, files: list[str], errors: list[tuple[str, str]], seen: set[tuple[int, int]]) -> None:
    stat = folder.stat()
    if (stat.st_dev, stat.st_ino) in seen:
        errors.append((str(folder), "symbolic link loop (folder already visited)"))
        return
    seen = seen | {(stat.st_dev, stat.st_ino)}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        try:
            if entry.is_dir():  # follows links
                _walk(path, files, errors, seen)
            elif entry.is_file():
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(str(path))
            elif entry.is_symlink():
                errors.append((str(path), "broken symbolic link"))
        except OSError as err:  # e.g. a link loop the OS itself refuses (ELOOP) or a folder we may not read
            errors.append((str(path), err.strerror or str(err)))


def _flag(score: float, scale: ScoreScale, clip: bool) -> tuple[float, str]:
    """The reported score and its flag: out-of-range predictions are kept and flagged, or clipped when asked."""
    if scale.low <= score <= scale.high:
        return score, ""
    side = "above" if score > scale.high else "below"
    if clip:
        return min(max(score, scale.low), scale.high), f"clipped ({side} range: {score:.6g})"
    return score, f"{side} range"


class _Output:
    """Streams rows as CSV (``path,score,flag``, quoted as needed), JSON Lines (one object per image, errors
    included) or one JSON document closed at the end."""

    def __init__(self, stream: IO[str], kind: str, header: dict[str, Any], resumed: bool) -> None:
        self.stream, self.kind, self.rows = stream, kind, 0
        self.writer = csv.writer(stream, lineterminator="\n")
        if kind == "json":
            self.stream.write(json.dumps(header, indent=2)[:-2] + ',\n  "scores": [')
        elif kind == "csv" and not resumed:
            self.writer.writerow(["path", "score", "flag"])

    def write(self, rows: list[tuple[str, float, str]], errors: list[tuple[str, str]]) -> None:
        for path, score, flag in rows:
            entry = {"path": path, "score": score, **({"flag": flag} if flag else {})}
            if self.kind == "json":
                self.stream.write(("," if self.rows else "") + "\n    " + json.dumps(entry))
            elif self.kind == "jsonl":
                self.stream.write(json.dumps(entry) + "\n")
            else:
                self.writer.writerow([path, f"{score:.6g}", flag])
            self.rows += 1
        if self.kind == "jsonl":
            self.stream.writelines(json.dumps({"path": p, "error": e}) + "\n" for p, e in errors)
        self.stream.flush()

    def close(self, errors: list[tuple[str, str]], complete: bool) -> None:
        if self.kind == "json":
            listed = [{"path": p, "error": e} for p, e in errors]
            self.stream.write(f'\n  ],\n  "errors": {json.dumps(listed)},\n  "complete": {json.dumps(complete)}\n}}\n')
        self.stream.flush()


def _scored_before(partial: Path, kind: str) -> set[str]:
    """Paths with a score in an earlier run's output; rewrites it without a last line that a kill cut short."""
    text = partial.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]  # rows are written whole, so only a kill mid-write leaves a tail
    if complete != text:
        partial.write_text(complete, encoding="utf-8")
    if kind == "jsonl":
        entries = [json.loads(line) for line in complete.splitlines() if line.strip()]
        return {e["path"] for e in entries if "score" in e}
    rows = list(csv.reader(complete.splitlines()))
    return {row[0] for row in rows[1:] if len(row) >= 2 and row[1]}


def _output_kind(output: Path | None) -> str:
    suffix = output.suffix.lower() if output else ".csv"
    return {".json": "json", ".jsonl": "jsonl"}.get(suffix, "csv")


class _PartialFile:
    """``<output>.partial``: prepared before the model loads (so that a bad path costs nothing), holding what an
    earlier run of the same command scored (a finished output is reopened), and renamed to ``<output>`` at the end."""

    def __init__(self, parser: argparse.ArgumentParser, output: Path) -> None:
        if output.is_dir():
            parser.error(f"--output {output} is a folder; name a file such as {output / 'scores.csv'}")
        self.output, self.path = output, output.with_name(output.name + ".partial")
        self.kind = _output_kind(output)
        self.reopened = self.created = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if output.is_file() and not self.path.exists():
                os.replace(output, self.path)
                self.reopened = True
            self.created = not self.path.exists()
            self.path.open("a", encoding="utf-8").close()
        except OSError as err:
            parser.error(f"cannot write --output {output}: {err.strerror or err} (choose a writable file)")

    def rollback(self) -> None:
        """Leave everything as it was (the run could not start)."""
        if self.reopened:
            os.replace(self.path, self.output)
        elif self.created:
            self.path.unlink(missing_ok=True)

    def open(self) -> tuple[IO[str], set[str]]:
        """The stream to write and the images already scored in it (JSON documents cannot be resumed)."""
        scored: set[str] = set()
        if self.kind != "json":
            scored = _scored_before(self.path, self.kind)
        elif not self.created:
            print(f"qmamba score: {self.path} is JSON, which cannot be resumed: starting over (use .csv or .jsonl "
                  "for resumable runs)", file=sys.stderr)
        return self.path.open("a" if scored else "w", encoding="utf-8", newline=""), scored


def _read_list(parser: argparse.ArgumentParser, source: str) -> list[str]:
    """Paths from a text file (``--list``) or standard input (``-``), one per line; blank lines are ignored."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"cannot read the list of paths {source}: {err}")
    return [line.strip() for line in text.splitlines() if line.strip()]


class _Stop:
    """SIGINT / SIGTERM set a flag; the scoring loop stops after the batch it is in."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="qmamba score", description="Score images with a trained QMamba checkpoint.")
    parser.add_argument("inputs", nargs="*", help="image files and folders (searched recursively); - reads paths from "
                        "standard input, one per line")
    parser.add_argument("--list", dest="lists", action="append", default=[],
                        help="a text file of image paths, one per line (repeatable)")
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a qmamba checkpoint (runs/<name>/...)")
    parser.add_argument("--output", "-o", help="scores.csv (path,score,flag), scores.jsonl or scores.json; default: "
                        "CSV on stdout. Rerunning with the same .csv/.jsonl output resumes it")
    parser.add_argument("--crops", type=int, help="evaluation crops per image (default: as in training)")
    parser.add_argument("--dataset", help="report on this training dataset's scale (default: the first)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--clip", action="store_true", help="clip scores to the dataset's scale (default: flag them)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint with pickled Python objects (they can run code: trusted files only)")
    args = parser.parse_args(argv)
    for name in ("crops", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    inputs = [p for item in args.inputs for p in (_read_list(parser, "-") if item == "-" else [item])]
    inputs += [p for source in args.lists for p in _read_list(parser, source)]
    if not inputs:
        parser.error("no images to score: name files or folders, --list FILE, or - for paths on standard input")
    output = Path(args.output) if args.output else None
    target = _PartialFile(parser, output) if output else None

    from qmamba.scoring import load  # torch and the model: after the cheap checks

    try:
        scorer = load(args.ckpt_path, device=args.device, crops=args.crops, dataset=args.dataset,
                      batch_size=args.batch_size, trusted=args.trust_checkpoint)
    except BaseException:
        if target is not None:
            target.rollback()
        raise
    stream, scored_before = target.open() if target else (sys.stdout, set())
    partial = target.path if target else None
    scale = scorer.scale
    direction = "lower is better" if scale.lower_better else "higher is better"
    files, errors = expand_inputs(inputs)
    skipped = len(files)
    files = [f for f in files if f not in scored_before]
    skipped -= len(files)
    if skipped:
        print(f"qmamba score: resuming {partial}: {skipped} images already scored, {len(files)} to go",
              file=sys.stderr)
    header = {"model": scorer.info, "score_range": [scale.low, scale.high], "direction": direction}
    writer = _Output(stream, _output_kind(output), header, resumed=bool(scored_before))
    writer.write([], errors)  # inputs that lead nowhere (JSON Lines records them)
    stop, done = _Stop(), 0
    progress = _progress(len(files))
    try:
        for batch in scorer.iter_batches(files):
            failed = [(files[r.index], r.error) for r in batch if r.error is not None]
            writer.write([(files[r.index], *_flag(r.score, scale, args.clip)) for r in batch if r.error is None],
                         failed)
            errors += failed
            done += len(batch)
            progress.update(len(batch))
            if stop.signal is not None:
                break
    finally:
        stop.restore()
        progress.close()
        complete = done == len(files) and stop.signal is None
        writer.close(errors, complete)
        if partial is not None:
            stream.close()
            if complete:
                os.replace(partial, output)
    for path, error in errors:
        print(f"qmamba score: skipped {path}: {error}", file=sys.stderr)
    where = f" to {output if complete else partial}" if output else ""
    if stop.signal is not None:
        name = signal.Signals(stop.signal).name
        print(f"qmamba score: {name} after {done} of {len(files)} images; {writer.rows} scores written{where} "
              "(the run stopped early)", file=sys.stderr)
        raise SystemExit(128 + stop.signal)
    print(f"qmamba score: {writer.rows} scored, {len(errors)} skipped{where} ({scorer.dataset} scale "
          f"{scale.low:g}-{scale.high:g}, {direction})", file=sys.stderr)
    if errors:
        raise SystemExit(1)


def _progress(total: int) -> Any:
    """A progress bar in a terminal; nothing in a log (the closing summary line says what happened)."""
    from tqdm import tqdm

    return tqdm(total=total, desc="scoring", unit="img", file=sys.stderr, disable=not total or not sys.stderr.isatty())
