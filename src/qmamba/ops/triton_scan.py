"""Fused, chunked selective scan in Triton: the design of :mod:`qmamba.ops.cpu_scan` on a GPU, parallel over L.

Same operands and layout as the CPU kernel (see its module docstring): channel-last tokens read in the order of a
(K, L) index table, optional low-rank step sizes expanded per step (``delta_proj``), bias + softplus +
discretisation + recurrence + ``D*u`` and the merge of the K directions in the kernels, states in fp32 whatever the
input dtype (fp32, bf16, fp16 operands are read as they are). Nothing of size (batch, K, T, C) is made, forward or
backward, except the output itself when each direction's output is asked for (LQMamba's BiAttn).

Why chunks: a program that walks all L steps of a sequence (the previous design) leaves an H200 idle at VMamba's
stage shapes (192 programs for 32 images at stage 0). Here a sequence is cut into chunks of ``TILE.chunk`` steps and
every program owns one (batch row, direction, chunk, block of channels) tile of (chunk, channels):

1. ``_chunk_summary_kernel``: each chunk's decay ``exp(A * sum(delta))`` and its end state started from zero (and, in
   the backward, its start adjoint started from zero): closed forms over cumulative sums, no scan.
2. ``_chunk_carry_kernel``: the states entering each chunk, one short sequential pass over the chunk summaries
   (forward for the states, in reverse for the adjoints).
3. ``_chunk_output_kernel`` / ``_chunk_backward_kernel``: every step of the chunk at once with
   ``tl.associative_scan`` along the tile's rows, started from the carried state: outputs, or all gradients (the
   states are recomputed per chunk; nothing but the inputs is saved between forward and backward).

The adjoint recurrence ``g[l] = C[l] dy[l] + a[l+1] g[l+1]`` reads the *next* step's decay; the reverse scan
carries it in its element (``_adjoint_combine``) instead of loading every step twice. The states' lanes (N) are
independent, so kernels loop over them with (chunk, channels) tiles: d_state 1, what every QMamba preset runs, is
one pass.

No atomics: where directions share a token (the merged output, the gradient of the shared input) they are launched
one after another and each adds to the tokens it visits; within a launch a direction visits each token once.
Partial sums (A, D and bias per batch row and chunk, B and C and the low-rank factor per channel block) are summed
by torch. The result is deterministic.

Tests run these kernels on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported), and compile them for sm_80 and sm_90 without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from qmamba.ops.fused_scan import fused_scan

__all__ = ["TILE", "Tile", "selective_scan_triton"]


@dataclass
class Tile:
    """A program's tile: ``chunk`` steps (a power of two) by ``channels`` channels, with ``warps`` warps."""

    chunk: int = 64
    channels: int = 32
    warps: int = 4


TILE = Tile()  # benchmarks/gpu_check.py sweeps others; tests use small chunks to cross chunk boundaries


# ------------------------------------------------------------------------------------------------ element math
@triton.jit
def _softplus_and_slope(x):
    """(log(1 + exp(x)), sigmoid(x)) from one exponential; log1p(t) = 2 atanh(t / (2 + t)) keeps tiny values exact."""
    t = tl.exp(-tl.abs(x))
    s = t / (2.0 + t)
    s2 = s * s
    series = (((((s2 / 13.0 + 1.0 / 11.0) * s2 + 1.0 / 9.0) * s2 + 1.0 / 7.0) * s2 + 0.2) * s2 + 1.0 / 3.0) * s2 + 1.0
    softplus = tl.maximum(x, 0.0) + 2.0 * s * series
    slope = tl.where(x >= 0, 1.0, t) / (1.0 + t)
    return softplus, slope


@triton.jit
def _recurrence_combine(a1, h1, a2, h2):
    """h[l] = a[l] h[l-1] + b[l] over a segment: (product of a, state started from zero)."""
    return a1 * a2, a2 * h1 + h2


