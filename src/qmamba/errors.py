"""Errors the user can fix: the ``qmamba`` command prints their message on one line, with no traceback."""

__all__ = ["QMambaError", "UsageError"]


class QMambaError(RuntimeError):
    """A problem with the user's input (data, checkpoint, run folder, options); the message says how to fix it.
    The command exits with status 1."""


class UsageError(QMambaError):
    """Options that cannot work together or on this machine; the command exits with status 2."""
