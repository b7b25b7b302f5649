"""Fused selective scan for CPU tensors: numba kernels that read in scan order, discretise, scan and merge in one pass.

Why this exists: written with torch ops, a cross-scan materialises the input in four permuted copies, several
(batch, K*D, N, L) intermediates and a permuted copy of the output; on a CPU that plumbing costs ~85 % of a
QMamba-T forward. Here each (batch, channel block) task walks every direction's index table once and keeps the state
in a small task-local buffer: nothing of size (batch, K, D, L) is ever allocated.

Layout (channels innermost, so that every time step is one SIMD loop over a block of channels):

    u          (batch, Ku, T, C)  tokens at their own positions; Ku = 1: one token set shared by all K sequences
                                  (SS2D's directions), Ku = K: one per sequence (channel groups of a 1-D scan)
    delta      (batch, K, T, C)   before bias and softplus, at token positions (not in scan order); or, low rank,
               (batch, K, T, R)   with proj (K, R, C): delta = delta @ proj[k], computed per step (SS2D's dt_proj),
                                  so that the forward never materialises the full step sizes (the backward does,
                                  from rank GEMM_RANK on: see there)
    A          (K, N, C)
    B, C       (batch, K, T, N)   shared by the C channels of a sequence
    D, bias    (K, C)
    table      (K, L) int32       token visited by step l of sequence k; -1 is a padding step (a zero token)
    y          (batch, Ko, T, C)  Ko = 1: the K sequences summed at each token (VMamba's merge); Ko = K: one each

Dtypes: u, delta, B and C are float32, float64 or bf16, read as they are (bf16, which numpy lacks, as its int16
bits, widened in registers); A, D, bias and proj, the state and every sum are float32 (float64 for gradcheck). y is
float32 or bf16: a bf16 y is summed in a task-local float32 buffer and rounded once (to nearest, ties to even), so
the LayerNorm after SS2D's scan reads bf16 and computes its statistics in float32 inside the op. So a bf16 forward
under autocast costs no cast copies on either side of the scan, which is still computed in float32.

A padding step sees a zero token whose projections are zero, as when the torch backend pads the map: delta =
softplus(bias), so the state decays, and nothing is added or written.

Transcendentals: softplus and exp are computed with float32 polynomials (Cephes' expf, an atanh series for log1p:
both ~1 ulp) that LLVM vectorises; libm calls would not vectorise and would dominate the run time. float64 inputs
(gradcheck) use ``math.exp``/``math.log1p``. The backward recomputes the states of one (batch, channel block,
sequence) into a task-local buffer and runs the adjoint recurrence in reverse; nothing but the inputs is saved.

Parallelism: tasks are split over ``torch.get_num_threads()`` threads, torch's own OpenMP threads where torch has them
(:mod:`qmamba.ops.intra_op`; the kernels release the GIL), so ``torch.set_num_threads``, DataLoader workers (1
thread) and DDP processes are respected and no other threads compete with torch's for the cores.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from llvmlite import binding, ir
from numba import njit, types
from numba.core import config
from numba.core.registry import cpu_target
from numba.extending import intrinsic, overload
from torch import Tensor

from qmamba.ops.fused_scan import fused_scan
from qmamba.ops.intra_op import run_slices

__all__ = ["selective_scan_cpu"]


def _prefer_full_vectors() -> None:
    """Let LLVM use whole AVX-512 registers. It tunes recent Intel server cores (Sapphire and Emerald Rapids) to
    256-bit vectors, but the scan's loops are arithmetic-bound: 512-bit code ran QMamba-T's stage scans 10-20 %
    faster here. Only before numba's CPU target starts (its first compilation in this process), on a CPU with
    AVX-512, and never over a NUMBA_CPU_FEATURES the user set; numba's cache is keyed by these features."""
    features = binding.get_host_cpu_features()
    if config.CPU_FEATURES is None and features.get("avx512f") and "_toplevel_target_context" not in vars(cpu_target):
        config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"


_prefer_full_vectors()

# numpy error model: no ZeroDivisionError checks in loops; "contract" lets LLVM fuse a * b + c into one FMA (a
# kernel step is chains of them: 0.7x the forward's time, 0.85x the backward's, and closer to the exact result)
_CONTRACT = {"contract"}
_JIT = dict(nogil=True, cache=True, error_model="numpy")
_REDUCE = {"reassoc", "nsz", *_CONTRACT}  # reductions, which reassociation lets LLVM vectorise
_VECTOR = 16  # channel blocks are multiples of one AVX-512 register of float32
_LINE = 64  # bytes in a cache line and in an AVX-512 register

# ------------------------------------------------------------------------------------------------ scalar math
_f = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _f(1.4426950408889634), _f(0.693359375), _f(-2.12194440e-4)
_EXP_P = tuple(_f(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                               1.6666665459e-1, 5.0000001201e-1))
_EXP_MIN, _EXP_MAX = _f(-87.33654), _f(88.72283)  # exp underflows to 0 below / overflows to inf above
_ATANH = tuple(_f(1.0 / c) for c in (13, 11, 9, 7, 5, 3))
_ZERO, _HALF, _ONE, _TWO = _f(0), _f(0.5), _f(1), _f(2)
_BIAS, _MANTISSA, _HALF_WORD = np.int32(127), np.int32(23), np.int32(16)


