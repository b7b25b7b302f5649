"""Run the slices of a task range on torch's own intra-op threads, as one OpenMP parallel region of torch's runtime.

Why: when a torch operator ends, its OpenMP threads do not sleep; they spin, polling for the next parallel region
(libgomp's default is 300,000 polls, milliseconds). Work handed to other threads right after an operator (a pool of
Python threads) shares the cores with them until they give up. The fused CPU scan's backward, whose gradients torch
zeroes just before it, ran 1.3-2.0x slower that way on 2 AMX Xeon cores, and every scan in a model follows torch's
operators. Run as a region of torch's runtime, the spinning threads are the ones that take the work.

How: the region is entered through ``GOMP_parallel`` (GNU's ABI, which LLVM's and Intel's runtimes export too), looked
up through torch's own extension module so that it is the runtime torch uses, never a second one. Each thread calls
back into Python through ctypes and runs its slice; work that releases the GIL (numba's ``nogil`` kernels) runs in
parallel. Where torch has no such runtime, a pool of Python threads runs the slices.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch

__all__ = ["run_slices"]

Slice = Callable[[int, int], object]  # work(first_task, last_task)

_REGION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # a parallel region's body: void body(void *data)


def _slice(tasks: int, i: int, threads: int) -> tuple[int, int]:
    """Thread ``i``'s tasks of ``threads``: [first, last), contiguous, their sizes differing by at most one."""
    return tasks * i // threads, tasks * (i + 1) // threads


class _OpenMP:
    """torch's OpenMP runtime, entered as GNU's ABI does for ``#pragma omp parallel num_threads(n)``."""

    def __init__(self, runtime: ctypes.CDLL) -> None:
        self.parallel = runtime.GOMP_parallel
        self.parallel.argtypes = (_REGION, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
        self.parallel.restype = None
        self.thread_num, self.num_threads = runtime.omp_get_thread_num, runtime.omp_get_num_threads

    def run(self, work: Slice, tasks: int, threads: int) -> None:
        """One region of ``threads`` threads (the caller is one of them), each running its slice of the tasks."""
        errors: list[BaseException] = []

        def body(_: object) -> None:
            try:
                i, n = self.thread_num(), self.num_threads()  # n: the team the runtime gave, maybe fewer than asked
                work(*_slice(tasks, i, n))
            except BaseException as error:  # noqa: BLE001 - a ctypes callback cannot raise: re-raised by the caller
                errors.append(error)

        self.parallel(_REGION(body), None, threads, 0)
        if errors:
            raise errors[0]


@cache
def _torch_openmp() -> _OpenMP | None:
    """torch's OpenMP runtime, or None where torch runs without one or it lacks GNU's entry points."""
    if not torch.backends.openmp.is_available():
        return None
    try:  # symbols looked up in torch's extension module resolve through its own dependencies, to its runtime
        return _OpenMP(ctypes.CDLL(torch._C.__file__, mode=os.RTLD_NOLOAD | os.RTLD_LAZY))
    except (AttributeError, OSError):  # no RTLD_NOLOAD (Windows), no such symbol
        return None


_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _executor(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads for this process (a forked DataLoader worker gets its own)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="qmamba-slices"))
        return _pool[2]


def run_slices(work: Slice, tasks: int) -> None:
    """``work(first, last)`` over tasks [0, tasks) split evenly across ``torch.get_num_threads()`` threads (fewer when
    there are fewer tasks), so that ``torch.set_num_threads``, DataLoader workers (1 thread) and DDP processes are
    respected. Each task runs exactly once."""
    threads = max(1, min(torch.get_num_threads(), tasks))
    if threads == 1:
        work(0, tasks)
        return
    openmp = _torch_openmp()
    if openmp is not None:
        openmp.run(work, tasks, threads)
        return
    pool = _executor(threads)
    for future in [pool.submit(work, *_slice(tasks, i, threads)) for i in range(threads)]:
        future.result()
