"""The fused CPU scan against its floor, at QMamba-T's four stage shapes, forward and backward, fp32 and bf16 operands.

    python benchmarks/scan_floor.py                      # QMamba-T at 224x224, batch 2 (about 2 minutes on 2 cores)
    python benchmarks/scan_floor.py --batch 8 --dtypes float32

Two floors are measured in the same run, with the kernel's own threads, partition and operand layout:

* memory: a kernel that reads every operand the scan reads once, in token order, and writes every output the scan
  writes once (forward: y; backward: the gradients of u, of the step sizes' rank-R factor, of B and of C), with one
  operation per element;
* arithmetic: the scan's loops with the recurrence taken out: every softplus, exponential and multiply-add the scan
  computes (the in-kernel step-size projection's R per channel included), but no step waits for the previous one's
  state, and the operands are read from a window of 64 tokens that stays in the L1 cache.

From ``GEMM_RANK`` on (QMamba-T's stage 3) the backward computes the step-size projection's gradients as
matrix products outside the kernel; the floors keep them in the kernel, the same multiply-adds.

The scan's time is reported as a multiple of the larger floor: what the recurrence and the walk along the scan
orders (rows, columns, reversed) cost beyond the unavoidable. Forward: the op as inference runs it (no autograd);
backward: ``qmamba::cpu_scan_backward`` as a training step runs it (partial sums summed, gradients in the inputs'
dtypes). Each figure is the median (min-max) over blocks of consecutive calls, the kernels alternated. Run on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload

from qmamba.heap import keep_freed_memory
from qmamba.machine import device_description
from qmamba.ops.cpu_scan import (
    _CONTRACT,
    _JIT,
    _REDUCE,
    HELD,
    _bf16_bits,
    _exp,
    _flat,
    _held_delta_grads,
    _held_step_deltas,
    _load,
    _Problem,
    _run,
    _scratch,
    _softplus,
    _softplus_and_slope,
    _sum,
    _task_block,
    selective_scan_cpu,
)
from qmamba.ops.scan_order import CROSS_2D, scan_order

STAGES = ((56, 192, 6), (28, 384, 12), (14, 768, 24), (7, 1536, 48))  # QMamba-T at 224: (side, inner D, dt rank R)
LABELS = {"float32": "fp32", "bfloat16": "bf16"}
WINDOW = 64  # tokens the arithmetic floor cycles through: every operand it reads stays in L1


# --------------------------------------------------------------------------------------------------- memory floor
def _store(y, value):  # noqa: ANN001, ANN202
    """value as y stores it: bf16 bits for a bf16 y (int16 here), else itself."""


@overload(_store, inline="always")
def _store_impl(y, value):  # noqa: ANN001, ANN202
    if y.dtype == types.int16:
        return lambda y, value: _bf16_bits(np.float32(value))
    return lambda y, value: value


@njit(fastmath=_CONTRACT, **_JIT)
def _memory_forward(u, delta, B, C, y, dims, first_task, last_task):  # noqa: ANN001, ANN201
    """y[b, t, c] = u[b, t, c] * (sum over k of delta[b, k, t, 0] + B + C): every operand read once, y written once."""
    batch, Ku, K, Ko, T, L, channels, N, rank, block = dims
    for task in range(first_task, last_task):
        b, _, c0, width = _task_block(task, channels, block)
        for p in range(T):
            s = _load(u, 0) * 0
            for k in range(K):
                low = ((b * K + k) * T + p) * rank
                for r in range(rank):
                    s += _load(delta, low + r)
                bc = ((b * K + k) * T + p) * N
                for n in range(N):
                    s += _load(B, bc + n) + _load(C, bc + n)
            row = np.uint64((b * T + p) * channels + c0)
            for c in range(width):
                y[row + c] = _store(y, _load(u, row + c) * s)


@njit(fastmath=_CONTRACT, **_JIT)
def _memory_backward(u, delta, B, C, grad_y, grad_u, grad_delta, grad_B, grad_C, dims, first_task,  # noqa: ANN001, ANN201
                     last_task):
    """Every operand of the backward read once and every large gradient written once, one operation per element."""
    batch, Ku, K, Ko, T, L, channels, N, rank, block = dims
    for task in range(first_task, last_task):
        b, _, c0, width = _task_block(task, channels, block)
        for p in range(T):
            row = np.uint64((b * T + p) * channels + c0)
            s = grad_u[0] * 0
            for c in range(width):
                g = _load(grad_y, row + c)
                grad_u[row + c] = g * _load(u, row + c)
                s += g
            for k in range(K):
                low = ((b * K + k) * T + p) * rank
                for r in range(rank):
                    grad_delta[low + r] = s * _load(delta, low + r)
                bc = ((b * K + k) * T + p) * N
                for n in range(N):
                    grad_B[bc + n] = s * _load(B, bc + n)
                    grad_C[bc + n] = s * _load(C, bc + n)


# ----------------------------------------------------------------------------------------------- arithmetic floor
@njit(**_JIT)
def _held_window_step(zs, tokens, step, window, delta, proj, b, k, c0, width, dims):  # noqa: ANN001, ANN201
    """A floor's token at ``step`` (cycling through the first ``window``) and its step sizes, projected HELD steps at
    a time as the kernels project them."""
    block = dims[-1]
    s = step % HELD
    if s == 0:
        count = min(HELD, dims[5] - step)
        for i in range(count):
            tokens[i] = (step + i) % window
        _held_step_deltas(zs, tokens, count, delta, proj, b, k, c0, width, dims)
    return tokens[s], zs[s * block:]


@njit(fastmath=_CONTRACT, **_JIT)
def _arithmetic_forward(u, delta, proj, A, B, C, D, bias, acc, dims, first_task, last_task):  # noqa: ANN001, ANN201
    """The forward kernel's arithmetic per (task, sequence, step), with each step's state computed from that step's
    operands alone and every read within the first WINDOW tokens."""
    batch, Ku, K, Ko, T, L, channels, N, rank, block = dims
    window = min(T, WINDOW)
    zs = _scratch(HELD * block, A.dtype)
    tokens = np.empty(HELD, dtype=np.int64)
    dt = _scratch(block, A.dtype)
    dtu = _scratch(block, A.dtype)
    out = _scratch(block, A.dtype)
    for task in range(first_task, last_task):
        b, _, c0, width = _task_block(task, channels, block)
        for k in range(K):
            kc = np.uint64(k * channels + c0)
            for step in range(L):
                p, z = _held_window_step(zs, tokens, step, window, delta, proj, b, k, c0, width, dims)
                u_row = np.uint64((b * T + p) * channels + c0)
                for c in range(width):
                    d = _softplus(z[c] + bias[kc + c])
                    uc = _load(u, u_row + c)
                    dt[c] = d
                    dtu[c] = d * uc
                    out[c] = D[kc + c] * uc
                bc = ((b * K + k) * T + p) * N
                for n in range(N):
                    b_n, c_n = _load(B, bc + n), _load(C, bc + n)
                    a_row = np.uint64((k * N + n) * channels + c0)
                    for c in range(width):
                        h = _exp(dt[c] * A[a_row + c]) * dtu[c] + dtu[c] * b_n  # the state: not the previous step's
                        out[c] += h * c_n
                acc_row = np.uint64((task * window + p) * block)
                for c in range(width):
                    acc[acc_row + c] += out[c]


# The two arithmetic floors repeat the kernels' loop bodies on purpose, each line for line but for the carried state
# (and the adjoint state): a change to the arithmetic of `_forward_kernel` or `_backward_kernel` belongs here too.
@njit(fastmath=_REDUCE, **_JIT)
def _arithmetic_backward(u, delta, proj, A, B, C, D, bias, grad_y, grad_u, grad_delta, grad_proj, grad_A,  # noqa: ANN001, ANN201
                         grad_B, grad_C, grad_D, grad_bias, dims, first_task, last_task):
    """The backward kernel's arithmetic (the forward recomputed with softplus' slope, then the adjoint pass), each
    step's state and adjoint state from that step's operands alone, every read and write within WINDOW tokens."""
    batch, Ku, K, Ko, T, L, channels, N, rank, block = dims
    window = min(T, WINDOW)
    dts = _scratch(window * block, A.dtype)
    slopes = _scratch(window * block, A.dtype)
    states = _scratch(window * N * block, A.dtype)
    zs = _scratch(HELD * block, A.dtype)
    gy = _scratch(block, A.dtype)
    uc = _scratch(block, A.dtype)
    g_dt = _scratch(block, A.dtype)
    g_uc = _scratch(block, A.dtype)
    held = _scratch(HELD * block, A.dtype)
    tokens = np.empty(HELD, dtype=np.int64)
    g_A = _scratch(N * block, A.dtype)
    g_A[:] = 0
    g_D = _scratch(block, A.dtype)
    g_D[:] = 0
    g_bias = _scratch(block, A.dtype)
    g_bias[:] = 0
    terms_B = _scratch(block, A.dtype)
    terms_C = _scratch(block, A.dtype)
    for task in range(first_task, last_task):
        b, blk, c0, width = _task_block(task, channels, block)
        for k in range(K):
            kc = np.uint64(k * channels + c0)
            for step in range(L):
                p, z = _held_window_step(zs, tokens, step, window, delta, proj, b, k, c0, width, dims)
                sl = np.uint64(p * block)
                u_row = np.uint64((b * T + p) * channels + c0)
                for c in range(width):
                    uc[c] = _load(u, u_row + c)
                    dts[sl + c], slopes[sl + c] = _softplus_and_slope(z[c] + bias[kc + c])
                b_row = ((b * K + k) * T + p) * N
                for n in range(N):
                    b_n = _load(B, b_row + n)
                    a_row, s_row = np.uint64((k * N + n) * channels + c0), np.uint64((p * N + n) * block)
                    for c in range(width):
                        d = dts[sl + c]
                        states[s_row + c] = _exp(d * A[a_row + c]) * uc[c] + d * uc[c] * b_n
            count = 0
            for step in range(L - 1, -1, -1):
                p = step % window
                sl = np.uint64(p * block)
                u_row = np.uint64((b * T + p) * channels + c0)
                for c in range(width):
                    gy[c] = _load(grad_y, u_row + c)
                    uc[c] = _load(u, u_row + c)
                    g_dt[c] = 0
                    g_uc[c] = 0
                b_row = ((b * K + k) * T + p) * N
                for n in range(N):
                    b_n, c_n = _load(B, b_row + n), _load(C, b_row + n)
                    a_row, s_row = np.uint64((k * N + n) * channels + c0), np.uint64((p * N + n) * block)
                    g_row = np.uint64(n * block)
                    for c in range(width):
                        d, a_n = dts[sl + c], A[a_row + c]
                        a = _exp(d * a_n)
                        gs = a * gy[c] + gy[c] * c_n  # the adjoint state: not the next step's
                        g_x = gs * states[s_row + c] * a
                        g_A[g_row + c] += g_x * d
                        g_dt[c] += g_x * a_n + gs * b_n * uc[c]
                        g_uc[c] += gs * d * b_n
                        terms_B[c] = gs * d * uc[c]
                        terms_C[c] = gy[c] * states[s_row + c]
                    out = (((blk * batch + b) * K + k) * T + p) * N + n
                    grad_B[out] += _sum(terms_B, width)
                    grad_C[out] += _sum(terms_C, width)
                held_row = np.uint64(count * block)
                for c in range(width):
                    g_z = g_dt[c] * slopes[sl + c]
                    g_bias[c] += g_z
                    g_D[c] += gy[c] * uc[c]
                    held[held_row + c] = g_z
                tokens[count] = p
                count += 1
                if count == HELD:
                    _held_delta_grads(held, tokens, count, delta, proj, grad_delta, grad_proj, b, blk, k, c0, width,
                                      dims)
                    count = 0
                for c in range(width):
                    grad_u[u_row + c] += g_uc[c] + gy[c] * D[kc + c]
            _held_delta_grads(held, tokens, count, delta, proj, grad_delta, grad_proj, b, blk, k, c0, width, dims)
            for n in range(N):
                a_out, g_row = np.uint64(((b * K + k) * N + n) * channels + c0), np.uint64(n * block)
                for c in range(width):
                    grad_A[a_out + c] += g_A[g_row + c]
            bk = np.uint64((b * K + k) * channels + c0)
            for c in range(width):
                grad_D[bk + c] += g_D[c]
                grad_bias[bk + c] += g_bias[c]


# ------------------------------------------------------------------------------------------------------ operands
def stage_operands(batch: int, side: int, dim: int, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """SS2D's scan operands at one stage, in the kernel's layout: u, delta (rank R), B, C in ``dtype``; the
    projection, A, D and bias in fp32; the cross-scan's table."""
    g = torch.Generator().manual_seed(0)
    k, tokens, n = len(CROSS_2D), side * side, 1
    operands = {
        "u": torch.randn(batch, 1, tokens, dim, generator=g),
        "delta": 0.5 * torch.randn(batch, k, tokens, rank, generator=g),
        "A": -(torch.rand(k, n, dim, generator=g) + 0.5),
        "B": torch.randn(batch, k, tokens, n, generator=g),
        "C": torch.randn(batch, k, tokens, n, generator=g),
        "D": torch.randn(k, dim, generator=g),
        "bias": torch.randn(k, dim, generator=g) - 2,
        "proj": torch.randn(k, rank, dim, generator=g) * rank**-0.5,
    }
    for name in ("u", "delta", "B", "C"):
        operands[name] = operands[name].to(dtype)
    operands["table"] = scan_order(CROSS_2D, side, side).table
    return operands