@intrinsic
def _int_bits_as_float(typingctx, bits):  # noqa: ANN001, ANN202
    """Reinterpret an int32's bits as a float32 (builds 2**n for the exponential)."""
    signature = types.float32(types.int32)

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.bitcast(args[0], ir.FloatType())

    return signature, codegen


@intrinsic
def _float_bits_as_int(typingctx, value):  # noqa: ANN001, ANN202
    """Reinterpret a float32's bits as an int32 (rounds it to bf16)."""
    signature = types.int32(types.float32)

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.bitcast(args[0], ir.IntType(32))

    return signature, codegen


def _load(values, i):  # noqa: ANN001, ANN202
    """values[i] as a float; bf16, which numpy lacks and the kernels see as its int16 bits, widened to float32."""


@overload(_load, inline="always")
def _load_impl(values, i):  # noqa: ANN001, ANN202
    if values.dtype != types.int16:
        return lambda values, i: values[i]
    return lambda values, i: _int_bits_as_float(np.int32(values[i]) << _HALF_WORD)  # bf16 is float32's top half


@njit(**_JIT)
def _bf16_bits(x):  # noqa: ANN001, ANN201
    """x (float32) rounded to the nearest bf16, ties to even, as its int16 bits; NaN stays NaN (torch's 0x7FC0)."""
    bits = np.int64(_float_bits_as_int(x))  # sign-extended: the low 32 bits round as unsigned ones would
    rounded = (bits + np.int64(0x7FFF) + ((bits >> _HALF_WORD) & np.int64(1))) >> _HALF_WORD
    return np.int16(rounded) if x == x else np.int16(0x7FC0)


