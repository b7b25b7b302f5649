"""The C heap of a qmamba process keeps the memory torch frees, for the next batch to reuse.

torch allocates CPU tensors with ``malloc``. glibc's malloc serves a large request (above 128 KiB at first, 32 MiB at
most) with a fresh ``mmap`` and unmaps it when it is freed, and gives the top of its heap back to the operating
system once 128 KiB of it are free. A model then writes every activation into pages that the kernel must map and zero
first, batch after batch: QMamba-T's fp32 inference at batch 8 took 60,000-84,000 minor page faults per batch and
15 % of the cores' time in the kernel (2 AMX Xeon cores), Swin-T's about half that. Serving every request from the
heap and never trimming it makes the second batch reuse the first one's pages; the process then holds its peak
memory, as it would reach that peak again at the next batch anyway (peak resident memory +5 % at fp32 inference, the
same in training). It is the setting Intel's recommendations give jemalloc for torch on CPUs (never return freed
memory), made with glibc's own ``mallopt``.

It is process-wide, so qmamba makes it where the process is its own: the ``qmamba`` command, Ray's CPU scoring
actors and the benchmarks, never on import. A library user's long scoring loop can call :func:`keep_freed_memory`
itself. Settings the user made (``MALLOC_*_`` variables, ``GLIBC_TUNABLES`` for ``glibc.malloc``) are kept, and a
process whose malloc is not glibc's is left alone.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["keep_freed_memory", "on_glibc"]

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def on_glibc() -> bool:
    """Whether the C library is GNU's, whose malloc the setting is for."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a GNU system: no such name, or no confstr at all
        return False


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap (no ``mmap``) and never trim it; True when the setting was made."""
    if any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not on_glibc():
        return False
    # looked up in the whole process: a preloaded allocator's own mallopt where it has one (tcmalloc's does nothing),
    # else glibc's, which then governs only what is not allocated through the preloaded one
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    heap_only, never_trimmed = mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, -1)  # -1: never (mallopt(3))
    return bool(heap_only and never_trimmed)
