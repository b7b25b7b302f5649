"""First-order linear recurrence ``h[l] = a[l] * h[l-1] + b[l]`` along the last axis, fast on any device.

This is the core of the pure-PyTorch selective scan. Autograd through a Python loop over L builds an L-node graph
whose backward is ~65x slower than its forward; instead :class:`LinearScan` runs a blocked scan without a graph
and differentiates it by hand with the reverse recurrence (what mamba-ssm's CUDA kernel does).

Blocked scan: the sequence is cut into ``n`` chunks of ``T ~ sqrt(L)`` steps. One loop of T steps scans every
chunk at once (vectorised over chunks), one loop of n steps carries the chunk-end states forward, and one
vectorised update adds each carried state times the running product of ``a`` inside the chunk. That is
``O(L)`` work in ``O(sqrt(L))`` Python steps, with no division (a cumulative product may underflow to 0,
which is the correct limit of the recurrence; nothing divides by it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LinearScan", "linear_scan", "linear_scan_reference", "scan", "scan_adjoint"]


def _chunking(length: int) -> tuple[int, int]:
    """(chunk length T, number of chunks n) with T ~ n ~ sqrt(L) and less than n steps of padding."""
    n_chunks = max(1, math.isqrt(length - 1) + 1) if length > 1 else 1
    return -(-length // n_chunks), n_chunks


def _to_blocks(x: Tensor, chunk: int, n_chunks: int) -> Tensor:
    """(M, l) -> (T, n, M) contiguous with l <= n*T, zero-filled past l, so every time step is one dense slab."""
    m, length = x.shape
    out = x.new_empty(chunk, n_chunks, m)
    view = out.permute(2, 1, 0)  # (M, n, T) view of the block layout
    full = length // chunk
    view[:, :full].copy_(x[:, : full * chunk].view(m, full, chunk))
    if full < n_chunks:
        rest = length - full * chunk
        view[:, full, :rest].copy_(x[:, full * chunk :])
        view[:, full, rest:].zero_()
        view[:, full + 1 :].zero_()
    return out


def _from_blocks(x: Tensor, length: int) -> Tensor:
    """Inverse of :func:`_to_blocks`: (T, n, M) -> (M, L)."""
    chunk, n_chunks, m = x.shape
    return x.permute(2, 1, 0).reshape(m, chunk * n_chunks)[:, :length]


def _scan_blocks(a: Tensor, h: Tensor, reverse: bool) -> None:
    """Scan block-layout tensors (T, n, M) in place: ``h`` holds b on entry and the states on exit.

    Forward: ``h[l] = a[l] * h[l-1] + b[l]``; reverse: ``h[l] = a[l] * h[l+1] + b[l]``. ``a`` is overwritten with
    running products. Zero padding (a = b = 0) neither changes real steps before it nor leaks a state after it.
    """
    chunk, n_chunks = a.shape[:2]
    steps = range(chunk - 2, -1, -1) if reverse else range(1, chunk)
    prev = 1 if reverse else -1
    for t in steps:  # scan inside all chunks at once
        h[t].addcmul_(a[t], h[t + prev])
    if n_chunks == 1:
        return
    for t in steps:  # a[t] <- product of a from the chunk's first processed step to t
        a[t].mul_(a[t + prev])
    last = 0 if reverse else chunk - 1
    ends = h[last]  # (n, M) state after each chunk, made global in place
    for c in range(n_chunks - 2, -1, -1) if reverse else range(1, n_chunks):
        ends[c].addcmul_(a[last, c], ends[c + prev])
    if reverse:
        h[1:, :-1].addcmul_(a[1:, :-1], ends[1:].unsqueeze(0))
    else:
        h[:-1, 1:].addcmul_(a[:-1, 1:], ends[:-1].unsqueeze(0))


def scan(a: Tensor, b: Tensor) -> Tensor:
    """``h[l] = a[l] * h[l-1] + b[l]`` for (M, L) tensors, no autograd."""
    length = b.shape[-1]
    chunk, n_chunks = _chunking(length)
    h = _to_blocks(b, chunk, n_chunks)
    _scan_blocks(_to_blocks(a, chunk, n_chunks), h, reverse=False)
    return _from_blocks(h, length)


def scan_adjoint(a: Tensor, grad_h: Tensor) -> Tensor:
    """Adjoint of :func:`scan`: ``g[l] = grad_h[l] + a[l+1] * g[l+1]`` (then db = g, da[l] = g[l] * h[l-1])."""
    length = grad_h.shape[-1]
    chunk, n_chunks = _chunking(length)
    g = _to_blocks(grad_h, chunk, n_chunks)
    _scan_blocks(_to_blocks(a[:, 1:], chunk, n_chunks), g, reverse=True)  # a shifted by one step
    return _from_blocks(g, length)


class LinearScan(torch.autograd.Function):
    """``h = scan(a, b)`` over the last axis with a hand-written backward (a reverse scan, see scan_adjoint)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        shape = torch.broadcast_shapes(a.shape, b.shape)
        length = shape[-1]
        h = scan(a.expand(shape).reshape(-1, length), b.expand(shape).reshape(-1, length)).reshape(shape)
        ctx.save_for_backward(a, h)
        ctx.a_shape, ctx.b_shape = a.shape, b.shape
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        a, h = ctx.saved_tensors
        shape = h.shape
        g = scan_adjoint(a.expand(shape).reshape(-1, shape[-1]), grad_h.reshape(-1, shape[-1])).reshape(shape)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.zeros_like(g)
            torch.mul(g[..., 1:], h[..., :-1], out=grad_a[..., 1:])
            grad_a = _sum_to(grad_a, ctx.a_shape)
        if ctx.needs_input_grad[1]:
            grad_b = _sum_to(g, ctx.b_shape)
        return grad_a, grad_b


def _sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to ``shape``."""
    return x if x.shape == shape else x.sum_to_size(shape)


def linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """``h[..., l] = a[..., l] * h[..., l-1] + b[..., l]`` with ``h[..., -1] = 0``; a and b broadcast together."""
    return LinearScan.apply(a, b)


def linear_scan_reference(a: Tensor, b: Tensor) -> Tensor:
    """The same recurrence as a plain Python loop (differentiable through autograd; slow, for tests)."""
    a, b = torch.broadcast_tensors(a, b)
    h = torch.zeros_like(b[..., 0])
    out = []
    for t in range(b.shape[-1]):
        h = a[..., t] * h + b[..., t]
        out.append(h)
    return torch.stack(out, dim=-1)