def kernels(x: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    """The scan's forward and backward and their four floors, as calls on the same operands."""
    dtype = x["u"].dtype
    scan = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["bias"], x["table"])
    y = selective_scan_cpu(*scan, True, True, delta_proj=x["proj"], out_dtype=dtype)
    grad_y = torch.randn_like(y, dtype=torch.float32).to(dtype)
    problem = _Problem(x["u"], x["delta"], x["proj"], x["A"], x["table"], merge=True)
    flat = {name: _flat(t) for name, t in x.items()}
    u, delta, proj, A, B, C, D, bias = (flat[name] for name in ("u", "delta", "proj", "A", "B", "C", "D", "bias"))
    zeros = torch.zeros
    grad_u, grad_delta, grad_B, grad_C = (zeros(t.shape) for t in (x["u"], x["delta"], x["B"], x["C"]))
    partial_delta, partial_B, partial_C = (zeros(problem.blocks, *t.shape) for t in (x["delta"], x["B"], x["C"]))
    batch = x["u"].shape[0]
    grad_proj, grad_A, grad_D, grad_bias = (zeros(batch, *x[name].shape) for name in ("proj", "A", "D", "bias"))
    acc = _flat(torch.zeros(problem.tasks * WINDOW * problem.block))  # torch aligns to 64 bytes, as the scan's buffers
    out = _flat(torch.empty_like(y))
    g_y = _flat(grad_y)
    op = selective_scan_cpu.backward_op

    def scan_forward() -> None:
        with torch.inference_mode():
            selective_scan_cpu(*scan, True, True, delta_proj=x["proj"], out_dtype=dtype)

    return {
        "forward": scan_forward,
        "forward memory": lambda: _run(_memory_forward, problem.tasks, u, delta, B, C, out, problem.dims),
        "forward arithmetic": lambda: _run(_arithmetic_forward, problem.tasks, u, delta, proj, A, B, C, D, bias, acc,
                                           problem.dims),
        "backward": lambda: op(grad_y, x["u"], x["delta"], x["proj"], x["A"], x["B"], x["C"], x["D"], x["bias"],
                               x["table"], True, True),
        "backward memory": lambda: _run(_memory_backward, problem.tasks, u, delta, B, C, g_y, *map(_flat, (
            grad_u, grad_delta, grad_B, grad_C)), problem.dims),
        "backward arithmetic": lambda: _run(_arithmetic_backward, problem.tasks, u, delta, proj, A, B, C, D, bias,
                                            g_y, *map(_flat, (grad_u, partial_delta, grad_proj, grad_A, partial_B,
                                                              partial_C, grad_D, grad_bias)), problem.dims),
    }


