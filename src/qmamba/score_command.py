"""``qmamba score``: score image files and folders with a trained checkpoint, writing each batch as it is scored.

    qmamba score --ckpt_path runs/demo/checkpoints/best.ckpt photos/ extra.jpg -o scores.csv

Rows go to ``<output>.partial`` as they come (flushed after every batch) and the file takes its final name only
when every input was handled, so a partial output is recognisable by its name. SIGINT and SIGTERM finish the
current batch, close the file and exit 130 / 143 saying how many scores it holds. Scores outside the training
dataset's scale are flagged (``above range`` / ``below range``), or clipped with ``--clip``.
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
    """Streams rows as CSV (``path,score,flag``, quoted as needed) or as one JSON document closed at the end."""

    def __init__(self, stream: IO[str], json_format: bool, header: dict[str, Any]) -> None:
        self.stream, self.json, self.rows = stream, json_format, 0
        if json_format:
            self.stream.write(json.dumps(header, indent=2)[:-2] + ',\n  "scores": [')
        else:
            self.writer = csv.writer(stream, lineterminator="\n")
            self.writer.writerow(["path", "score", "flag"])

    def write(self, rows: list[tuple[str, float, str]]) -> None:
        for path, score, flag in rows:
            if self.json:
                entry = {"path": path, "score": score, **({"flag": flag} if flag else {})}
                self.stream.write(("," if self.rows else "") + "\n    " + json.dumps(entry))
            else:
                self.writer.writerow([path, f"{score:.6g}", flag])
            self.rows += 1
        self.stream.flush()

    def close(self, errors: list[tuple[str, str]], complete: bool) -> None:
        if self.json:
            listed = [{"path": p, "error": e} for p, e in errors]
            self.stream.write(f'\n  ],\n  "errors": {json.dumps(listed)},\n  "complete": {json.dumps(complete)}\n}}\n')
        self.stream.flush()


def _open_output(parser: argparse.ArgumentParser, output: Path) -> tuple[Path, IO[str]]:
    """``<output>.partial``, opened before the first image so that a bad path costs nothing."""
    if output.is_dir():
        parser.error(f"--output {output} is a folder; name a file such as {output / 'scores.csv'}")
    partial = output.with_name(output.name + ".partial")
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        return partial, partial.open("w", encoding="utf-8", newline="")
    except OSError as err:
        parser.error(f"cannot write --output {output}: {err.strerror or err} (choose a writable file)")


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
    parser.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a qmamba checkpoint (runs/<name>/...)")
    parser.add_argument("--output", "-o", help="scores.csv (path,score,flag) or scores.json; default: CSV on stdout")
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
    output = Path(args.output) if args.output else None
    partial, stream = _open_output(parser, output) if output else (None, sys.stdout)

    from qmamba.scoring import load  # torch and the model: after the cheap checks

    try:
        scorer = load(args.ckpt_path, device=args.device, crops=args.crops, dataset=args.dataset,
                      batch_size=args.batch_size, trusted=args.trust_checkpoint)
    except BaseException:
        if partial is not None:
            stream.close()
            partial.unlink(missing_ok=True)
        raise
    scale = scorer.scale
    direction = "lower is better" if scale.lower_better else "higher is better"
    files, errors = expand_inputs(args.inputs)
    header = {"model": scorer.info, "score_range": [scale.low, scale.high], "direction": direction}
    writer = _Output(stream, bool(output and output.suffix.lower() == ".json"), header)
    stop, done = _Stop(), 0
    progress = _progress(len(files))
    try:
        for batch in scorer.iter_batches(files):
            writer.write([(files[r.index], *_flag(r.score, scale, args.clip)) for r in batch if r.error is None])
            errors += [(files[r.index], r.error) for r in batch if r.error is not None]
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
