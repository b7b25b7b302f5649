"""``qmamba score``: score images, folders, shards and tables with a checkpoint, writing each batch as it is scored.

    qmamba score --ckpt_path runs/demo/checkpoints/best.ckpt photos/ extra.jpg -o scores.csv
    find /data -name '*.jpg' | qmamba score --ckpt_path best.ckpt - -o scores.jsonl      # paths on stdin
    qmamba score --ckpt_path best.ckpt --list paths.txt -o scores.csv                   # paths in a file
    qmamba score --ckpt_path best.ckpt photos/ -o scores.parquet --devices 4 --maps maps/  # 4 GPUs, heat maps
    qmamba score --ckpt_path best.ckpt 's3://bucket/shards/{000000..000999}.tar' -o scores.parquet  # WebDataset shards
    qmamba score --ckpt_path best.ckpt images.parquet --column url -o scores.jsonl      # a table of paths or URLs
    qmamba score --ckpt_path best.ckpt photos/ -o s3://bucket/scores/                   # Parquet parts in a bucket
    qmamba score --engine ray --ckpt_path best.ckpt 'shards/{000000..000999}.tar' -o scores/   # on a Ray cluster

What counts as an input, and how shard members are keyed: :mod:`qmamba.inference.sources`. A folder or bucket output
(a URI, or a name ending with ``/``) and the Ray engine: :mod:`qmamba.commands.score_parts` and
:mod:`qmamba.commands.score_ray`; what follows is the local engine writing one file.

Images are decoded and cropped in ``--workers`` processes while the model runs. Rows go to ``<output>.partial`` as
they come (flushed after every batch; JSON Lines for a Parquet output until it is complete) and the file takes
its final name only when every input was handled, so a partial output is recognisable by its name. SIGINT and
SIGTERM finish the current batch, close the file and exit 130 / 143 saying how many scores it holds. Running the
same command again resumes: images already scored in the output (``.csv``, ``.jsonl`` or ``.parquet``, partial or
complete) are skipped and the rest appended; a row cut short by a kill is dropped and its image scored again.
Scores outside the training dataset's scale are flagged (``above range`` / ``below range``), or clipped with
``--clip``. ``--devices N`` runs N scoring processes on every N-th file each (parts ``<output>.partial.rank<r>``),
then merges them in input order; ``--num_nodes M`` spreads the shards over M machines that share the output's
folder (each runs the command with its ``--node_rank``; a gloo barrier tells node 0 when to merge). Parts a killed
run left are kept and merged when it is resumed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmamba.commands.score_outputs import (
    PartialOutput,
    RowWriter,
    json_lines,
    open_for_writing,
    output_kind,
    refuse_link,
    scored_paths,
    whole_lines,
)
from qmamba.commands.score_parts import PART_ROWS, arrow_keys, is_folder_output, score_into_parts, scored_as
from qmamba.commands.score_ray import run as run_on_ray
from qmamba.errors import QMambaError, UsageError, is_disk_full
from qmamba.files.atomic import atomic_writer
from qmamba.inference.model_sources import add_model_arguments
from qmamba.inference.precision import add_precision_argument
from qmamba.inference.sources import NetworkLimits, expand, is_uri
from qmamba.redaction import without_password

if TYPE_CHECKING:
    from qmamba.inference.scoring import Scorer

__all__ = ["main"]

def expand_inputs(inputs: list[str], column: str | None, limits: NetworkLimits, list_shards: bool = True
                  ) -> tuple[list[str], list[tuple[str, str]]]:
    """Every input's images (:func:`qmamba.inference.sources.expand`, read within ``limits``), each once: a path
    given twice is scored once, in every mode, and said so."""
    files, errors = expand(inputs, column, list_shards, limits)
    spellings: dict[str, Any] = {}  # a local path folded the OS's way (./a, a, /abs/a): the first spelling is kept
    for item in files:
        spellings.setdefault(str(item) if is_uri(str(item)) else os.path.abspath(str(item)), item)
    unique = list(spellings.values())
    if len(unique) < len(files):
        print(f"qmamba score: {len(files) - len(unique)} repeated input path(s) are scored once (the first of each: "
              "a path given twice, or a name a tar shard repeats)", file=sys.stderr)
    return unique, errors


def _read_list(parser: argparse.ArgumentParser, source: str) -> list[str]:
    """Paths from a text file (``--list``) or standard input (``-``), one per ``\n``-ended line as written (a
    ``\r`` before the ``\n`` is dropped; blank lines are ignored); bytes that are not UTF-8 stay the file name's
    bytes, as ``find`` prints them."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as err:
        parser.error(f"cannot read the list of paths {source}: {err.strerror or err}")
    return [line.removesuffix("\r") for line in os.fsdecode(data).split("\n") if line.strip()]


