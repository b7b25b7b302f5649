"""A folder or bucket prefix of Parquet parts: where ``qmamba score --engine ray`` writes, as the rows arrive.

    scores/part-20261202T071500-3f2a-000000.parquet   path, score, flag, error (error null): the scored images
    scores/errors-20261202T071500-3f2a-000001.parquet the images that could not be scored, with the reason
    scores/_qmamba.json                               the model, the scale and the counts, once the run is complete

Any reader of Parquet datasets reads the folder as one table (``pyarrow.parquet.read_table("scores/")``,
``ray.data.read_parquet``, Spark, DuckDB's ``'scores/*.parquet'``): names starting with ``_`` or ``.`` are not data.

Each part is written whole before it has its name: on a file system as a hidden temporary file renamed into place,
on an object store as one upload, which the store publishes only when it completes. So a killed run leaves whole
parts and nothing else that counts, and a rerun of the same command reads the keys its parts hold and scores the
rest. Error parts are deleted by a rerun, whose images are tried again, as in the local engine. A local folder is
locked for the run's life; a bucket prefix cannot be, so two runs must not share one.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from qmamba.errors import UsageError
from qmamba.files.run_folder import ProcessLock
from qmamba.inference.sources import is_uri

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["PartsOutput"]

SUMMARY = "_qmamba.json"


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
            raise UsageError(f"--output {url} is a file; the Ray engine writes Parquet parts into a folder or bucket "
                             "prefix (name one, such as scores/)")
        self.created = not self.fs.exists(self.root)  # removed again if it cannot be written
        if self.local:
            self.lock = ProcessLock(Path(self.root) / ".qmamba.lock", f"--output {url}", "write to another --output")
            try:
                self.lock.acquire()  # creates the folder too
            except OSError as err:
                raise UsageError(f"cannot write --output {url}: {err.strerror or err} (choose a writable "
                                 "folder)") from None
        self._check_writable()

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _check_writable(self) -> None:
        """Write and delete a small file: a read-only folder, a bucket without write access or without credentials
        is one line now, not after the first scores."""
        probe = self._path(f".qmamba-probe-{self.run}")
        try:
            with self.fs.open(probe, "wb") as f:
                f.write(b"qmamba")
            self.fs.rm(probe)
        except Exception as err:  # noqa: BLE001 - each fsspec backend raises its own (PermissionError, botocore, ...)
            self.unlock()
            if self.created and self.local:
                Path(self.root).rmdir()
            reason = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
            raise UsageError(f"cannot write --output {self.url}: {reason.splitlines()[0]} (choose a writable folder "
                             "or bucket, with credentials that may write to it)") from None

    def scored(self) -> set[str]:
        """The keys with a score in the parts an earlier run left; its error parts, leftover temporary files and
        summary are removed (failed images are tried again, and the output is incomplete until this run ends)."""
        import pyarrow.parquet as pq

        keys: set[str] = set()
        for entry in self.fs.ls(self.root, detail=False) if self.fs.isdir(self.root) else []:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("part-") and name.endswith(".parquet"):
                try:
                    table = pq.read_table(entry, columns=["path", "score"], filesystem=self.fs)
                except Exception as err:  # noqa: BLE001 - pyarrow's errors for a file that is no Parquet
                    raise UsageError(f"--output {self.url}: {name} is not a Parquet part of qmamba score ({err}); "
                                     "move it out of the folder and rerun") from None
                keys.update(k for k, s in zip(table["path"].to_pylist(), table["score"].to_pylist(),
                                              strict=True) if s is not None)
            elif name.startswith("errors-") or name == SUMMARY or (name.startswith(".") and name.endswith(".tmp")):
                self.fs.rm(entry)
        return keys

    def write(self, table: pa.Table) -> None:
        """The rows with a score as one part, those with an error as another."""
        import pyarrow.compute as pc

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
        upload completes), a hidden temporary file renamed into place on a file system."""
        if not self.local:
            with self.fs.open(self._path(name), "wb") as f:
                write(f)
            return
        temporary = self._path(f".{name}.tmp")
        try:
            with self.fs.open(temporary, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            self.fs.mv(temporary, self._path(name))
        except BaseException:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)
            raise

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the output complete: ``_qmamba.json`` with the model, the scale and the counts."""
        self._publish(SUMMARY, lambda f: f.write(json.dumps(summary, indent=2).encode() + b"\n"))

    def unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


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