@njit(**_JIT)
def _scratch(size, dtype):  # noqa: ANN001, ANN202
    """np.empty(size, dtype) beginning on a 64-byte line. numba's own allocations are only 32-byte aligned (some
    small arrays start mid-line), and a 512-bit load or store that straddles two lines costs two: with every
    task-local buffer aligned, the forward took 0.81-0.92x its time and the backward 0.79-0.95x at QMamba-T's first
    stages on 2 AMX Xeon cores, with the same results to the bit."""
    raw = np.empty(size + _LINE // 4, dtype=dtype)  # room to skip up to a line of 4-byte (or wider) elements
    skip = (_LINE - raw.ctypes.data % _LINE) % _LINE // raw.itemsize
    return raw[skip:skip + size]


def _accumulator(y, size):  # noqa: ANN001, ANN202
    """Where a task sums its outputs in the compute dtype, and whether that is y itself: y, or for a bf16 y (its int16
    bits) a task-local float32 buffer of ``size`` that :func:`_flush` rounds into y, so that the K sequences' sum is
    rounded once, not after each."""


@overload(_accumulator, inline="always")
def _accumulator_impl(y, size):  # noqa: ANN001, ANN202
    if y.dtype != types.int16:
        return lambda y, size: (y, True)
    return lambda y, size: (_scratch(size, np.float32), False)


@njit(fastmath=_REDUCE, **_JIT)
def _row_stats(values, start, width, consts):  # noqa: ANN001, ANN202
    """A LayerNorm's statistics of values[start:start + width]: the mean and 1 / sqrt(variance + eps), ``consts`` =
    (1 / width, eps), in two passes over the row (it stays in the L1 cache)."""
    mean = _sum(values[start:], width) * consts[0]
    squares = mean - mean
    for c in range(width):
        d = values[start + c] - mean
        squares += d * d
    return mean, _ONE / np.sqrt(squares * consts[0] + consts[1])


def _flush(y, acc, y_first, tokens, channels, width, norm, shift, consts):  # noqa: ANN001, ANN202
    """Complete a task's output sequence, rows y[y_first + p * channels:][:width] for each token p: layer-normalised
    over the row first when ``norm`` is not empty (a LayerNorm's weight; ``shift`` its bias, ``consts`` 1 / width and
    its eps; only for rows a task holds whole), and for a bf16 y rounded once from its accumulator acc[p * width:]. A
    y in the compute dtype is its own accumulator: left as it is without a norm."""


@overload(_flush, inline="always")
def _flush_impl(y, acc, y_first, tokens, channels, width, norm, shift, consts):  # noqa: ANN001, ANN202
    if y.dtype != types.int16:
        def normalize_in_place(y, acc, y_first, tokens, channels, width, norm, shift, consts):  # noqa: ANN001, ANN202
            if norm.size == 0:
                return
            for p in range(tokens):
                row = np.uint64(y_first + p * channels)
                mean, rstd = _row_stats(y, row, width, consts)
                for c in range(width):
                    y[row + c] = (y[row + c] - mean) * rstd * norm[c] + shift[c]

        return normalize_in_place

    def flush(y, acc, y_first, tokens, channels, width, norm, shift, consts):  # noqa: ANN001, ANN202
        for p in range(tokens):
            row, acc_row = np.uint64(y_first + p * channels), np.uint64(p * width)
            if norm.size == 0:
                for c in range(width):
                    y[row + c] = _bf16_bits(acc[acc_row + c])
                continue
            mean, rstd = _row_stats(acc, acc_row, width, consts)
            for c in range(width):
                y[row + c] = _bf16_bits((acc[acc_row + c] - mean) * rstd * norm[c] + shift[c])

    return flush


def _exp(x):  # noqa: ANN001, ANN202
    """exp(x); float32: Cephes' expf as straight-line code (vectorisable), float64: math.exp."""


def _softplus_and_slope(x):  # noqa: ANN001, ANN202
    """(log(1 + exp(x)), its derivative sigmoid(x)) from one exponential, without overflow."""


@overload(_exp, jit_options=dict(fastmath=_CONTRACT))
def _exp_impl(x):  # noqa: ANN001, ANN202
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp_f32(x):  # noqa: ANN001, ANN202
        clamped = min(max(x, _EXP_MIN), _EXP_MAX)
        n = np.floor(clamped * _LOG2E + _HALF)
        r = clamped - n * _LN2_HI - n * _LN2_LO
        p0, p1, p2, p3, p4, p5 = _EXP_P
        p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
        p = p * r * r + r + _ONE
        y = p * _int_bits_as_float((np.int32(n) + _BIAS) << _MANTISSA)
        return _ZERO if x < _EXP_MIN else (y if x == x else x)  # 0 on underflow; NaN stays NaN

    return exp_f32


@overload(_softplus_and_slope, jit_options=dict(fastmath=_CONTRACT))
def _softplus_and_slope_impl(x):  # noqa: ANN001, ANN202
    if x != types.float32:
        def softplus_and_slope_f64(x):  # noqa: ANN001, ANN202
            t = math.exp(-abs(x))
            return max(x, 0.0) + math.log1p(t), (1.0 if x >= 0 else t) / (1.0 + t)

        return softplus_and_slope_f64

    def softplus_and_slope_f32(x):  # noqa: ANN001, ANN202
        # max(x, 0) + log1p(t), t = exp(-|x|) in (0, 1]; log1p(t) = 2 atanh(s), s = t / (2 + t) <= 1/3
        t = _exp(-abs(x))
        s = t / (_TWO + t)
        s2 = s * s
        c13, c11, c9, c7, c5, c3 = _ATANH
        series = (((((c13 * s2 + c11) * s2 + c9) * s2 + c7) * s2 + c5) * s2 + c3) * s2 + _ONE
        return max(x, _ZERO) + _TWO * s * series, (_ONE if x >= 0 else t) / (_ONE + t)

    return softplus_and_slope_f32


@njit(fastmath=_CONTRACT, **_JIT)
def _softplus(x):  # noqa: ANN001, ANN202
    """log(1 + exp(x)); the unused slope is optimised away."""
    return _softplus_and_slope(x)[0]


@njit(fastmath=_REDUCE, **_JIT)
def _sum(values, count):  # noqa: ANN001, ANN202
    """Sum of values[:count] (count >= 1)."""
    total = values[0]
    for i in range(np.uint64(1), np.uint64(count)):
        total += values[i]
    return total


# ------------------------------------------------------------------------------------------------------ kernels
# Arrays are flat C-contiguous views; offsets are uint64 so that numba emits no negative-index wraparound, which
# would turn every contiguous channel loop into a gather that LLVM refuses to vectorise.


@njit(fastmath=_CONTRACT, **_JIT)
def _step_delta(z, delta, proj, b, k, p, c0, width, dims):  # noqa: ANN001, ANN201
    """z[:width] = the step's delta (before bias) for channels c0.. of sequence k at token p (>= 0)."""
    batch, Ku, K, Ko, T, L, channels, N, rank, block = dims
    if rank == 0:
        row = np.uint64(((b * K + k) * T + p) * channels + c0)
        for c in range(width):
            z[c] = _load(delta, row + c)
        return
    low = ((b * K + k) * T + p) * rank
    w = _load(delta, low)
    row = np.uint64(k * rank * channels + c0)
    for c in range(width):
        z[c] = w * proj[row + c]
    for r in range(1, rank):
        w = _load(delta, low + r)
        row = np.uint64((k * rank + r) * channels + c0)
        for c in range(width):
            z[c] += w * proj[row + c]


HELD = 4  # steps whose step sizes the kernels project (forward) or chain-rule (backward) at once, at low rank


@njit(**_JIT)
def _held_tokens(tokens, table, k, step, L):  # noqa: ANN001, ANN201
    """tokens[:count] = the tokens of sequence k's steps step, step + 1, ... (at most HELD); returns count."""
    count = min(HELD, L - step)
    for s in range(count):
        tokens[s] = table[k * L + step + s]
    return count


@njit(**_JIT)
def _four(values, i):  # noqa: ANN001, ANN201
    """values[i], ..., values[i + 3] as floats."""
    return _load(values, i), _load(values, i + 1), _load(values, i + 2), _load(values, i + 3)


@njit(fastmath=_CONTRACT, **_JIT)
def _add_products(total, w, p):  # noqa: ANN001, ANN201
    """total + w[0] p[0] + ... + w[3] p[3], added in that order, as one rank at a time adds them (to the bit)."""
    total += w[0] * p[0]
    total += w[1] * p[1]
    total += w[2] * p[2]
    total += w[3] * p[3]
    return total


@njit(fastmath=_CONTRACT, **_JIT)
def _held_step_deltas(zs, tokens, count, delta, proj, b, k, c0, width, dims):  # noqa: ANN001, ANN201
    """:func:`_step_delta` for ``count`` (<= HELD) steps into the rows of zs (stride ``block``), their tokens
    ``tokens[:count]`` (padding steps, negative, skipped). For a full HELD of tokens at low rank, each row of proj is
    loaded once for all four steps and the rows are taken four ranks at a time, so that a step's partial sums are
    loaded and stored once per four ranks: where one step and one rank at a time streamed the whole of proj from the
    L2 cache for every step (1.2 MB at QMamba-T's stage 3), the bf16 forward took 0.70-0.81x its time at stages 2 and
    3 (R = 24, 48) on 2 AMX Xeon cores, with the same values to the bit."""
    batch, Ku, K, Ko, T, L, channels, N, rank, block = dims
    if rank == 0 or count < HELD or min(tokens[0], tokens[1], tokens[2], tokens[3]) < 0:
        for s in range(count):
            if tokens[s] >= 0:
                _step_delta(zs[s * block:], delta, proj, b, k, tokens[s], c0, width, dims)
        return
    z0, z1, z2, z3 = zs[:block], zs[block:2 * block], zs[2 * block:3 * block], zs[3 * block:4 * block]
    seq = (b * K + k) * T  # the sequence's first row of the rank-R factor
    low0, low1 = (seq + tokens[0]) * rank, (seq + tokens[1]) * rank
    low2, low3 = (seq + tokens[2]) * rank, (seq + tokens[3]) * rank
    w0, w1, w2, w3 = _load(delta, low0), _load(delta, low1), _load(delta, low2), _load(delta, low3)
    row = np.uint64(k * rank * channels + c0)
    for c in range(width):
        pc = proj[row + c]
        z0[c] = w0 * pc
        z1[c] = w1 * pc
        z2[c] = w2 * pc
        z3[c] = w3 * pc
    r, stride = 1, np.uint64(channels)
    while r + 4 <= rank:
        w0, w1 = _four(delta, low0 + r), _four(delta, low1 + r)
        w2, w3 = _four(delta, low2 + r), _four(delta, low3 + r)
        row0 = np.uint64((k * rank + r) * channels + c0)
        row1 = row0 + stride
        row2 = row1 + stride
        row3 = row2 + stride
        for c in range(width):
            pc = proj[row0 + c], proj[row1 + c], proj[row2 + c], proj[row3 + c]
            z0[c] = _add_products(z0[c], w0, pc)
            z1[c] = _add_products(z1[c], w1, pc)
            z2[c] = _add_products(z2[c], w2, pc)
            z3[c] = _add_products(z3[c], w3, pc)
        r += 4
    for r in range(r, rank):
        w0, w1, w2, w3 = _load(delta, low0 + r), _load(delta, low1 + r), _load(delta, low2 + r), _load(delta, low3 + r)
        row = np.uint64((k * rank + r) * channels + c0)
        for c in range(width):
            pc = proj[row + c]
            z0[c] += w0 * pc
            z1[c] += w1 * pc
            z2[c] += w2 * pc
            z3[c] += w3 * pc


@njit(fastmath=_REDUCE, **_JIT)
def _step_delta_grad(g_z, delta, proj, grad_delta, grad_proj, b, blk, k, p, c0, width, dims):  # noqa: ANN001, ANN201
    """Accumulate the gradient g_z[:width] of the step's delta (before bias), channels c0.. of sequence k at token p,
    into grad_delta; for a low-rank delta, through the projection's chain rule into this block's partial sums of the
    rank-R factor's gradient (blocks, batch, K, T, R) and the batch row's of proj's (batch, K, R, C)."""
    batch, Ku, K, Ko, T, L, channels, N, rank, block = dims
    if rank == 0:
        row = np.uint64(((b * K + k) * T + p) * channels + c0)
        for c in range(width):
            grad_delta[row + c] += g_z[c]
        return
    low = ((b * K + k) * T + p) * rank
    out = (((blk * batch + b) * K + k) * T + p) * rank
    for r in range(rank):
        w = _load(delta, low + r)
        row = np.uint64((k * rank + r) * channels + c0)
        grad_row = np.uint64(((b * K + k) * rank + r) * channels + c0)
        total = _ZERO
        for c in range(width):
            total += g_z[c] * proj[row + c]
            grad_proj[grad_row + c] += w * g_z[c]
        grad_delta[out + r] += total


@njit(fastmath=_REDUCE, **_JIT)
def _held_delta_grads(g_z, tokens, count, delta, proj, grad_delta, grad_proj, b, blk, k, c0, width, dims):  # noqa: ANN001, ANN201
    """:func:`_step_delta_grad` for ``count`` (<= HELD) steps at once: their gradients are the rows of g_z (stride
    ``block``), their tokens ``tokens[:count]``. For a full HELD at low rank, one pass over each row of proj and of
    its gradient serves all of them, where one step at a time paid a horizontal sum and a load and store of the
    gradient's row per multiply-add pair: the backward took 0.82-0.94x its time at QMamba-T's stages 0 and 1 on 2 AMX
    Xeon cores (fp32 and bf16 operands); holding 8 steps was no faster than 4."""
    batch, Ku, K, Ko, T, L, channels, N, rank, block = dims
    if rank == 0 or count < HELD:
        for s in range(count):
            _step_delta_grad(g_z[s * block:], delta, proj, grad_delta, grad_proj, b, blk, k, tokens[s], c0, width, dims)
        return
    g0, g1, g2, g3 = g_z[:block], g_z[block:2 * block], g_z[2 * block:3 * block], g_z[3 * block:]
    seq = (b * K + k) * T  # the sequence's first row of the rank-R factor
    low0, low1 = (seq + tokens[0]) * rank, (seq + tokens[1]) * rank
    low2, low3 = (seq + tokens[2]) * rank, (seq + tokens[3]) * rank
    shift = blk * batch * K * T * rank  # from the rank-R factor's row to this block's partial sums of its gradient
    for r in range(rank):
        w0, w1 = _load(delta, low0 + r), _load(delta, low1 + r)
        w2, w3 = _load(delta, low2 + r), _load(delta, low3 + r)
        row = np.uint64((k * rank + r) * channels + c0)
        grad_row = np.uint64(((b * K + k) * rank + r) * channels + c0)
        t0 = t1 = t2 = t3 = _ZERO
        for c in range(width):
            pc = proj[row + c]
            t0 += g0[c] * pc
            t1 += g1[c] * pc
            t2 += g2[c] * pc
            t3 += g3[c] * pc
            grad_proj[grad_row + c] += (w0 * g0[c] + w1 * g1[c]) + (w2 * g2[c] + w3 * g3[c])
        grad_delta[shift + low0 + r] += t0
        grad_delta[shift + low1 + r] += t1
        grad_delta[shift + low2 + r] += t2
        grad_delta[shift + low3 + r] += t3


@njit(**_JIT)
def _task_block(task, channels, block):  # noqa: ANN001, ANN201
    """A task's batch row, channel block, first channel and width: the tasks are the (batch row, channel block)
    pairs in row order, and a row's last block is narrower where block does not divide channels."""
    blocks = (channels + block - 1) // block
    b, blk = task // blocks, task % blocks
    c0 = blk * block
    return b, blk, c0, np.uint64(min(block, channels - c0))


@njit(fastmath=_CONTRACT, **_JIT)
def _forward_kernel(u, delta, proj, A, B, C, D, bias, table, y, norm, shift, consts, dims, softplus, assign,  # noqa: ANN001, ANN201
                    first_task, last_task):
    """y = the scans of every (batch row, channel block) task in [first_task, last_task). ``assign``: every output
    token's first visit (by sequence 0 when merging, else by its own sequence) assigns it, so that y needs no zeroing;
    only when each of those sequences visits each token exactly once. A bf16 y is summed in float32 and rounded once,
    when its task's output sequence is complete; with a non-empty ``norm`` the merged output is layer-normalised
    before (see :func:`_flush`)."""
    batch, Ku, K, Ko, T, L, channels, N, rank, block = dims
    state = _scratch(N * block, A.dtype)
    zs = _scratch(HELD * block, A.dtype)  # the step sizes of the steps in tokens[:HELD]
    tokens = np.empty(HELD, dtype=np.int64)
    dt = _scratch(block, A.dtype)
    dtu = _scratch(block, A.dtype)
    out = _scratch(block, A.dtype)
    acc, own = _accumulator(y, T * block)
    for task in range(first_task, last_task):
        b, _, c0, width = _task_block(task, channels, block)
        for k in range(K):
            ku, ko = (k if Ku > 1 else 0), (k if Ko > 1 else 0)
            first, last = Ko > 1 or k == 0, Ko > 1 or k == K - 1  # whether k begins / ends an output sequence
            y_first = np.uint64((b * Ko + ko) * T * channels + c0)
            if first and not (own or assign):  # a buffer not every token is assigned in (a y is zeroed first)
                acc[:] = 0
            kc = np.uint64(k * channels + c0)
            state[:] = 0
            for step in range(L):
                s = step % HELD  # the step's place among the held ones
                if s == 0:
                    count = _held_tokens(tokens, table, k, step, L)
                    _held_step_deltas(zs, tokens, count, delta, proj, b, k, c0, width, dims)
                p, z = tokens[s], zs[s * block:]
                if p < 0:  # padding: a zero token, delta = softplus(bias)
                    for n in range(N):
                        a_row, s_row = np.uint64((k * N + n) * channels + c0), np.uint64(n * block)
                        for c in range(width):
                            d = _softplus(bias[kc + c]) if softplus else bias[kc + c]
                            state[s_row + c] *= _exp(d * A[a_row + c])
                    continue
                u_row = np.uint64(((b * Ku + ku) * T + p) * channels + c0)
                for c in range(width):
                    d = z[c] + bias[kc + c]
                    d = _softplus(d) if softplus else d
                    uc = _load(u, u_row + c)
                    dt[c] = d
                    dtu[c] = d * uc
                    out[c] = D[kc + c] * uc
                bc = ((b * K + k) * T + p) * N
                for n in range(N):
                    b_n, c_n = _load(B, bc + n), _load(C, bc + n)
                    a_row, s_row = np.uint64((k * N + n) * channels + c0), np.uint64(n * block)
                    for c in range(width):
                        h = _exp(dt[c] * A[a_row + c]) * state[s_row + c] + dtu[c] * b_n
                        state[s_row + c] = h
                        out[c] += h * c_n
                acc_row = y_first + np.uint64(p * channels) if own else np.uint64(p * width)
                if assign and first:  # the token's first visit
                    for c in range(width):
                        acc[acc_row + c] = out[c]
                else:
                    for c in range(width):
                        acc[acc_row + c] += out[c]
            if last:
                _flush(y, acc, y_first, T, channels, width, norm, shift, consts)


@njit(**_JIT)
def _stored_step(step, L, block, nb):  # noqa: ANN001, ANN201
    """Where the backward keeps step ``step``'s delta and slope (offset ``sl`` of its per-step buffers) and the states
    before (``prev``) and after (``cur``) it, among ``L`` steps: in reverse order, so that the adjoint pass, which
    walks the steps from the last, reads its buffers at ascending addresses. At QMamba-T's first stages they outgrow
    the L2 cache, and CPUs prefetch ascending streams better: on 2 Zen 4 cores the backward took 0.86-0.94x of its
    time with the buffers in step order at QMamba-T's four stages (fp32), with the same gradients to the bit."""
    slot = np.uint64(L - 1 - step)
    return slot * np.uint64(block), (slot + np.uint64(1)) * nb, slot * nb


@njit(fastmath=_CONTRACT, **_JIT)
def _backward_kernel(u, delta, proj, A, B, C, D, bias, table, grad_y, grad_u, grad_delta, grad_proj, grad_A,  # noqa: ANN001, ANN201
                     grad_B, grad_C, grad_D, grad_bias, dims, softplus, first_task, last_task):
    """Gradients of :func:`_forward_kernel`. Per task and sequence: a forward pass storing delta, softplus' slope and
    every state, then the adjoint recurrence ``g[l] = a[l+1] g[l+1] + dy[l] C[l]`` from the last step to the first.

    Every gradient is accumulated: zero them first. grad_u: like u; grad_delta: like delta, or for a low-rank delta
    per channel block (blocks, batch, K, T, R), with grad_proj per batch row (batch, K, R, C) (unused, empty, for a
    full delta); grad_A, grad_D, grad_bias: per batch row (batch, K, N, C) / (batch, K, C); grad_B, grad_C: per
    channel block (blocks, batch, K, T, N). The caller sums the partial sums.
    """
    batch, Ku, K, Ko, T, L, channels, N, rank, block = dims
    zero, one = np.zeros(1, dtype=A.dtype)[0], np.ones(1, dtype=A.dtype)[0]
    dts = _scratch(L * block, A.dtype)
    slopes = _scratch(L * block, A.dtype)
    states = _scratch((L + 1) * N * block, A.dtype)  # the state after each step, then the initial one
    g = _scratch(N * block, A.dtype)  # adjoint state
    a_next = _scratch(N * block, A.dtype)  # decay of the step after the current one
    zs = _scratch(HELD * block, A.dtype)  # the step sizes of the steps in tokens[:HELD] (forward pass)
    gy = _scratch(block, A.dtype)
    uc = _scratch(block, A.dtype)
    g_dt = _scratch(block, A.dtype)
    g_uc = _scratch(block, A.dtype)
    held = _scratch(HELD * block, A.dtype)  # delta's gradients of the steps in tokens[:count] (adjoint pass)
    tokens = np.empty(HELD, dtype=np.int64)
    g_A = _scratch(N * block, A.dtype)
    g_D = _scratch(block, A.dtype)
    g_bias = _scratch(block, A.dtype)
    terms_B = _scratch(block, A.dtype)
    terms_C = _scratch(block, A.dtype)
    nb = np.uint64(N * block)
    for task in range(first_task, last_task):
        b, blk, c0, width = _task_block(task, channels, block)
        for k in range(K):
            ku, ko = (k if Ku > 1 else 0), (k if Ko > 1 else 0)
            kc = np.uint64(k * channels + c0)
            # forward: delta, softplus' slope and the state after every step
            states[np.uint64(L) * nb:] = 0  # the state before the first step
            for step in range(L):
                s = step % HELD  # the step's place among the held ones
                if s == 0:
                    count = _held_tokens(tokens, table, k, step, L)
                    _held_step_deltas(zs, tokens, count, delta, proj, b, k, c0, width, dims)
                p, z = tokens[s], zs[s * block:]
                sl, prev, cur = _stored_step(step, L, block, nb)
                if p < 0:  # padding: a zero token
                    for c in range(width):
                        z[c] = zero
                        uc[c] = zero
                else:
                    u_row = np.uint64(((b * Ku + ku) * T + p) * channels + c0)
                    for c in range(width):
                        uc[c] = _load(u, u_row + c)
                for c in range(width):
                    zc = z[c] + bias[kc + c]
                    if softplus:
                        dts[sl + c], slopes[sl + c] = _softplus_and_slope(zc)
                    else:
                        dts[sl + c], slopes[sl + c] = zc, one
                b_row = ((b * K + k) * T + p) * N
                for n in range(N):
                    b_n = _load(B, b_row + n) if p >= 0 else zero
                    a_row, s_row = np.uint64((k * N + n) * channels + c0), np.uint64(n * block)
                    for c in range(width):
                        d = dts[sl + c]
                        states[cur + s_row + c] = _exp(d * A[a_row + c]) * states[prev + s_row + c] + d * uc[c] * b_n
            # reverse: the adjoint state and every gradient
            g[:] = 0
            a_next[:] = 0
            g_A[:] = 0
            g_D[:] = 0
            g_bias[:] = 0
            count = 0  # steps held for the step sizes' chain rule
            for step in range(L - 1, -1, -1):
                p = table[k * L + step]
                valid = p >= 0
                sl, prev, cur = _stored_step(step, L, block, nb)
                u_row = np.uint64(0)
                b_row = ((b * K + k) * T + p) * N
                if valid:
                    u_row = np.uint64(((b * Ku + ku) * T + p) * channels + c0)
                    y_row = np.uint64(((b * Ko + ko) * T + p) * channels + c0)
                    for c in range(width):
                        gy[c] = _load(grad_y, y_row + c)
                        uc[c] = _load(u, u_row + c)
                else:
                    for c in range(width):
                        gy[c] = zero
                        uc[c] = zero
                for c in range(width):
                    g_dt[c] = zero
                    g_uc[c] = zero
                for n in range(N):
                    b_n = _load(B, b_row + n) if valid else zero
                    c_n = _load(C, b_row + n) if valid else zero
                    a_row, s_row = np.uint64((k * N + n) * channels + c0), np.uint64(n * block)
                    for c in range(width):
                        d, a_n = dts[sl + c], A[a_row + c]
                        a = _exp(d * a_n)
                        gs = a_next[s_row + c] * g[s_row + c] + gy[c] * c_n
                        g_x = gs * states[prev + s_row + c] * a  # d loss / d (delta * A)
                        g_A[s_row + c] += g_x * d
                        g_dt[c] += g_x * a_n + gs * b_n * uc[c]
                        g_uc[c] += gs * d * b_n
                        terms_B[c] = gs * d * uc[c]
                        terms_C[c] = gy[c] * states[cur + s_row + c]
                        g[s_row + c] = gs
                        a_next[s_row + c] = a
                    if valid:
                        out = (((blk * batch + b) * K + k) * T + p) * N + n
                        grad_B[out] += _sum(terms_B, width)
                        grad_C[out] += _sum(terms_C, width)
                held_row = np.uint64(count * block)
                for c in range(width):
                    g_z = g_dt[c] * slopes[sl + c]
                    g_bias[c] += g_z
                    g_D[c] += gy[c] * uc[c]
                    held[held_row + c] = g_z
                if valid:
                    tokens[count] = p
                    count += 1
                    if count == HELD:
                        _held_delta_grads(held, tokens, count, delta, proj, grad_delta, grad_proj, b, blk, k, c0,
                                          width, dims)
                        count = 0
                    for c in range(width):
                        grad_u[u_row + c] += g_uc[c] + gy[c] * D[kc + c]
            _held_delta_grads(held, tokens, count, delta, proj, grad_delta, grad_proj, b, blk, k, c0, width, dims)
            for n in range(N):
                a_out, s_row = np.uint64(((b * K + k) * N + n) * channels + c0), np.uint64(n * block)
                for c in range(width):
                    grad_A[a_out + c] += g_A[s_row + c]
            bk = np.uint64((b * K + k) * channels + c0)
            for c in range(width):
                grad_D[bk + c] += g_D[c]
                grad_bias[bk + c] += g_bias[c]


# ------------------------------------------------------------------------------------------------------- tasks
def _partition(batch: int, channels: int, threads: int) -> tuple[int, int]:
    """(channel block, number of blocks): whole rows when the batch alone feeds every thread, else split channels
    so that the tasks divide evenly over the threads; blocks are whole SIMD registers."""
    blocks = threads // math.gcd(batch, threads)
    block = -(-channels // blocks)
    block = min(-(-block // _VECTOR) * _VECTOR, channels)
    return block, -(-channels // block)


def _run(kernel, tasks: int, *args: object) -> None:  # noqa: ANN001
    """Call ``kernel(*args, first_task, last_task)`` over ``tasks`` tasks split evenly across torch's threads."""
    run_slices(partial(kernel, *args), tasks)


# ----------------------------------------------------------------------------------------------- torch binding
def _flat(x: Tensor) -> np.ndarray:
    """x as a flat numpy view; bf16, which numpy lacks, as its int16 bits (the kernels widen them on loading)."""
    x = x.detach().contiguous().view(-1)
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


class _Problem:
    """Shapes and partition of one call."""

    def __init__(self, u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, table: Tensor, merge: bool) -> None:
        batch, ku, tokens, channels = u.shape
        k, length, n, rank = delta.shape[1], table.shape[1], A.shape[1], proj.shape[1] if proj.numel() else 0
        self.block, self.blocks = _partition(batch, channels, torch.get_num_threads())
        self.tasks = batch * self.blocks
        self.out_shape = (batch, 1 if merge else k, tokens, channels)
        self.dims = (batch, ku, k, self.out_shape[1], tokens, length, channels, n, rank, self.block)


@njit(**_JIT)
def _visits_each_token_once(table, rows, length, tokens):  # noqa: ANN001, ANN201
    """Whether each of the first ``rows`` sequences of the flat (K, L) table steps on each of the tokens exactly once
    (padding steps aside). Compiled, as every call checks it: numpy's bincount per row took 1.6 ms a QMamba-T batch."""
    seen = np.zeros(tokens, dtype=np.bool_)
    for k in range(rows):
        seen[:] = False
        visited = 0
        for step in range(length):
            p = table[k * length + step]
            if p >= 0:
                if p >= tokens or seen[p]:
                    return False
                seen[p] = True
                visited += 1
        if visited != tokens:
            return False
    return True


def _forward(u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor,
             table: Tensor, merge: bool, softplus: bool, out_dtype: torch.dtype, norm: Tensor | None = None,
             shift: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """The scan; with ``norm`` (and ``shift``, ``eps``: a LayerNorm over the channels of the merged output), that
    LayerNorm of it, computed by the kernel from its float32 sums where each task holds whole rows (a batch that feeds
    every thread) and y is written in ``out_dtype``, else by torch after it."""
    problem = _Problem(u, delta, proj, A, table, merge)
    channels = u.shape[-1]
    written = out_dtype if out_dtype == torch.bfloat16 else A.dtype  # the kernel writes bf16 or the compute dtype
    if norm is not None and not (merge and problem.block == channels and written == out_dtype):
        y = _forward(u, delta, proj, A, B, C, D, bias, table, merge, softplus, out_dtype)
        return torch.nn.functional.layer_norm(y, (channels,), norm, shift, eps)
    assign = _visits_each_token_once(_flat(table), 1 if merge else table.shape[0], table.shape[1], u.shape[2])
    y = (torch.empty if assign or written == torch.bfloat16 else torch.zeros)(problem.out_shape, dtype=written)
    if norm is None:
        norm = shift = consts = A.new_empty(0)
    else:
        norm, shift, consts = norm.to(A.dtype), shift.to(A.dtype), A.new_tensor([1 / channels, eps])
    _run(_forward_kernel, problem.tasks, *map(_flat, (u, delta, proj, A, B, C, D, bias, table, y, norm, shift, consts)),
         problem.dims, softplus, assign)
    return y.to(out_dtype)


# From this rank on, the backward computes the step-size projection's two gradients as matrix products over the
# full-rank gradient instead of in the kernel: per step, the kernel's chain rule reads proj's (R, C) slab and adds
# into its gradient's, which outgrows the L2 cache at QMamba-T's later stages. Measured with QMamba-T's stages, batch
# 2, fp32, on 2 Zen 3 cores (AVX2; ms, in the kernel / as matrix products): R = 6: 36 / 42, R = 12: 21 / 23,
# R = 24: 18 / 13, R = 48: 13 / 7. The forward keeps the projection in the kernel at every rank (R = 6: 11 / 23 ms,
# R = 48: 3.1 / 3.7 ms): there it is R multiply-adds per channel and step, and materialising the full step sizes costs
# more than it saves. Since the kernels run on torch's own threads (no OpenMP threads spinning beside them), the
# kernel's chain rule is the faster at R = 24 too on 2 AMX Xeon cores (ms, fp32 / bf16 operands, in the kernel / as
# matrix products: R = 12: 4.8 / 10.0, 5.0 / 8.6; R = 24: 3.45 / 3.59, 3.44 / 3.93; R = 48: 2.94 / 2.98, 3.09 / 3.06).
GEMM_RANK = 32


def _gradients(u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor,
               table: Tensor, grad_y: Tensor, merge: bool, softplus: bool) -> tuple[Tensor, ...]:
    if proj.numel() and proj.shape[1] >= GEMM_RANK:
        factor = delta.to(proj.dtype)
        grad_u, grad_full, _, *rest = _gradients(u, factor @ proj, proj.new_empty(0, 0, 0), A, B, C, D, bias, table,
                                                 grad_y, merge, softplus)
        # (batch, K, T, C) @ (K, C, R), and proj's partial sums per batch row: (batch, K, R, T) @ (batch, K, T, C)
        return grad_u, grad_full @ proj.transpose(1, 2), factor.transpose(2, 3) @ grad_full, *rest
    problem = _Problem(u, delta, proj, A, table, merge)
    batch, low_rank = u.shape[0], proj.numel() > 0
    zeros = A.new_zeros  # the gradients are accumulated in the compute dtype, bf16 operands' included
    grad_delta = zeros(problem.blocks, *delta.shape) if low_rank else zeros(delta.shape)
    grad_proj = zeros(batch, *proj.shape) if low_rank else zeros(0)
    grads = (zeros(u.shape), grad_delta, grad_proj, zeros(batch, *A.shape), zeros(problem.blocks, *B.shape),
             zeros(problem.blocks, *C.shape), zeros(batch, *D.shape), zeros(batch, *bias.shape))
    _run(_backward_kernel, problem.tasks, *map(_flat, (u, delta, proj, A, B, C, D, bias, table, grad_y, *grads)),
         problem.dims, softplus)
    grad_u, _, _, *rest = grads
    return grad_u, grad_delta.sum(0) if low_rank else grad_delta, grad_proj if low_rank else None, *rest


selective_scan_cpu = fused_scan("cpu_scan", _forward, _gradients, normalizes=True)
selective_scan_cpu.__doc__ = """The fused scan in the module's layout (see the module docstring): u, delta, B, C in
float32, bf16 or float64, the rest in float32 (float64 for float64 inputs), y in float32 or ``out_dtype`` (bf16 is
written by the kernel, any other dtype cast from its float32); ``delta_proj`` (K, R, C) makes
``delta`` the rank-R input of the step-size projection; ``layer_norm`` (weight, bias, eps), with ``merge`` and in
inference only, is a LayerNorm of the merged output over its channels, computed from the kernel's float32 sums where
each task holds whole rows (:func:`_forward`). See :func:`qmamba.ops.fused_scan.fused_scan`."""
