"""Reading a pickle that should hold plain data only (pyiqa's split files), without running anything in it.

``pickle.load`` runs whatever a file names: a split file from a shared folder or a download is code. Here no class or
function can be looked up (every ``GLOBAL`` / ``STACK_GLOBAL`` / extension opcode is refused before it resolves), and
the result must be made of dicts, lists, tuples, ints and strings alone; anything else is refused on one line.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

from qmamba.errors import QMambaError

__all__ = ["PlainPickleError", "read_plain_pickle"]

PLAIN_TYPES = (dict, list, tuple, int, str)
MAX_BYTES = 256 * 2**20  # a split file of a million-image dataset is a few MB


class PlainPickleError(QMambaError):
    """A pickle that names a class or function, holds another type, or cannot be read."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        raise PlainPickleError(f"it names {module}.{name}")

    def persistent_load(self, pid: object) -> object:
        raise PlainPickleError("it refers to a persistent object")


def read_plain_pickle(path: str | os.PathLike[str], what: str = "pickle") -> object:
    """The plain data (dicts, lists, tuples, ints, strings) a pickle at ``path`` holds, or a
    :class:`PlainPickleError` naming what else is in it; ``what`` names the file in messages."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise PlainPickleError(f"{what} {path} holds more than {MAX_BYTES >> 20} MB; a split file is far smaller")
        data = path.read_bytes()
    except OSError as err:
        raise PlainPickleError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        value = _PlainUnpickler(io.BytesIO(data)).load()
    except PlainPickleError as err:
        raise PlainPickleError(f"{what} {path} is refused: {err}; qmamba reads only dicts, lists, tuples, ints "
                               "and strings from it (nothing in it was run)") from None
    except Exception as err:  # noqa: BLE001 - a damaged pickle raises any of a dozen types
        raise PlainPickleError(f"cannot read {what} {path}: not a readable pickle ({type(err).__name__}: {err})"
                               ) from None
    other = _first_other_type(value)
    if other is not None:
        raise PlainPickleError(f"{what} {path} is refused: it holds a {other}; qmamba reads only dicts, lists, "
                               "tuples, ints and strings from it")
    return value


def _first_other_type(value: object) -> str | None:
    """The name of the first type in ``value`` that is not plain data (walked without recursion; a pickle may hold
    a list that contains itself)."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if type(item) not in PLAIN_TYPES:
            return type(item).__name__
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None