def block_times(calls: dict[str, Callable[[], object]], blocks: int, block_seconds: float) -> dict[str, list[float]]:
    """Seconds per call of each kernel in steady state: per block, one untimed call, then consecutive calls for at
    least ``block_seconds`` (and 3); the kernels' blocks alternated."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(blocks):
        for name, call in calls.items():
            call()
            count, start = 0, time.perf_counter()
            while count < 3 or time.perf_counter() - start < block_seconds:
                call()
                count += 1
            times[name].append((time.perf_counter() - start) / count)
    return times


def ms(values: list[float]) -> str:
    """Milliseconds, median (min-max), to 3 significant digits."""
    return f"{statistics.median(values) * 1e3:.3g} ({min(values) * 1e3:.3g}-{max(values) * 1e3:.3g})"


def floor_table(batch: int, dtypes: list[str], blocks: int, block_seconds: float, stages: tuple = STAGES) -> None:
    print(f"\nfused CPU scan against its floor on {device_description()}: batch {batch}, cross-scan "
          f"(K = 4), N = 1; ms per call, median (min-max) of {blocks} blocks of at least {block_seconds:g} s; "
          "x floor: the scan over the larger floor")
    header = (f"| {'stage (side, D, R)':<18} | {'operands':<8} | {'pass':<8} | {'scan ms':>20} | {'memory floor':>20} "
              f"| {'arithmetic floor':>20} | {'x floor':>7} |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for side, dim, rank in stages:
        for name in dtypes:
            times = block_times(kernels(stage_operands(batch, side, dim, rank, getattr(torch, name))), blocks,
                                block_seconds)
            for kind in ("forward", "backward"):
                scan, memory, arithmetic = (times[f"{kind}{part}"] for part in ("", " memory", " arithmetic"))
                floor = max(statistics.median(memory), statistics.median(arithmetic))
                print(f"| {f'{side}, {dim}, {rank}':<18} | {LABELS[name]:<8} "
                      f"| {kind:<8} | {ms(scan):>20} | {ms(memory):>20} | {ms(arithmetic):>20} "
                      f"| {statistics.median(scan) / floor:>7.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--block-seconds", type=float, default=0.5)
    parser.add_argument("--stages", type=int, nargs="+", choices=range(4), default=range(4),
                        help="QMamba-T's stages to measure (0-3)")
    parser.add_argument("--shape", nargs=3, type=int, action="append", metavar=("SIDE", "D", "R"),
                        help="another shape instead of QMamba-T's stages: map side, inner dim, dt rank (repeatable)")
    args = parser.parse_args()
    keep_freed_memory()  # as the qmamba command's process runs
    stages = tuple(map(tuple, args.shape)) if args.shape else tuple(STAGES[i] for i in args.stages)
    floor_table(args.batch, args.dtypes, args.blocks, args.block_seconds, stages)


if __name__ == "__main__":
    main()