class _Interrupted(BaseException):
    """A signal arrived while the run waited for images (a URL that does not answer, say). A BaseException, like
    KeyboardInterrupt: the handlers that turn one image's failure into its error row must not catch it."""


class _Stop:
    """SIGINT / SIGTERM set a flag; the scoring loop stops after the batch it is in. One that arrives while the run
    waits for decoded images (:meth:`waiting`) ends the wait at once with :class:`_Interrupted`: none of those
    images has a score yet, so nothing is lost that a rerun would not redo."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.in_wait = False
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.install()

    def install(self) -> None:
        """Route SIGINT and SIGTERM here (again: ray.init replaces the SIGTERM handler with an immediate exit, which
        ended a Ray run in an abort, exit 134, instead of writing what had arrived)."""
        for signum in self.previous:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum
        if self.in_wait:
            self.in_wait = False
            raise _Interrupted

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        if self.signal is not None:
            raise _Interrupted
        self.in_wait = True
        try:
            yield
        finally:
            self.in_wait = False

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _default_workers(on_gpu: bool) -> int:
    """Decoding processes next to the model. A GPU model waits for decoding: all cores but one, at most 8. A CPU
    model gives its cores to the workers (see Scorer.iter_batches), and QMamba-T on the CPU is far slower than
    decoding (2 cores: 1.9 img/s in one process, 1.1 with a worker), so only a quarter of the cores decode."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1)) if on_gpu else cores // 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmamba score", description="Score images with a trained QMamba checkpoint.")
    parser.add_argument("inputs", nargs="*", help="image files and folders (searched recursively), tar shards "
                        "(each image member a row), tables (.parquet, .csv, .jsonl) of paths or URLs, fsspec URIs "
                        "(s3://, gs://, https://) of any of these, brace patterns (shards/{000..099}.tar); - reads "
                        "paths from standard input, one per line")
    parser.add_argument("--column", help="the column of a table input that names the images (default: path, else "
                        "url)")
    parser.add_argument("--list", dest="lists", action="append", default=[],
                        help="a text file of image paths, one per line (repeatable)")
    add_model_arguments(parser)
    add_precision_argument(parser)
    parser.add_argument("--output", "-o", help="scores.csv (path,score,flag), scores.jsonl, scores.json or "
                        "scores.parquet (needs pyarrow); a folder or bucket prefix (scores/, s3://bucket/scores/) for "
                        "Parquet parts; default: CSV on stdout. Rerunning with the same output resumes it (not .json)")
    parser.add_argument("--part-rows", type=int, default=PART_ROWS, help="a folder or bucket output's rows per "
                        f"Parquet part at most; a part is also written every minute while rows arrive (default "
                        f"{PART_ROWS})")
    parser.add_argument("--crops", type=int, help="evaluation crops per image (default: as in training)")
    parser.add_argument("--dataset", help="report on this training dataset's scale (default: the first)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--workers", type=int, help=f"processes that decode and crop while the model runs (default "
                        f"here: {_default_workers(True)} for a GPU model, {_default_workers(False)} for a CPU one; 0 "
                        "decodes in the main process; small fast models on the CPU gain from 1 or 2)")
    parser.add_argument("--max-side", type=int, help="downscale images whose longer side exceeds this before "
                        "cropping (huge images; JPEGs decode directly at the smaller size). Default: native "
                        "resolution, as the model was tested")
    parser.add_argument("--timeout", type=float, default=NetworkLimits.timeout, help="seconds a URL may take to "
                        "answer, to send its next bytes, and to deliver a whole image (default %(default)g); a URL "
                        "past it is that image's error")
    parser.add_argument("--max-image-mb", type=float, default=NetworkLimits.max_bytes / 2**20, help="the most one "
                        "image from a URL or a tar member may hold; reading stops there and the image is an error "
                        "(default %(default)g)")
    parser.add_argument("--maps", type=Path, metavar="DIR", help="also write a quality map per image into DIR "
                        "(<DIR>/<image path>.png: the image tinted by the scores of windows slid over it)")
    parser.add_argument("--devices", type=int, default=1, help="score with N processes, each on its own GPU (or "
                        "CPU share), every image exactly once; the parts are merged in input order (needs -o)")
    parser.add_argument("--num_nodes", "--num-nodes", type=int, default=1, help="machines scoring together (each "
                        "runs this command with --devices N; the output's folder must be shared): node 0 merges. "
                        "Needs MASTER_ADDR / MASTER_PORT, as set by torchrun or SLURM")
    parser.add_argument("--node_rank", "--node-rank", type=int, default=int(os.environ.get(
                        "NODE_RANK", os.environ.get("SLURM_NODEID", "0"))),
                        help="this machine's index among --num_nodes (default: $NODE_RANK or $SLURM_NODEID, else 0)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile (faster after "
                        "the first batches of each size, which compile; on a CPU the graph is frozen and compiles anew "
                        "in every run, so it pays only over thousands of images; needs a C++ compiler on a CPU)")
    parser.add_argument("--clip", action="store_true", help="clip scores to the dataset's scale (default: flag them)")
    ray = parser.add_argument_group("the Ray engine (pip install \"qmamba[ray]\")")
    ray.add_argument("--engine", choices=("local", "ray"), default="local", help="local: this machine's processes "
                     "(default); ray: a Ray cluster, writing Parquet parts to the --output folder or bucket")
    ray.add_argument("--address", help="the Ray cluster: auto (a running one), ray://host:10001 (default: "
                     "$RAY_ADDRESS, as `ray job submit` sets it, else a cluster of this machine started for the run)")
    ray.add_argument("--concurrency", type=int, default=1, help="scoring actors, each holding the model (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per scoring actor; 0 (default) scores "
                     "on CPUs, a fraction shares a GPU between actors")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPU cores per scoring actor (its torch "
                     "threads; default 1); decoding runs in tasks of one core each")
    return parser