@triton.jit
def _adjoint_combine(p1, q1, a1, p2, q2, a2):
    """g[l] = c[l] + a[l+1] g[l+1], scanned in reverse: an element is (product of the a's strictly after its first
    step, adjoint started from zero, a of its first step); ``1`` is the later segment (Triton flips for reverse)."""
    carry = p2 * a1
    return carry * p1, q2 + carry * q1, a2


# ------------------------------------------------------------------------------------------------ tile loads
@triton.jit
def _program(K_grid, k0, channels, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """This program's batch row, sequence, chunk, and its channels with their mask."""
    pid = tl.program_id(0)
    c = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    return pid // K_grid, k0 + pid % K_grid, tl.program_id(1), c, c < channels


@triton.jit
def _rows(table_ptr, k, chunk, L, CHUNK: tl.constexpr):
    """The chunk's steps: token p (0 for padding), whether the step exists (< L) and whether it reads a token."""
    step = chunk * CHUNK + tl.arange(0, CHUNK)
    in_range = step < L
    p = tl.load(table_ptr + k * L + step, mask=in_range, other=-1)
    return tl.maximum(p, 0), in_range, p >= 0


@triton.jit
def _step_sizes(delta_ptr, proj_ptr, bias_ptr, seq_row, valid, in_range, k, c, cmask, channels, rank,
                SOFTPLUS: tl.constexpr, LOW_RANK: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """(delta, softplus' slope) of the tile in fp32: delta + bias, rank-R @ proj[k] when low-rank; softplus(bias) at a
    padding step (the state decays there) and 0 past L (the identity step)."""
    if LOW_RANK:
        z = tl.zeros((CHUNK, BLOCK), tl.float32)
        for r in range(rank):
            w = tl.load(delta_ptr + seq_row * rank + r, mask=valid, other=0.0).to(tl.float32)
            z += w[:, None] * tl.load(proj_ptr + (k * rank + r) * channels + c, mask=cmask, other=0.0)[None, :]
    else:
        z = _tokens(delta_ptr, seq_row, valid, c, cmask, channels)
    z += tl.load(bias_ptr + k * channels + c, mask=cmask, other=0.0)[None, :]
    if SOFTPLUS:
        d, slope = _softplus_and_slope(z)
    else:
        d, slope = z, tl.full((CHUNK, BLOCK), 1.0, tl.float32)
    return tl.where(in_range[:, None], d, 0.0), slope


@triton.jit
def _tokens(ptr, row, valid, c, cmask, channels):
    """A (chunk, channels) tile of a channel-last tensor at the rows' tokens, fp32, zero at padding steps."""
    return tl.load(ptr + row[:, None] * channels + c[None, :], mask=valid[:, None] & cmask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _chunk_lane(b, k, chunk, n, c, K, n_chunks, channels, N):
    """Offsets of lane n's channels in a chunk tensor (batch * K, chunks, N, C): summaries and carries."""
    return (((b * K + k) * n_chunks + chunk) * N + n) * channels + c


@triton.jit
def _lane(A_ptr, B_ptr, seq_row, valid, k, n, c, cmask, channels, N):
    """State lane n: A[k, n] for the channels and B[..., n] at the rows."""
    A = tl.load(A_ptr + (k * N + n) * channels + c, mask=cmask, other=0.0)
    return A, tl.load(B_ptr + seq_row * N + n, mask=valid, other=0.0).to(tl.float32)


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _chunk_summary_kernel(u_ptr, delta_ptr, proj_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, table_ptr, gy_ptr,
                          decay_ptr, state_ptr, adjoint_ptr,
                          Ku, K, Ko, T, L, channels, N, rank, n_chunks,
                          SOFTPLUS: tl.constexpr, LOW_RANK: tl.constexpr, ADJOINT: tl.constexpr,
                          CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk and lane: decay exp(A sum d), end state sum_l exp(A sum_{j>l} d_j) b_l, and with ADJOINT the start
    adjoint a[start] g[start] = sum_l exp(A sum_{j<=l} d_j) C_l dy_l (both from zero)."""
    b, k, chunk, c, cmask = _program(K, 0, channels, CHUNK, BLOCK)
    p, in_range, valid = _rows(table_ptr, k, chunk, L, CHUNK)
    seq_row = (b * K + k) * T + p
    d, _ = _step_sizes(delta_ptr, proj_ptr, bias_ptr, seq_row, valid, in_range, k, c, cmask, channels, rank,
                       SOFTPLUS, LOW_RANK, CHUNK, BLOCK)
    dx = d * _tokens(u_ptr, (b * Ku + k % Ku) * T + p, valid, c, cmask, channels)
    if ADJOINT:
        gy = _tokens(gy_ptr, (b * Ko + k % Ko) * T + p, valid, c, cmask, channels)
    for n in range(N):
        A, bn = _lane(A_ptr, B_ptr, seq_row, valid, k, n, c, cmask, channels, N)
        dA = d * A[None, :]
        after = tl.cumsum(dA, axis=0, reverse=True) - dA  # A * sum_{j>l} d_j
        out = _chunk_lane(b, k, chunk, n, c, K, n_chunks, channels, N)
        tl.store(decay_ptr + out, tl.exp(tl.sum(dA, axis=0)), mask=cmask)
        tl.store(state_ptr + out, tl.sum(tl.exp(after) * dx * bn[:, None], axis=0), mask=cmask)
        if ADJOINT:
            cn = tl.load(C_ptr + seq_row * N + n, mask=valid, other=0.0).to(tl.float32)
            tl.store(adjoint_ptr + out, tl.sum(tl.exp(tl.cumsum(dA, axis=0)) * gy * cn[:, None], axis=0), mask=cmask)


@triton.jit
def _chunk_carry_kernel(decay_ptr, summary_ptr, carry_ptr, n_chunks, width, REVERSE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """carry[chunk] = what enters the chunk: the previous chunks' summaries chained through their decays (the next
    chunks' with REVERSE). ``width`` = N * channels lanes per sequence."""
    seq = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < width
    h = tl.zeros((BLOCK,), tl.float32)
    for j in range(n_chunks):
        chunk = n_chunks - 1 - j if REVERSE else j
        at = (seq * n_chunks + chunk) * width + i
        tl.store(carry_ptr + at, h, mask=mask)
        h = tl.load(decay_ptr + at, mask=mask, other=0.0) * h + tl.load(summary_ptr + at, mask=mask, other=0.0)


@triton.jit
def _chunk_output_kernel(u_ptr, delta_ptr, proj_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, table_ptr, carry_ptr,
                         y_ptr, k0, K_grid, Ku, K, Ko, T, L, channels, N, rank, n_chunks,
                         SOFTPLUS: tl.constexpr, LOW_RANK: tl.constexpr, ACCUMULATE: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum_n C h + D u for every step of the chunk, h scanned from the carried state, written (added, with
    ACCUMULATE) at the steps' tokens."""
    b, k, chunk, c, cmask = _program(K_grid, k0, channels, CHUNK, BLOCK)
    p, in_range, valid = _rows(table_ptr, k, chunk, L, CHUNK)
    seq_row = (b * K + k) * T + p
    d, _ = _step_sizes(delta_ptr, proj_ptr, bias_ptr, seq_row, valid, in_range, k, c, cmask, channels, rank,
                       SOFTPLUS, LOW_RANK, CHUNK, BLOCK)
    x = _tokens(u_ptr, (b * Ku + k % Ku) * T + p, valid, c, cmask, channels)
    y = x * tl.load(D_ptr + k * channels + c, mask=cmask, other=0.0)[None, :]
    for n in range(N):
        A, bn = _lane(A_ptr, B_ptr, seq_row, valid, k, n, c, cmask, channels, N)
        decay, state = tl.associative_scan((tl.exp(d * A[None, :]), d * x * bn[:, None]), 0, _recurrence_combine)
        h0 = tl.load(carry_ptr + _chunk_lane(b, k, chunk, n, c, K, n_chunks, channels, N), mask=cmask, other=0.0)
        cn = tl.load(C_ptr + seq_row * N + n, mask=valid, other=0.0).to(tl.float32)
        y += (decay * h0[None, :] + state) * cn[:, None]
    out = y_ptr + ((b * Ko + k % Ko) * T + p[:, None]) * channels + c[None, :]
    mask = valid[:, None] & cmask[None, :]
    if ACCUMULATE:
        y += tl.load(out, mask=mask, other=0.0)
    tl.store(out, y, mask=mask)


@triton.jit
def _chunk_backward_kernel(u_ptr, delta_ptr, proj_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, table_ptr, gy_ptr,
                           state_carry_ptr, adjoint_carry_ptr,
                           gu_ptr, gdelta_ptr, gproj_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr,
                           k0, K_grid, batch, Ku, K, Ko, T, L, channels, N, rank, n_chunks,
                           SOFTPLUS: tl.constexpr, LOW_RANK: tl.constexpr, ACCUMULATE: tl.constexpr,
                           CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Every gradient of the chunk: states scanned forward and adjoints in reverse from their carries; partial sums
    of A, D and bias per (batch row, chunk), of B, C and the low-rank factor per channel block."""
    b, k, chunk, c, cmask = _program(K_grid, k0, channels, CHUNK, BLOCK)
    blk = tl.program_id(2)
    p, in_range, valid = _rows(table_ptr, k, chunk, L, CHUNK)
    seq_row = (b * K + k) * T + p
    d, slope = _step_sizes(delta_ptr, proj_ptr, bias_ptr, seq_row, valid, in_range, k, c, cmask, channels, rank,
                           SOFTPLUS, LOW_RANK, CHUNK, BLOCK)
    u_row = (b * Ku + k % Ku) * T + p
    x = _tokens(u_ptr, u_row, valid, c, cmask, channels)
    gy = _tokens(gy_ptr, (b * Ko + k % Ko) * T + p, valid, c, cmask, channels)
    partial = ((b * n_chunks + chunk) * K + k) * channels + c  # (batch * chunks, K, C) partial sums
    lane_partial = ((b * n_chunks + chunk) * K + k) * N  # (batch * chunks, K, N, C)
    per_block = (blk * batch * K * T + seq_row) * N  # (blocks, batch, K, T, N)
    g_d = tl.zeros((CHUNK, BLOCK), tl.float32)  # d loss / d delta
    g_bx = tl.zeros((CHUNK, BLOCK), tl.float32)  # sum_n g B: d loss / d (delta * u)
    for n in range(N):
        A, bn = _lane(A_ptr, B_ptr, seq_row, valid, k, n, c, cmask, channels, N)
        a = tl.exp(d * A[None, :])
        inputs = d * x * bn[:, None]
        carry = _chunk_lane(b, k, chunk, n, c, K, n_chunks, channels, N)
        decay, state = tl.associative_scan((a, inputs), 0, _recurrence_combine)
        h = decay * tl.load(state_carry_ptr + carry, mask=cmask, other=0.0)[None, :] + state
        cn = tl.load(C_ptr + seq_row * N + n, mask=valid, other=0.0).to(tl.float32)
        after, g_local, _ = tl.associative_scan((tl.full((CHUNK, BLOCK), 1.0, tl.float32), gy * cn[:, None], a), 0,
                                                _adjoint_combine, reverse=True)
        g = g_local + after * tl.load(adjoint_carry_ptr + carry, mask=cmask, other=0.0)[None, :]
        g_x = g * (h - inputs)  # d loss / d (delta * A): g[l] a[l] h[l-1]
        tl.store(gA_ptr + (lane_partial + n) * channels + c, tl.sum(g_x * d, axis=0), mask=cmask)
        g_d += g_x * A[None, :]
        g_bx += g * bn[:, None]
        tl.store(gB_ptr + per_block + n, tl.sum(g * d * x, axis=1), mask=valid)
        tl.store(gC_ptr + per_block + n, tl.sum(gy * h, axis=1), mask=valid)
    g_z = tl.where(in_range[:, None], (g_d + g_bx * x) * slope, 0.0)  # d loss / d (delta + bias), before softplus
    tl.store(gbias_ptr + partial, tl.sum(g_z, axis=0), mask=cmask)  # padding steps count: their delta is the bias
    tl.store(gD_ptr + partial, tl.sum(gy * x, axis=0), mask=cmask)
    tile = valid[:, None] & cmask[None, :]
    gu = gu_ptr + u_row[:, None] * channels + c[None, :]
    g_u = g_bx * d + gy * tl.load(D_ptr + k * channels + c, mask=cmask, other=0.0)[None, :]
    if ACCUMULATE:
        g_u += tl.load(gu, mask=tile, other=0.0)
    tl.store(gu, g_u, mask=tile)
    if LOW_RANK:  # delta = w @ proj[k]: the factor's gradient per channel block, proj's per (batch row, chunk)
        for r in range(rank):
            w = tl.load(delta_ptr + seq_row * rank + r, mask=valid, other=0.0).to(tl.float32)
            pr = tl.load(proj_ptr + (k * rank + r) * channels + c, mask=cmask, other=0.0)
            tl.store(gdelta_ptr + (blk * batch * K * T + seq_row) * rank + r, tl.sum(g_z * pr[None, :], axis=1),
                     mask=valid)
            tl.store(gproj_ptr + ((b * n_chunks + chunk) * K + k) * rank * channels + r * channels + c,
                     tl.sum(w[:, None] * g_z, axis=0), mask=cmask)
    else:
        tl.store(gdelta_ptr + seq_row[:, None] * channels + c[None, :], g_z, mask=tile)


# ------------------------------------------------------------------------------------------------ launches
class _Problem:
    """Shapes, grids and compile-time constants of one call."""

    def __init__(self, u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, table: Tensor, merge: bool,
                 softplus: bool) -> None:
        self.batch, self.ku, self.tokens, self.channels = u.shape
        self.k, self.length, self.n = delta.shape[1], table.shape[1], A.shape[1]
        self.ko = 1 if merge else self.k
        self.rank = proj.shape[1] if proj.numel() else 0
        self.chunks = triton.cdiv(self.length, TILE.chunk)
        self.blocks = triton.cdiv(self.channels, TILE.channels)
        self.sizes = (self.ku, self.k, self.ko, self.tokens, self.length, self.channels, self.n, self.rank,
                      self.chunks)
        self.meta = dict(SOFTPLUS=softplus, LOW_RANK=self.rank > 0, CHUNK=TILE.chunk, BLOCK=TILE.channels,
                         num_warps=TILE.warps)
        self.f32 = dict(device=u.device, dtype=torch.float32)
        largest = max(u.numel(), delta.numel(), self.batch * self.ko * self.tokens * self.channels,
                      self.blocks * self.batch * self.k * self.tokens * max(self.n, self.rank))
        if largest >= 2**31:  # the kernels index with int32
            raise ValueError(f"the Triton scan indexes tensors of up to 2**31 elements; this call needs {largest:,} "
                             "(batch x tokens x channels): split the batch")

    def launches(self, shared: bool) -> list[tuple[int, int]]:
        """(first sequence, sequences per launch): one launch for all K, or one per sequence when they share the
        tokens being written (then each adds to what the previous wrote)."""
        return [(k, 1) for k in range(self.k)] if shared and self.k > 1 else [(0, self.k)]

    def grid(self, per_launch: int) -> tuple[int, int, int]:
        return self.batch * per_launch, self.chunks, self.blocks

    def summaries(self, operands: tuple[Tensor, ...], grad_y: Tensor | None) -> tuple[Tensor, ...]:
        """What enters each chunk: the states (and with grad_y, the adjoints), (batch * K, chunks, N, C) fp32."""
        u, delta, proj, A, B, C, _, bias, table = operands
        shape = (self.batch * self.k, self.chunks, self.n, self.channels)
        decay, state = torch.empty(shape, **self.f32), torch.empty(shape, **self.f32)
        adjoint = torch.empty(shape, **self.f32) if grad_y is not None else state
        _chunk_summary_kernel[self.grid(self.k)](
            u, delta, proj, A, B, C, bias, table, u if grad_y is None else grad_y, decay, state, adjoint,
            *self.sizes, ADJOINT=grad_y is not None, **self.meta)
        carries = []
        for summary, reverse in ((state, False), (adjoint, True))[: 1 if grad_y is None else 2]:
            carry = torch.empty(shape, **self.f32)
            width = self.n * self.channels
            block = min(triton.next_power_of_2(width), 1024)
            _chunk_carry_kernel[(shape[0], triton.cdiv(width, block))](decay, summary, carry, self.chunks, width,
                                                                      REVERSE=reverse, BLOCK=block)
            carries.append(carry)
        return tuple(carries)


def _forward(u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor,
             table: Tensor, merge: bool, softplus: bool, out_dtype: torch.dtype) -> Tensor:
    problem = _Problem(u, delta, proj, A, table, merge, softplus)
    operands = (u, delta, proj, A, B, C, D, bias, table)
    (states,) = problem.summaries(operands, None)
    y = torch.zeros(problem.batch, problem.ko, problem.tokens, problem.channels, **problem.f32)
    for k0, per_launch in problem.launches(shared=merge):
        _chunk_output_kernel[problem.grid(per_launch)](u, delta, proj, A, B, C, D, bias, table, states, y, k0,
                                                       per_launch, *problem.sizes, ACCUMULATE=k0 > 0, **problem.meta)
    return y.to(out_dtype)  # the K sequences are summed into y in fp32, so a lower out_dtype is a cast afterwards


def _gradients(u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor,
               table: Tensor, grad_y: Tensor, merge: bool, softplus: bool) -> tuple[Tensor | None, ...]:
    problem = _Problem(u, delta, proj, A, table, merge, softplus)
    grad_y = grad_y.contiguous()
    operands = (u, delta, proj, A, B, C, D, bias, table)
    states, adjoints = problem.summaries(operands, grad_y)
    batch, k, tokens, chunks = problem.batch, problem.k, problem.tokens, problem.chunks
    partials = batch * chunks
    rank = problem.rank
    f32 = problem.f32
    grad_u = torch.zeros(u.shape, **f32)
    grad_delta = (torch.zeros(problem.blocks, batch, k, tokens, rank, **f32) if rank
                  else torch.zeros(batch, k, tokens, problem.channels, **f32))
    grad_proj = torch.zeros(partials, k, rank, problem.channels, **f32) if rank else None
    grads = (torch.zeros(partials, *A.shape, **f32), torch.zeros(problem.blocks, *B.shape, **f32),
             torch.zeros(problem.blocks, *C.shape, **f32), torch.zeros(partials, *D.shape, **f32),
             torch.zeros(partials, *bias.shape, **f32))
    for k0, per_launch in problem.launches(shared=problem.ku == 1):
        _chunk_backward_kernel[problem.grid(per_launch)](
            *operands, grad_y, states, adjoints, grad_u, grad_delta, grad_delta if grad_proj is None else grad_proj,
            *grads, k0, per_launch, batch, *problem.sizes, ACCUMULATE=k0 > 0, **problem.meta)
    if rank:
        grad_delta = grad_delta.sum(0)
    return grad_u, grad_delta, grad_proj, *grads


_scan = fused_scan("triton_scan", _forward, _gradients)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor,
                          table: Tensor, merge: bool, softplus: bool, delta_proj: Tensor | None = None,
                          out_dtype: torch.dtype | None = None) -> Tensor:
    """The fused scan in :mod:`qmamba.ops.cpu_scan`'s layout; u, delta, B, C in fp32/bf16/fp16 (read as they are),
    A, D, bias, proj in fp32; the result is fp32, or ``out_dtype``. Only the forward kernels run without autograd.
    See :func:`qmamba.ops.fused_scan.fused_scan`."""
    table = table.to(device=u.device, dtype=torch.int32).contiguous()
    return _scan(u, delta, A, B, C, D, bias, table, merge, softplus, delta_proj, out_dtype)
