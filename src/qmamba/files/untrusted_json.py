"""JSON from files qmamba did not write (a model folder's ``config.json``, a safetensors header): its nesting is
bounded before it is parsed, so a crafted file of ten thousand brackets is one line rather than the parser's
``RecursionError``. Its size is the caller's to bound, before reading."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

__all__ = ["MAX_DEPTH", "loads_untrusted"]

MAX_DEPTH = 32  # qmamba's own files nest 4 deep
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string: brackets inside it are text


def loads_untrusted(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(data)``, after checking that no value nests deeper than ``max_depth``. Raises ``ValueError``
    (``json.JSONDecodeError`` for bad JSON, or UnicodeDecodeError) with a message for one line."""
    depth = _depth(data)
    if depth > max_depth:
        raise ValueError(f"its JSON nests {depth} levels deep, more than the {max_depth} a qmamba file can")
    return json.loads(data)


def _depth(data: bytes) -> int:
    outside = np.frombuffer(_STRING.sub(b'""', data), np.uint8)
    steps = np.isin(outside, np.frombuffer(b"[{", np.uint8)).astype(np.int64) - np.isin(
        outside, np.frombuffer(b"]}", np.uint8))
    return int(np.cumsum(steps).max(initial=0))
