"""The error every user-fixable data problem raises (the CLI prints its message on one line)."""

from qmamba.errors import QMambaError

__all__ = ["DatasetError"]


class DatasetError(QMambaError):
    """A dataset folder, label file or image is missing or malformed; the message says how to fix it."""
