"""The qmamba command's C heap keeps freed memory: a freed block's pages serve the next allocation, unfaulted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qmamba.heap import keep_freed_memory, on_glibc

# minor page faults per 64 MiB block allocated, written and freed: before the command runs, and after `qmamba
# --version` ran as the process's own command (a first block grows the heap; the next ones reuse its pages)
FAULTS_PER_BLOCK = r"""
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)

def faults_per_block(blocks=4, size=64 << 20):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(blocks):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / blocks

before = faults_per_block()
sys.argv = ["qmamba", "--version"]
from qmamba.cli import main
main()
faults_per_block(1)
print(before, faults_per_block())
"""


@pytest.mark.skipif(not on_glibc(), reason="the setting is glibc malloc's")
def test_the_command_reuses_freed_pages() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_BLOCK], env=env, capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split()[-2:])
    # glibc maps a 64 MiB block afresh and unmaps it when freed: its 16,384 pages fault at every block (a few dozen
    # with transparent huge pages); kept, the heap's pages are written again without a fault
    assert before >= 16, out.stdout
    assert after <= 2, out.stdout


@pytest.mark.parametrize("variable, value", [("MALLOC_TRIM_THRESHOLD_", "131072"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=65536")])
def test_the_users_own_heap_settings_are_kept(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    assert keep_freed_memory() is False
