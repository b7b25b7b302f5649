"""The Triton selective scan on the CPU: compiled for sm_90 (no GPU needed), and ``triton_cases.py`` run by Triton's
interpreter in a subprocess (Triton reads TRITON_INTERPRET when it is imported, so the cases cannot run in this
process)."""

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


@pytest.mark.parametrize("kernel_name", ["_forward_kernel", "_backward_kernel"])
def test_triton_kernels_compile_for_hopper(kernel_name):
    """The interpreter runs kernels as Python and misses what only the compiler checks (a loop-carried variable
    that changes type, which broke both kernels on the first H200 run). Compiling to sm_90 needs no GPU."""
    pytest.importorskip("triton", reason="triton is not installed (it ships with CUDA builds of torch)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qmamba.ops import triton_scan

    kernel = getattr(triton_scan, kernel_name)
    for softplus, low_rank in [(True, True), (True, False), (False, True), (False, False)]:
        constants = dict(SOFTPLUS=softplus, LOW_RANK=low_rank, BLOCK=32, N_PAD=16, R_PAD=8)
        signature = {p.name: "constexpr" if p.is_constexpr else "*i32" if p.name == "table_ptr"
                     else "*fp32" if p.name.endswith("_ptr") else "i32" for p in kernel.params}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], (kernel_name, constants)
