"""The Triton selective scan on the CPU: ``triton_cases.py`` run by Triton's interpreter in a subprocess (Triton
reads TRITON_INTERPRET when it is imported, so the cases cannot run in this process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_cases.py")


@pytest.mark.slow
def test_triton_kernels_match_the_reference_under_the_interpreter():
    pytest.importorskip("triton", reason="triton is not installed (it ships with CUDA builds of torch)")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(CASES)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout and "skipped" not in result.stdout
