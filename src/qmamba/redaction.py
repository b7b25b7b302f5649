"""Credentials out of what qmamba shows and keeps: a URL's user name and password (``https://user:pass@host/``,
``s3://key:secret@bucket/``) are masked in every message, log line, error row and record. The read itself still
gets them (:class:`~qmamba.inference.sources.RemoteFile` keeps the URL as given)."""

import logging
import re

__all__ = ["log_to_stderr", "without_password"]


# a URL's scheme and authority (up to the path, query, fragment or the end of the word); what it holds before its
# last "@" is the user information, whose password may itself hold "@" and ":" (urllib splits at the last "@" too)
_AUTHORITY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#\s]*@)")


def without_password(text: str) -> str:
    """``text`` with the credentials of every URL in it masked, for messages and records: ``user:***@host`` for a
    user and password, ``***@host`` for a user name alone (a token is often sent that way)."""
    return _AUTHORITY.sub(_masked, text)


def _masked(match: re.Match[str]) -> str:
    user, password, _ = match[2][:-1].partition(":")
    return f"{match[1]}{user}:***@" if password else f"{match[1]}***@"


class _MaskCredentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = without_password(record.getMessage()), ()
        return True


def log_to_stderr(level: int = logging.INFO, fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """``logging.basicConfig`` for a command, whose lines never show a URL's credentials (a table's rows, a model's
    URL and a shard's name are logged as given)."""
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_MaskCredentials())
