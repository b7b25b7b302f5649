"""The Triton selective scan on the CPU: compiled for sm_80 and sm_90 (no GPU needed), and ``triton_cases.py`` run
by Triton's interpreter in a subprocess (Triton reads TRITON_INTERPRET when it is imported, so the cases cannot run
in this process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_cases.py")


SHARDS = 2  # tests of their own, which pytest-xdist's workers share out


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SHARDS), ids=[f"shard{i}of{SHARDS}" for i in range(SHARDS)])
def test_triton_kernels_match_the_reference_under_the_interpreter(tmp_path, shard):
    """Every SHARDS-th case from the shard-th (conftest's QMAMBA_TEST_SHARD), in a process of its own: the
    interpreter is single-threaded Python, and this process only waits."""
    pytest.importorskip("triton", reason="triton is not installed (it ships with CUDA builds of torch)")
    log = tmp_path / "cases.log"
    with log.open("w") as sink:
        process = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(CASES)], stdout=sink,
            stderr=subprocess.STDOUT, timeout=1200,
            env={**os.environ, "TRITON_INTERPRET": "1", "QMAMBA_TEST_SHARD": f"{shard}/{SHARDS}",
                 "OMP_NUM_THREADS": "1"})
    output = log.read_text()
    assert process.returncode == 0, output[-8000:]
    assert " passed" in output and "failed" not in output and "skipped" not in output


KERNELS = ["_chunk_summary_kernel", "_chunk_carry_kernel", "_chunk_output_kernel", "_chunk_backward_kernel"]
HALF_OPERANDS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr"}  # read as bf16 / fp16 when given so


@pytest.mark.parametrize("arch", [80, 90], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("kernel_name", KERNELS)
def test_triton_kernels_compile_for_ampere_and_hopper(kernel_name, arch):
    """The interpreter runs kernels as Python and misses what only the compiler checks (a loop-carried variable
    that changes type broke the first kernels on their first H200 run). Compiling to sm_80 / sm_90 needs no GPU:
    every kernel, with every compile-time branch taken once, for fp32 and bf16 operands."""
    pytest.importorskip("triton", reason="triton is not installed (it ships with CUDA builds of torch)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qmamba.ops import triton_scan

    kernel = getattr(triton_scan, kernel_name)
    names = {p.name for p in kernel.params}
    for flags, operand in [(True, "fp32"), (False, "bf16")]:
        constants = {name: value for name, value in dict(
            SOFTPLUS=flags, LOW_RANK=flags, ADJOINT=flags, ACCUMULATE=flags, REVERSE=flags,
            CHUNK=triton_scan.TILE.chunk, BLOCK=triton_scan.TILE.channels).items() if name in names}
        signature = {p.name: "constexpr" if p.is_constexpr else "*i32" if p.name == "table_ptr"
                     else f"*{operand}" if p.name in HALF_OPERANDS else "*fp32" if p.name.endswith("_ptr") else "i32"
                     for p in kernel.params}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants),
                                  target=GPUTarget("cuda", arch, 32))
        assert compiled.asm["cubin"], (kernel_name, constants, operand)