def main(argv: list[str]) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("crops", "batch_size", "max_side", "devices", "num_nodes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    for name in ("timeout", "max_image_mb"):
        value = getattr(args, name)
        if not value > 0 or value == float("inf"):
            parser.error(f"--{name.replace('_', '-')} must be a number > 0, got {value}")
    args.limits = NetworkLimits(args.timeout, int(args.max_image_mb * 2**20))
    if args.maps is not None:  # the OS's path, once: `link/..` is the link target's parent, not `.`
        args.maps = args.maps.resolve()
    if not 0 <= args.node_rank < args.num_nodes:
        parser.error(f"--node_rank {args.node_rank} is not one of the {args.num_nodes} nodes (0 to "
                     f"{args.num_nodes - 1})")
    if args.num_nodes > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        parser.error("--num_nodes needs MASTER_ADDR and MASTER_PORT (node 0's address and a free port; torchrun and "
                     "SLURM set them) so that node 0 knows when every node is done")
    _check_engine(parser, args)
    inputs = [p for item in args.inputs for p in (_read_list(parser, "-") if item == "-" else [item])]
    inputs += [p for source in args.lists for p in _read_list(parser, source)]
    if not inputs:
        parser.error("no images to score: name files or folders, --list FILE, or - for paths on standard input")
    if args.engine == "ray" or is_folder_output(args.output):  # Parquet parts (qmamba.commands.score_parts)
        files, errors = expand_inputs(inputs, args.column, args.limits, list_shards=args.engine == "local")
        files = arrow_keys(files, errors)
        stop = _Stop()
        try:
            (run_on_ray if args.engine == "ray" else _score_into_folder)(args, files, errors, stop, _Progress(None))
        finally:
            stop.restore()
        return
    output = Path(args.output) if args.output else None
    sharded = args.devices > 1 or args.num_nodes > 1
    if sharded and output is None:
        parser.error("--devices and --num_nodes need --output: each process writes its part next to it")
    if output is not None and output_kind(output) == "parquet" and importlib.util.find_spec("pyarrow") is None:
        parser.error("Parquet output needs pyarrow (pip install pyarrow), or write .csv / .jsonl")
    if args.node_rank > 0:  # a helper node: score its shards into parts; node 0 owns the output
        _help_node_zero(args, expand_inputs(inputs, args.column, args.limits)[0], output)  # type: ignore[arg-type]
        return
    files, errors = expand_inputs(inputs, args.column, args.limits)  # listed before anything is written
    target = PartialOutput(output) if output else None  # locked from here to the end of the run
    try:
        _score_inputs(args, files, errors, output, target, sharded)
    except OSError as err:
        if not is_disk_full(err):
            raise
        kept = f"; every score written so far is kept in {target.path}" if target else ""
        raise QMambaError(f"no space left on the device while writing {err.filename or output or 'the output'}{kept}: "
                          "free space and rerun the same command to resume") from None
    finally:
        if target is not None:
            target.unlock()


def _check_engine(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options that mean nothing to the engine or output chosen are refused, not ignored."""
    ray_only = {"address": None, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0, "concurrency": 1}
    if args.part_rows < 1:
        parser.error(f"--part-rows must be >= 1, got {args.part_rows}")
    folder = args.engine == "ray" or is_folder_output(args.output)
    if args.part_rows != PART_ROWS and not folder:
        parser.error("--part-rows applies to a folder or bucket output (a URI, or a name ending with /)")
    named_like_a_file = args.output and (args.output.lower().rstrip("/").endswith((".csv", ".jsonl", ".json")) or (
        args.output.lower().endswith(".parquet")))  # scores.parquet/, with its slash, names a folder
    if folder and named_like_a_file:
        parser.error(f"--output {args.output}: {'--engine ray' if args.engine == 'ray' else 'a bucket output'} "
                     "writes Parquet parts into a folder or bucket prefix, not one file: name one such as scores/ "
                     "(the local engine writes .csv, .jsonl and .json to a local file)")
    if args.engine != "ray":
        for name, default in ray_only.items():
            if getattr(args, name) != default:
                parser.error(f"--{name.replace('_', '-')} applies to --engine ray only")
        if folder and (args.devices > 1 or args.num_nodes > 1):
            parser.error("--devices and --num_nodes merge file outputs; a folder or bucket output is written by one "
                         "process (--engine ray spreads the work over a cluster)")
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
    if args.concurrency < 1 or args.gpus_per_worker < 0 or args.cpus_per_worker <= 0:
        parser.error("--concurrency must be >= 1, --gpus-per-worker >= 0, --cpus-per-worker > 0")


def _load(args: argparse.Namespace, device: str | None, compile: bool) -> Scorer:  # noqa: A002
    """The scorer that the options describe (torch and the model are imported here, after the cheap checks)."""
    from qmamba.inference.scoring import load

    scorer = load(args.ckpt_path, device=device, crops=args.crops, dataset=args.dataset, batch_size=args.batch_size,
                  trusted=args.trust_checkpoint, sha256=args.sha256, max_side=args.max_side, compile=compile,
                  precision=args.precision, limits=args.limits)
    if args.clip:
        scorer.scale.check_clip(scorer.dataset)
    return scorer


def _score_inputs(args: argparse.Namespace, files: list[str], errors: list[tuple[str, str]], output: Path | None,
                  target: PartialOutput | None, sharded: bool) -> None:
    """The run itself: the model, what an earlier run left, the scoring, and the report."""
    try:  # with several processes this one only reads the model's description: it stays on the CPU
        scorer = _load(args, "cpu" if sharded else args.device, compile=args.compile and not sharded)
    except BaseException:
        if target is not None:
            target.rollback()
        raise
    if target is None and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")  # a file name's bytes as they are, like ls
    stream, scored_before = target.open() if target else (sys.stdout, set())
    partial = target.path if target else None
    scale = scorer.scale
    header = {"model": scorer.info, **scale.as_header()}
    writer = RowWriter(stream, output_kind(output), header, resumed=bool(scored_before))
    in_parts = _part_scores(partial) if partial is not None else set()  # a sharded run stopped before merging
    if in_parts and not sharded:  # resumed in one process: merge its parts now
        _merge_parts(partial, writer, files, exclude=scored_before)  # type: ignore[arg-type]
    todo = [f for f in files if f not in scored_before and f not in in_parts]
    if len(todo) < len(files):
        print(f"qmamba score: resuming {partial}: {len(files) - len(todo)} images already scored, {len(todo)} to go",
              file=sys.stderr)
    writer.write([], errors)  # inputs that lead nowhere (JSON Lines records them)
    stop, done = _Stop(), 0
    try:
        if sharded:
            _spawn_shards(args, files, partial, scored_before | in_parts, stop)  # type: ignore[arg-type]
            merged, failed = _merge_parts(partial, writer, files, exclude=scored_before)  # type: ignore[arg-type]
            done = len(set(todo) & merged)
        else:
            done, failed = _score(scorer, todo, writer, args, stop)
        errors += failed
    finally:
        stop.restore()
        complete = done == len(todo) and stop.signal is None
        writer.close(errors, complete)
        if target is not None:
            stream.close()
            if complete:
                target.finish(header)
    for path, error in errors:
        print(f"qmamba score: skipped {without_password(path)}: {error}", file=sys.stderr)
    where = f" to {output if complete else partial}" if output else ""
    if stop.signal is not None:
        name = signal.Signals(stop.signal).name
        print(f"qmamba score: {name} after {done} of {len(todo)} images; {writer.rows} scores written{where} "
              "(the run stopped early)", file=sys.stderr)
        raise SystemExit(128 + stop.signal)
    print(f"qmamba score: {writer.rows} scored, {len(errors)} skipped{where} ({scored_as(scorer)})", file=sys.stderr)
    if errors:
        raise SystemExit(1)


def _score_into_folder(args: argparse.Namespace, files: list[str], errors: list[tuple[str, str]], stop: _Stop,
                       progress: _Progress) -> None:
    """The local engine writing Parquet parts to a folder or bucket prefix (:mod:`qmamba.commands.score_parts`)."""
    from qmamba.inference.scoring import results_table

    scorer: Scorer | None = None

    def describe() -> Scorer:
        nonlocal scorer
        scorer = _load(args, args.device, args.compile)
        return scorer

    def batches(scored: set[str]) -> Iterator[Any]:
        try:
            for rows, bad in _scored_batches(scorer, [f for f in files if f not in scored], args, stop):
                results = [(score, flag, None) for _, score, flag in rows] + [(None, None, e) for _, e in bad]
                yield results_table([path for path, _, _ in rows] + [path for path, _ in bad], results)
        except _Interrupted:
            return

    score_into_parts(args, errors, describe, batches, set(files).__contains__, stop, progress)


def _help_node_zero(args: argparse.Namespace, files: list[str], output: Path) -> None:
    """Node ``--node_rank`` > 0 of ``--num_nodes``: its shards go into parts next to node 0's output."""
    partial = output.with_name(output.name + ".partial")
    scored = scored_paths(partial, output_kind(output), trim=False) if partial.is_file() else set()
    stop = _Stop()
    try:
        _spawn_shards(args, files, partial, scored | _part_scores(partial))
    finally:
        stop.restore()
    print(f"qmamba score: node {args.node_rank} of {args.num_nodes} done; node 0 merges the parts into {output}",
          file=sys.stderr)


def _score(scorer: Any, files: list[str], writer: RowWriter, args: argparse.Namespace, stop: _Stop
           ) -> tuple[int, list[tuple[str, str]]]:
    """Score ``files`` in order into ``writer`` (and their maps), stopping after the batch a signal arrives in.
    Returns how many images were handled and the ones that could not be scored."""
    failed: list[tuple[str, str]] = []
    done = 0
    progress = _Progress(len(files))
    try:
        for rows, bad in _scored_batches(scorer, files, args, stop):
            writer.write(rows, bad)
            failed += bad
            done += len(rows) + len(bad)
            progress.update(len(rows) + len(bad))
            if stop.signal is not None:
                break
    except _Interrupted:
        pass
    finally:
        progress.close()
    return done, failed


def _scored_batches(scorer: Any, files: list[str], args: argparse.Namespace, stop: _Stop
                    ) -> Iterator[tuple[list[tuple[str, float, str]], list[tuple[str, str]]]]:
    """Each model batch of ``files`` as its rows ``(path, score, flag)`` (flagged or clipped, ``--clip``) and its
    failures ``(path, reason)``, in input order; the rows' quality maps are written first (``--maps``). A signal
    while images are awaited raises :class:`_Interrupted`."""
    workers = _default_workers(scorer.device.type == "cuda") if args.workers is None else args.workers
    for batch in scorer.iter_batches(files, workers=workers, waiting=stop.waiting):
        rows = [(files[r.index], *scorer.scale.report(r.score, args.clip)) for r in batch if r.error is None]
        if args.maps is not None:
            for path, _, _ in rows:
                _write_map(scorer, path, args.maps)
        yield rows, [(files[r.index], r.error) for r in batch if r.error is not None]


def map_path(maps: Path, path: str) -> Path:
    """``<maps>/<path>.png``, named after the image's path so that equal names in different folders do not collide:
    a relative path that stays below the working folder keeps its name, any other (absolute, or leading up with
    ``..``) is named by its absolute path without the root, so that every map lands inside ``maps``."""
    relative = Path(os.path.normpath(path))
    if relative.is_absolute() or relative.parts[:1] == ("..",):
        relative = Path(*Path(os.path.abspath(path)).parts[1:])
    return maps / relative.with_name(relative.name + ".png")


def _write_map(scorer: Any, path: str, maps: Path) -> None:
    """The image's quality map at :func:`map_path`; a folder inside ``maps`` that links out of it is refused."""
    from qmamba.inference.quality_maps import render
    from qmamba.inference.scoring import _as_rgb

    target = map_path(maps, path)
    if not target.parent.resolve().is_relative_to(maps.resolve()):
        raise UsageError(f"--maps {maps}: {target.parent} leads out of it (to {target.parent.resolve()}) through a "
                         "symbolic link; remove the link or choose another --maps folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    image = _as_rgb(path, scorer.max_side)
    picture = render(image, scorer.quality_map(image), scorer.scale)
    try:
        with atomic_writer(target) as stream:
            picture.save(stream, format="PNG")
    except OSError as err:  # a full disk names the map, not the scores' file
        raise OSError(err.errno, err.strerror, str(target)) from err


class _Progress:
    """A bar with img/s and ETA in a terminal; in a log, one line every ``every`` seconds. ``total`` None: a count
    without an end (shards not listed in advance)."""

    def __init__(self, total: int | None, every: float = 30.0) -> None:
        from tqdm import tqdm

        self.total, self.every, self.done = total, every, 0
        self.start = self.last = time.monotonic()
        self.bar = tqdm(total=total, desc="scoring", unit="img", file=sys.stderr,
                        disable=total == 0 or not sys.stderr.isatty())

    def update(self, count: int) -> None:
        self.bar.update(count)
        self.done += count
        now = time.monotonic()
        if self.bar.disable and self.total != 0 and now - self.last >= self.every:
            rate = self.done / (now - self.start)
            if self.total is None:
                line = f"{self.done} images, {rate:.1f} img/s"
            else:
                eta = (self.total - self.done) / rate if rate else float("inf")
                line = f"{self.done} of {self.total} images, {rate:.1f} img/s, about {eta / 60:.0f} min to go"
            print(f"qmamba score: {line}", file=sys.stderr, flush=True)
            self.last = now

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------- several processes
def _part_paths(partial: Path) -> list[Path]:
    parts = sorted(partial.parent.glob(f"{partial.name}.rank*"))
    for part in parts:
        refuse_link(part, "the shard part")
    return parts


def _read_part(part: Path) -> list[dict[str, Any]]:
    """The whole JSON lines of a part (a line cut short by a kill is dropped: its image is scored again)."""
    return json_lines(whole_lines(part))


def _part_scores(partial: Path) -> set[str]:
    return {e["path"] for part in _part_paths(partial) for e in _read_part(part) if "score" in e}


def _merge_parts(partial: Path, writer: RowWriter, order: list[str], exclude: set[str]
                 ) -> tuple[set[str], list[tuple[str, str]]]:
    """Write every part's rows (scores and failures) into ``writer`` in input order, except paths already in the
    output, then delete the parts. Returns the paths handled and the failures."""
    entries = {e["path"]: e for part in _part_paths(partial) for e in _read_part(part)}
    new = [p for p in order if p in entries and p not in exclude]
    writer.write([(p, entries[p]["score"], entries[p].get("flag", "")) for p in new if "score" in entries[p]], [])
    for part in _part_paths(partial):
        part.unlink()
    return set(new), [(p, entries[p]["error"]) for p in new if "error" in entries[p]]


def _spawn_shards(args: argparse.Namespace, files: list[str], partial: Path, scored: set[str],
                  stop: _Stop | None = None) -> None:
    """This node's ``--devices`` processes; they return once every process of every node is done. A SIGINT or
    SIGTERM that ``stop`` caught is passed on to them: each finishes its batch and keeps its part."""
    import torch
    import torch.multiprocessing as mp

    from qmamba.inference.scoring import default_device

    device = args.device or default_device()
    if device.startswith("cuda") and torch.cuda.device_count() < args.devices:
        raise UsageError(f"--devices {args.devices} needs as many GPUs; {torch.cuda.device_count()} visible here")
    context = mp.start_processes(_score_shard, args=(args, files, partial, device, scored), nprocs=args.devices,
                                 join=False, start_method="spawn")
    passed_on = False
    try:
        while not context.join(timeout=0.2):
            if stop is not None and stop.signal is not None and not passed_on:
                for process in context.processes:
                    if process.is_alive():
                        os.kill(process.pid, stop.signal)
                passed_on = True
    except mp.ProcessExitedException:
        if not passed_on:  # killed from outside, or crashed: its part keeps what it wrote
            raise QMambaError("a scoring process died; rerun the same command to resume") from None
    except mp.ProcessRaisedException as err:
        raise QMambaError("a scoring process failed: " + str(err).strip().splitlines()[-1]) from None


def _score_shard(local: int, args: argparse.Namespace, files: list[str], partial: Path, device: str,
                 scored: set[str]) -> None:
    """One scoring process: every ``world``-th file of the whole input list from its global rank on (so that a
    file's shard never depends on what earlier runs scored), minus those already scored, into its own part."""
    import torch
    import torch.distributed as dist

    rank, world = args.node_rank * args.devices + local, args.num_nodes * args.devices
    if args.num_nodes > 1:  # across machines: a barrier at the end tells node 0 that every part is complete
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    try:
        if device == "cuda":
            device = f"cuda:{local}"
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))
        scorer = _load(args, device, args.compile)
        part = partial.with_name(f"{partial.name}.rank{rank}")
        if part.is_file():
            whole_lines(part, trim=True)  # appending after a cut-short line would fuse two rows
        todo = [f for f in files[rank::world] if f not in scored]
        stop = _Stop()
        try:
            with open_for_writing(part, "a") as stream:
                _score(scorer, todo, RowWriter(stream, "jsonl", {}, resumed=True), args, stop)
        finally:
            stop.restore()
    finally:
        if args.num_nodes > 1:
            dist.barrier()
            dist.destroy_process_group()
