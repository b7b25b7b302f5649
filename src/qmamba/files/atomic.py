"""Atomic file writes: write a temporary file next to the target, fsync, then rename over it.

A crash or Ctrl-C mid-write leaves the previous file (or none), never a truncated one. The temporary file has a
random name and is created exclusively, and renaming replaces a symbolic link at the target instead of following it,
so a link planted next to the target redirects nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_folder", "atomic_writer", "write_bytes_atomic", "write_text_atomic"]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask is process-wide, and writers may run in threads


@contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary stream whose bytes replace ``path`` when the block ends without an error (and are removed if it
    fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str, errors: str = "strict") -> None:
    write_bytes_atomic(path, text.encode("utf-8", errors))


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A new folder whose files appear at ``path`` all at once when the block ends without an error (a temporary
    sibling, renamed), each with the permissions open() would give it (a library may create its file 0600, as
    safetensors does); ``path`` must not exist or be an empty folder (never a link), and is left as it was when the
    block fails."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and (not path.is_dir() or any(path.iterdir()))):
        raise FileExistsError(f"{path} exists and is not an empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp creates 0700
        yield staging
        for entry in staging.iterdir():
            if entry.is_file() and not entry.is_symlink():
                os.chmod(entry, 0o666 & ~_UMASK)
        if path.exists():
            path.rmdir()
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
