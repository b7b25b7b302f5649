"""Shared cases for the fused scan backends: inputs in SS2D's layout, the sequential reference, the scan orders."""

from __future__ import annotations

import pytest
import torch

from qmamba.ops import selective_scan_reference
from qmamba.ops.scan_order import CROSS_2D, ScanOrder


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def ordered_inputs(batch: int, k: int, tokens: int, dim: int, n: int, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(batch, tokens, dim, generator=g),  # u, channel-last tokens
        0.5 * torch.randn(batch, k, tokens, dim, generator=g),  # delta before bias and softplus
        -(torch.rand(k * dim, n, generator=g) + 0.1),  # A
        torch.randn(batch, k, tokens, n, generator=g),  # B
        torch.randn(batch, k, tokens, n, generator=g),  # C
        torch.randn(k * dim, generator=g),  # D
        0.5 * torch.randn(k * dim, generator=g),  # delta_bias
    ]
    return [t.to(dtype).requires_grad_() for t in tensors]


def ordered_reference(u, delta, A, B, C, D, bias, order: ScanOrder, merge: bool, softplus: bool):
    """Every sequence indexed token by token from the order's table (zero tokens for padding), the sequential
    reference scan, each output put back at its token: independent of ScanOrder's row gathers."""
    batch, tokens, dim = u.shape
    k, length = len(order.directions), order.length
    table = order.table.long()

    def in_order(x, i):  # (batch, T, C) -> (batch, L, C), direction i's order, zeros at padding steps
        return x[:, table[i].clamp(min=0)] * (table[i] >= 0).to(x.dtype)[None, :, None]

    def channels_first(maps):  # K (batch, L, C) sequences -> (batch, K, C, L)
        return torch.stack(maps, 1).transpose(2, 3)

    ys = selective_scan_reference(
        channels_first([in_order(u, i) for i in range(k)]).reshape(batch, k * dim, length),
        channels_first([in_order(delta[:, i], i) for i in range(k)]).reshape(batch, k * dim, length),
        A, channels_first([in_order(B[:, i], i) for i in range(k)]),
        channels_first([in_order(C[:, i], i) for i in range(k)]), D, bias, softplus,
    ).view(batch, k, dim, length)
    out = torch.zeros(batch, k, tokens, dim, dtype=ys.dtype)
    for i in range(k):
        valid = table[i] >= 0
        out[:, i, table[i][valid]] = ys[:, i][..., valid].transpose(1, 2)
    return out.sum(1) if merge else out


ORDERS = [
    pytest.param(CROSS_2D, 5, 7, id="cross-scan-5x7"),  # VMamba, H != W
    pytest.param(CROSS_2D, 1, 1, id="cross-scan-1x1"),  # L = 1
    pytest.param(("w3", "w3c", "w3_flip", "w3c_flip"), 5, 7, id="lqmamba-windows-padded"),  # LQMamba, padding steps
    pytest.param(("w2", "h_flip", "w3c", "v"), 4, 6, id="mixed"),
    pytest.param(("h", "h_flip"), 1, 13, id="vim-two-directions"),  # Vim's forward and backward, L prime
]


def low_rank(args: list[torch.Tensor], rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """SS2D's form: delta as a rank-R factor (batch, K, T, R) and the per-order projection (K, D, R)."""
    u, delta = args[0], args[1]
    g = torch.Generator().manual_seed(3)
    factor = torch.randn(*delta.shape[:3], rank, generator=g, dtype=u.dtype).requires_grad_()
    proj = (torch.randn(delta.shape[1], u.shape[-1], rank, generator=g, dtype=u.dtype) / rank**0.5).requires_grad_()
    return [u, factor, *args[2:]], proj




def kernel_args(order: ScanOrder, batch: int, dim: int, n: int, merge: bool, rank: int | None,
                out_dtype: torch.dtype = torch.float32) -> tuple:
    """The fused kernels' own operands (``qmamba.ops.cpu_scan``'s layout), requiring gradients, and the output dtype:
    for opcheck (the backward op takes all but the last)."""
    k = len(order.directions)
    args = ordered_inputs(batch, k, order.num_tokens, dim, n)
    proj = torch.empty(0, 0, 0)
    if rank:
        args, proj = low_rank(args, rank)
        proj = proj.detach().transpose(1, 2).contiguous().requires_grad_()  # (K, R, C)
    u, delta, A, B, C, D, bias = args

    def fresh(x: torch.Tensor, *shape: int) -> torch.Tensor:
        return x.detach().reshape(shape).contiguous().requires_grad_()

    A_k = A.detach().view(k, dim, n).transpose(1, 2).contiguous().requires_grad_()
    return (fresh(u, batch, 1, order.num_tokens, dim), delta, proj, A_k, B, C, fresh(D, k, dim), fresh(bias, k, dim),
            order.table, merge, True, out_dtype)


def check_gradients(y: torch.Tensor, y_ref: torch.Tensor, inputs: list[torch.Tensor], names: list[str]) -> None:
    """The output and every input's gradient within 1e-5 relative of the reference's."""
    assert rel_err(y, y_ref) < 1e-5
    grad_out = torch.randn_like(y)
    for name, g, g_ref in zip(names, torch.autograd.grad(y, inputs, grad_out),
                              torch.autograd.grad(y_ref, inputs, grad_out), strict=True):
        assert g.shape == g_ref.shape, name
        assert rel_err(g, g_ref) < 1e-5, name


def check_ordered_scan(backend: str, order: ScanOrder, batch: int, dim: int, n: int, merge: bool,
                       rank: int | None) -> None:
    """ordered_selective_scan on ``backend`` against the sequential reference: shape, output, all gradients
    (of delta_proj too when the step sizes are low-rank)."""
    from qmamba.ops import ordered_selective_scan

    k, tokens = len(order.directions), order.num_tokens
    args = ordered_inputs(batch, k, tokens, dim, n)
    proj, names = None, "u delta A B C D delta_bias".split()
    if rank:
        args, proj = low_rank(args, rank)
        names.append("delta_proj")
    y = ordered_selective_scan(*args, order, merge=merge, backend=backend, delta_proj=proj)
    full = args if proj is None else [args[0], args[1] @ proj.transpose(1, 2), *args[2:]]
    y_ref = ordered_reference(*full, order, merge, True)
    assert y.shape == y_ref.shape == ((batch, tokens, dim) if merge else (batch, k, tokens, dim))
    check_gradients(y, y_ref, args if proj is None else [*args, proj], names)
