"""Fused selective scan in Triton, for GPUs without mamba-ssm: the design of :mod:`qmamba.ops.cpu_scan` on a GPU.

Same operands and layout as the CPU kernel (see its module docstring): channel-last tokens read in the order of a
(K, L) index table, optional low-rank step sizes expanded per step (``delta_proj``), bias + softplus +
discretisation + recurrence + ``D*u`` and the merge of the K directions in one kernel, states in fp32 whatever the
input dtype (fp32, bf16, fp16). One program owns one batch row and one block of channels for all K directions, so
the merged output and the shared input's gradient are accumulated without atomics.

The scan is a sequential loop over L per program (every channel of the block in parallel lanes); the backward
writes the states to a global scratch in a forward pass, then runs the adjoint recurrence in reverse. Whether a
chunked ``tl.associative_scan`` beats this loop on a given GPU is for ``benchmarks/gpu_check.sh`` to measure.

Tests run these kernels on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qmamba.ops.fused_scan import fused_scan

__all__ = ["selective_scan_triton"]

_BLOCK_D = 32  # channels per program


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
def _step_delta(delta_ptr, proj, b, k, p, valid, c, cmask, r, K, T, channels, rank, LOW_RANK: tl.constexpr):
    """The step sizes (before bias) of sequence k at token p for channels c: read, or rank-R @ proj (R_PAD, BLOCK)."""
    if LOW_RANK:
        w = tl.load(delta_ptr + ((b * K + k) * T + p) * rank + r, mask=(r < rank) & valid, other=0.0).to(tl.float32)
        z = tl.sum(w[:, None] * proj, axis=0)
    else:
        z = tl.load(delta_ptr + ((b * K + k) * T + p) * channels + c, mask=cmask & valid, other=0.0).to(tl.float32)
    return z


@triton.jit
def _lanes(channels, N, BLOCK: tl.constexpr, N_PAD: tl.constexpr, R_PAD: tl.constexpr):
    """This program's batch row and channel block, its channels, the state and rank lanes, and their masks."""
    b, blk = tl.program_id(0), tl.program_id(1)
    c = blk * BLOCK + tl.arange(0, BLOCK)
    n = tl.arange(0, N_PAD)
    return b, blk, c, c < channels, n, n < N, tl.arange(0, R_PAD)


