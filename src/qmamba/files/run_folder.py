"""Run folders (``runs/<name>/``) that protect their results.

A fit refuses a folder that already holds a run unless it resumes that run (``--ckpt_path last``) or is told to
replace it (``--overwrite true``), and holds a lock file for its whole life, so two processes never write into one
folder. A lock whose process is gone (killed, crashed) is stale and taken over with a warning. Temporary files
left by a write that was killed (atomic writes rename them into place) are removed when the next run starts there.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

from qmamba.errors import QMambaError

__all__ = ["ProcessLock", "RunFolderError", "RunLock", "prepare_fit_folder"]

log = logging.getLogger(__name__)

LOCK_NAME = ".qmamba.lock"
# what a fit, test or tuning run writes into its folder (TensorBoard's event files aside)
RUN_FILES = ("config.yaml", "hparams.yaml", "test_results.json", "tuned.pt", "predictions.csv")
RUN_FOLDERS = ("checkpoints", "splits")


class RunFolderError(QMambaError):
    """A run folder is in use or holds a run that the command would overwrite; the message names the choices."""


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process (shared file system): cannot tell, so assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class ProcessLock:
    """A lock file holding ``<pid> <host>``, created exclusively (never through a link); stale when that process is
    gone. ``what`` names the locked thing in messages, ``advice`` says what to do instead of waiting."""

    def __init__(self, path: Path, what: str, advice: str) -> None:
        self.path, self.what, self.advice = path, what, advice
        self.token = f"{os.getpid()} {socket.gethostname()}"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text(errors="replace").split() if self.path.is_file() else []
                pid, host = (int(owner[0]), owner[1]) if len(owner) == 2 and owner[0].isdigit() else (-1, "")
                if pid > 0 and _alive(pid, host):
                    raise RunFolderError(f"{self.what} is in use by another qmamba run (pid {pid} on {host}); wait "
                                         f"for it to end or {self.advice}") from None
                log.warning("%s: taking over a stale lock (%s: that process is gone)", self.what, " ".join(owner))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.token)
            return
        raise RunFolderError(f"cannot lock {self.what}: {self.path} keeps reappearing; is another run starting?")

    def release(self) -> None:
        try:
            if self.path.read_text() == self.token:
                self.path.unlink()
        except FileNotFoundError:
            pass


class RunLock(ProcessLock):
    """``<run>/.qmamba.lock``: one process per run folder."""

    def __init__(self, run: Path) -> None:
        super().__init__(run / LOCK_NAME, str(run), "choose another run name with --trainer.logger.init_args.name NAME")


def _existing_run(run: Path) -> list[str]:
    """The results a fit would overwrite: checkpoints, the saved config, test results."""
    found = [f"checkpoints/{p.name}" for p in sorted((run / "checkpoints").glob("*.ckpt"))]
    return found + [name for name in ("config.yaml", "test_results.json", "tuned.pt") if (run / name).is_file()]


def _remove_run(run: Path) -> None:
    for name in RUN_FOLDERS:
        shutil.rmtree(run / name, ignore_errors=True)
    for path in [*(run / n for n in RUN_FILES), *run.glob("events.out.tfevents.*")]:
        path.unlink(missing_ok=True)


def _remove_temporaries(run: Path) -> None:
    for folder in (run, run / "checkpoints"):
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)
            log.info("%s: removed %s, left by an interrupted write", run, path.name)


def prepare_fit_folder(run: Path, resuming: bool, overwrite: bool) -> RunLock:
    """Lock ``run`` for a fit and make sure it destroys nothing it was not asked to; returns the held lock."""
    lock = RunLock(run)
    lock.acquire()
    try:
        existing = _existing_run(run)
        if existing and not resuming:
            if not overwrite:
                resume = ("resume it with --ckpt_path last" if "checkpoints/last.ckpt" in existing else
                          "it has no checkpoints/last.ckpt to resume from (it stopped before its first epoch ended)")
                raise RunFolderError(
                    f"{run} already holds a run ({', '.join(existing)}); {resume}, start another with "
                    "--trainer.logger.init_args.name NEW_NAME, or replace it with --overwrite true")
            _remove_run(run)
            log.warning("%s: --overwrite: removed the earlier run (%s)", run, ", ".join(existing))
        _remove_temporaries(run)
    except BaseException:
        lock.release()
        raise
    return lock
