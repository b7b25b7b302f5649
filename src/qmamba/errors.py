"""Errors the user can fix: the ``qmamba`` command prints their message on one line, with no traceback."""

import errno

__all__ = ["QMambaError", "UsageError", "is_disk_full"]


class QMambaError(RuntimeError):
    """A problem with the user's input (data, checkpoint, run folder, options); the message says how to fix it.
    The command exits with status 1."""


class UsageError(QMambaError, ValueError):
    """An option or name that cannot work (an unknown model, a size below 1, a GPU recipe without a GPU); the
    command exits with status 2. A ``ValueError`` too, for code that calls qmamba as a library."""


def is_disk_full(err: BaseException) -> bool:
    """An OSError of a full disk or an exhausted quota: the user frees space and reruns."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