@triton.jit
def _direction(A_ptr, proj_ptr, D_ptr, bias_ptr, k, n, nmask, c, cmask, r, N, rank, channels):
    """Sequence k's parameters for the block's channels: A (N_PAD, BLOCK), proj (R_PAD, BLOCK), D, bias."""
    A = tl.load(A_ptr + (k * N + n[:, None]) * channels + c[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)
    proj = tl.load(proj_ptr + (k * rank + r[:, None]) * channels + c[None, :],
                   mask=(r[:, None] < rank) & cmask[None, :], other=0.0)
    skip = tl.load(D_ptr + k * channels + c, mask=cmask, other=0.0)
    bias = tl.load(bias_ptr + k * channels + c, mask=cmask, other=0.0)
    return A, proj, skip, bias


@triton.jit
def _step(table_ptr, delta_ptr, u_ptr, B_ptr, proj, bias, b, k, ku, step, c, cmask, n, nmask, r, Ku, K, T, L,
          channels, N, rank, LOW_RANK: tl.constexpr):
    """What step ``step`` of sequence k reads: its token p (0 for padding), whether it is a real token, the step size
    before softplus z = delta + bias, the input x and B, all fp32 (zero input and B on a padding step)."""
    p = tl.load(table_ptr + k * L + step)
    valid = p >= 0
    p = tl.maximum(p, 0)
    z = _step_delta(delta_ptr, proj, b, k, p, valid, c, cmask, r, K, T, channels, rank, LOW_RANK) + bias
    x = tl.load(u_ptr + ((b * Ku + ku) * T + p) * channels + c, mask=cmask & valid, other=0.0).to(tl.float32)
    bn = tl.load(B_ptr + ((b * K + k) * T + p) * N + n, mask=nmask & valid, other=0.0).to(tl.float32)
    return p, valid, z, x, bn


@triton.jit
def _forward_kernel(u_ptr, delta_ptr, proj_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, table_ptr, y_ptr,
                    Ku, K, Ko, T, L, channels, N, rank,
                    SOFTPLUS: tl.constexpr, LOW_RANK: tl.constexpr, BLOCK: tl.constexpr, N_PAD: tl.constexpr,
                    R_PAD: tl.constexpr):
    b, blk, c, cmask, n, nmask, r = _lanes(channels, N, BLOCK, N_PAD, R_PAD)
    for k in range(K):
        ku, ko = k % Ku, k % Ko
        A, proj, skip, bias = _direction(A_ptr, proj_ptr, D_ptr, bias_ptr, k, n, nmask, c, cmask, r, N, rank, channels)
        h = tl.zeros((N_PAD, BLOCK), tl.float32)
        for step in range(L):
            p, valid, d, x, bn = _step(table_ptr, delta_ptr, u_ptr, B_ptr, proj, bias, b, k, ku, step, c, cmask, n,
                                       nmask, r, Ku, K, T, L, channels, N, rank, LOW_RANK)
            if SOFTPLUS:
                d, slope = _softplus_and_slope(d)
            cn = tl.load(C_ptr + ((b * K + k) * T + p) * N + n, mask=nmask & valid, other=0.0).to(tl.float32)
            h = tl.exp(d[None, :] * A) * h + (d * x)[None, :] * bn[:, None]
            y = tl.sum(h * cn[:, None], axis=0) + skip * x
            out = y_ptr + ((b * Ko + ko) * T + p) * channels + c
            tl.store(out, tl.load(out, mask=cmask & valid, other=0.0) + y, mask=cmask & valid)
        tl.debug_barrier()  # the next direction adds to tokens this one wrote, maybe from other threads


@triton.jit
def _backward_kernel(u_ptr, delta_ptr, proj_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, table_ptr, gy_ptr,
                     states_ptr, gu_ptr, gdelta_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr,
                     batch, Ku, K, Ko, T, L, channels, N, rank,
                     SOFTPLUS: tl.constexpr, LOW_RANK: tl.constexpr, BLOCK: tl.constexpr, N_PAD: tl.constexpr,
                     R_PAD: tl.constexpr):
    b, blk, c, cmask, n, nmask, r = _lanes(channels, N, BLOCK, N_PAD, R_PAD)
    tile = nmask[:, None] & cmask[None, :]
    scratch = states_ptr + (b * L * N_PAD + n[:, None]) * channels + c[None, :]  # states[b, step, n, c]
    for k in range(K):
        ku, ko = k % Ku, k % Ko
        A, proj, skip, bias = _direction(A_ptr, proj_ptr, D_ptr, bias_ptr, k, n, nmask, c, cmask, r, N, rank, channels)
        # forward: the state after every step
        h = tl.zeros((N_PAD, BLOCK), tl.float32)
        for step in range(L):
            p, valid, d, x, bn = _step(table_ptr, delta_ptr, u_ptr, B_ptr, proj, bias, b, k, ku, step, c, cmask, n,
                                       nmask, r, Ku, K, T, L, channels, N, rank, LOW_RANK)
            if SOFTPLUS:
                d, slope = _softplus_and_slope(d)
            h = tl.exp(d[None, :] * A) * h + (d * x)[None, :] * bn[:, None]
            tl.store(scratch + step * N_PAD * channels, h, mask=tile)
        tl.debug_barrier()  # the states written above are read back below, maybe by other threads
        # reverse: the adjoint state g and every gradient
        g = tl.zeros((N_PAD, BLOCK), tl.float32)
        a_next = tl.zeros((N_PAD, BLOCK), tl.float32)
        g_A = tl.zeros((N_PAD, BLOCK), tl.float32)
        g_D = tl.zeros((BLOCK,), tl.float32)
        g_bias = tl.zeros((BLOCK,), tl.float32)
        for i in range(L):
            step = L - 1 - i
            p, valid, z, x, bn = _step(table_ptr, delta_ptr, u_ptr, B_ptr, proj, bias, b, k, ku, step, c, cmask, n,
                                       nmask, r, Ku, K, T, L, channels, N, rank, LOW_RANK)
            d, slope = z, tl.full((BLOCK,), 1.0, tl.float32)
            if SOFTPLUS:
                d, slope = _softplus_and_slope(z)
            cn = tl.load(C_ptr + ((b * K + k) * T + p) * N + n, mask=nmask & valid, other=0.0).to(tl.float32)
            gy = tl.load(gy_ptr + ((b * Ko + ko) * T + p) * channels + c, mask=cmask & valid, other=0.0)
            gy = gy.to(tl.float32)
            h = tl.load(scratch + step * N_PAD * channels, mask=tile, other=0.0)
            h_prev = tl.load(scratch + (step - 1) * N_PAD * channels, mask=tile & (step > 0), other=0.0)
            a = tl.exp(d[None, :] * A)
            g = a_next * g + gy[None, :] * cn[:, None]
            g_x = g * h_prev * a  # d loss / d (delta * A)
            g_A += g_x * d[None, :]
            g_b = g * bn[:, None]
            g_d = tl.sum(g_x * A, axis=0) + tl.sum(g_b, axis=0) * x
            g_z = g_d * slope
            g_bias += g_z
            g_D += gy * x
            out = ((blk * batch + b) * K + k) * T + p  # partial B / C gradients of this channel block
            tl.store(gB_ptr + out * N + n, tl.sum(g * (d * x)[None, :], axis=1), mask=nmask & valid)
            tl.store(gC_ptr + out * N + n, tl.sum(gy[None, :] * h, axis=1), mask=nmask & valid)
            tl.store(gdelta_ptr + ((b * K + k) * T + p) * channels + c, g_z, mask=cmask & valid)
            gu = gu_ptr + ((b * Ku + ku) * T + p) * channels + c
            g_u = tl.sum(g_b, axis=0) * d + gy * skip
            tl.store(gu, tl.load(gu, mask=cmask & valid, other=0.0) + g_u, mask=cmask & valid)
            a_next = a
        tl.store(gA_ptr + ((b * K + k) * N + n[:, None]) * channels + c[None, :], g_A, mask=tile)
        tl.store(gD_ptr + (b * K + k) * channels + c, g_D, mask=cmask)
        tl.store(gbias_ptr + (b * K + k) * channels + c, g_bias, mask=cmask)
        tl.debug_barrier()  # grad_u accumulates across directions; the scratch is rewritten by the next one


def _launch_args(u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, table: Tensor, merge: bool, softplus: bool
                 ) -> tuple[tuple[int, int], tuple[int, ...], dict[str, object]]:
    batch, ku, tokens, channels = u.shape
    k, length, n = delta.shape[1], table.shape[1], A.shape[1]
    rank = proj.shape[1] if proj.numel() else 0
    grid = (batch, triton.cdiv(channels, _BLOCK_D))
    sizes = (ku, k, 1 if merge else k, tokens, length, channels, n, rank)
    meta = dict(SOFTPLUS=softplus, LOW_RANK=rank > 0, BLOCK=_BLOCK_D, N_PAD=triton.next_power_of_2(n),
                R_PAD=triton.next_power_of_2(max(rank, 1)))
    return grid, sizes, meta


def _forward(u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor,
             table: Tensor, merge: bool, softplus: bool) -> Tensor:
    grid, sizes, meta = _launch_args(u, delta, proj, A, table, merge, softplus)
    y = torch.zeros(u.shape[0], sizes[2], *u.shape[2:], device=u.device, dtype=torch.float32)
    _forward_kernel[grid](u, delta, proj, A, B, C, D, bias, table, y, *sizes, **meta)
    return y


def _gradients(u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor,
               table: Tensor, grad_y: Tensor, merge: bool, softplus: bool) -> tuple[Tensor, ...]:
    grid, sizes, meta = _launch_args(u, delta, proj, A, table, merge, softplus)
    batch, (k, tokens, length, channels) = u.shape[0], (sizes[1], sizes[3], sizes[4], sizes[5])
    f32 = dict(device=u.device, dtype=torch.float32)
    states = torch.empty(batch, length, meta["N_PAD"], channels, **f32)
    grads = (torch.zeros(u.shape, **f32), torch.zeros(batch, k, tokens, channels, **f32),
             torch.zeros(batch, *A.shape, **f32), torch.zeros(grid[1], *B.shape, **f32),
             torch.zeros(grid[1], *C.shape, **f32), torch.zeros(batch, *D.shape, **f32),
             torch.zeros(batch, *bias.shape, **f32))
    _backward_kernel[grid](u, delta, proj, A, B, C, D, bias, table, grad_y.contiguous(), states, *grads,
                           batch, *sizes, **meta)
    return grads


_scan = fused_scan("_TritonScan", _forward, _gradients)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor,
                          table: Tensor, merge: bool, softplus: bool, delta_proj: Tensor | None = None) -> Tensor:
    """The fused scan in :mod:`qmamba.ops.cpu_scan`'s layout; u, delta, B, C in fp32/bf16/fp16, A, D, bias, proj in
    fp32; the result is fp32. Only the forward kernel runs without autograd."""
    operands = [x.contiguous() for x in (u, delta, A, B, C, D, bias)]
    table = table.to(device=u.device, dtype=torch.int32).contiguous()
    return _scan(*operands, table, merge, softplus, None if delta_proj is None else delta_proj.contiguous())
