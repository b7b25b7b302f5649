"""numba's on-disk cache of compiled kernels, filed by what the source says rather than where it lies.

With ``NUMBA_CACHE_DIR`` set, numba files a function's compiled code in a folder named after the absolute path of
its source's folder (``ops_<sha1 of /path/to/src/qmamba/ops>``), so the same kernels at another path (a second
clone, a virtual environment made anew, a Ray job's working directory) compile again: about 11 s on two Zen 3
cores for a small model's fp32 and bf16 scans, forward and backward, in every process that starts before the first
has written them. :class:`SourceKeyedCacheLocator` names the folder after the source file's bytes instead. numba
(0.62 and later) takes it through ``NUMBA_CACHE_LOCATOR_CLASSES``, in place of its own list, so name its own
locators after it, as the test suite does (``tests/conftest.py``). Nothing stale can load: numba checks the
source's hash, its own version and the function's signature and target before it uses an entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from numba.core.caching import UserProvidedCacheLocator


class SourceKeyedCacheLocator(UserProvidedCacheLocator):
    """numba's locator for ``NUMBA_CACHE_DIR`` (it declines where that is unset), with one folder per source text:
    ``<file stem>_<sha1 of the file>``."""

    @classmethod
    def get_suitable_cache_subpath(cls, py_file: str) -> str:
        source = Path(py_file)
        return f"{source.stem}_{hashlib.sha1(source.read_bytes()).hexdigest()}"
