"""Mamba's selective scan with per-call backend dispatch.

Math (mamba-ssm's ``selective_scan_fn`` conventions): for batch b, channel d (group g = d // (D / G)), state n, step l,

    delta = softplus(delta + delta_bias)            (each part optional)
    h[l, n] = exp(delta[l] * A[d, n]) * h[l-1, n] + delta[l] * B[b, g, n, l] * u[b, d, l]
    y[l]    = sum_n C[b, g, n, l] * h[l, n] + D[d] * u[b, d, l]

Backends:

* ``cuda``: mamba-ssm's fused kernel, imported lazily on first use (the package cannot even be imported without
  its compiled extension, so nothing here touches it at import time).
* ``triton``: qmamba's fused Triton kernels (:mod:`qmamba.ops.triton_scan`), for CUDA tensors without mamba-ssm
  (and CPU tensors under ``TRITON_INTERPRET=1``, for tests).
* ``cpu``: qmamba's fused numba kernels (:mod:`qmamba.ops.cpu_scan`), for CPU tensors; numba is imported on first
  use and the kernels are compiled once per machine (cached next to the module or in numba's user cache).
* ``torch``: pure PyTorch, fp32 internally, a blocked linear scan with a hand-written backward (see
  :mod:`qmamba.ops.linear_scan`). Runs on any device and under ``torch.export`` (ONNX) and ``torch.compile``.
* :func:`selective_scan_reference`: a plain sequential loop under autograd, kept for tests and benchmarks.

``auto`` picks ``cuda`` for CUDA tensors when mamba-ssm imports, else ``triton``; ``cpu`` for CPU tensors when numba
imports; else ``torch`` (and always ``torch`` while ``torch.export`` traces, the ONNX path) -- decided per call, so
CPU and GPU models can share a process. The fused kernels are ``torch.library`` custom ops, so ``torch.compile`` keeps
them in its graph.

:func:`ordered_selective_scan` scans K orderings of one token set (VMamba's cross-scan, LQMamba's window scans) given
as a :class:`~qmamba.ops.scan_order.ScanOrder`: the ``cpu`` backend reads the tokens in each order and merges the
outputs in place (so does ``triton``); the others gather the sequences, scan them and scatter the outputs back.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from qmamba.ops.cpu_fusion import eager_cpu_inference
from qmamba.ops.linear_scan import linear_scan_reference, scan, scan_adjoint
from qmamba.ops.scan_order import ScanOrder, identity_table

__all__ = [
    "BACKEND_DESCRIPTIONS",
    "ScanBackend",
    "cpu_selective_scan_available",
    "cuda_selective_scan_available",
    "triton_selective_scan_available",
    "ordered_selective_scan",
    "resolve_backend",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_torch",
    "validate_backend",
]

ScanBackend = Literal["auto", "cuda", "triton", "cpu", "torch"]
_BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
BACKEND_DESCRIPTIONS = {
    "cuda": "cuda (mamba-ssm's fused CUDA kernel)",
    "triton": "triton (qmamba's fused Triton kernel)",
    "cpu": "cpu (qmamba's fused numba kernel)",
    "torch": "torch (the pure-PyTorch scan)",
}
log = logging.getLogger(__name__)


def load_once(load: Callable[[], object]) -> Callable[[], object]:
    """``functools.cache`` for an optional kernel's loader, in a form ``torch.compile`` traces without a warning (it
    ignores ``functools.cache`` wrappers and says so)."""
    loaded: list[object] = []

    @functools.wraps(load)
    def once() -> object:
        if not loaded:
            loaded.append(load())
        return loaded[0]

    return once


@load_once
def _load_cuda_kernel() -> Callable[..., Tensor] | None:
    """mamba-ssm's ``selective_scan_fn``, or None when the package or its compiled extension is missing."""
    try:
        import selective_scan_cuda  # noqa: F401  (the compiled extension; fails fast without it)
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, undefined symbols (OSError), CUDA init errors, ...
        log.debug("mamba-ssm selective scan unavailable: %s", err)
        return None
    return selective_scan_fn


@torch.compiler.assume_constant_result  # a constant of the graph: tracing the load would guard on it
def cuda_selective_scan_available() -> bool:
    """True when mamba-ssm's CUDA selective scan can be imported."""
    return _load_cuda_kernel() is not None


@load_once
def _load_cpu_kernel() -> Callable[..., Tensor] | None:
    """qmamba's fused CPU scan, or None when numba cannot be imported (logged once)."""
    try:
        from qmamba.ops.cpu_scan import selective_scan_cpu
    except Exception as err:  # ImportError, or a numba that does not match the installed numpy
        log.warning("the fused CPU selective scan is unavailable (%s); using the slower torch scan. Install numba "
                    "(`pip install numba`) to enable it.", err)
        return None
    return selective_scan_cpu


@torch.compiler.assume_constant_result  # a constant of the graph: tracing the load would guard on it
def cpu_selective_scan_available() -> bool:
    """True when the fused CPU selective scan (numba) can be imported."""
    return _load_cpu_kernel() is not None


@load_once
def _load_triton_kernel() -> Callable[..., Tensor] | None:
    """qmamba's fused Triton scan, or None when triton cannot be imported."""
    try:
        from qmamba.ops.triton_scan import selective_scan_triton
    except Exception as err:  # no triton (CPU builds of torch on some platforms), or a broken install
        log.debug("the Triton selective scan is unavailable: %s", err)
        return None
    return selective_scan_triton


@torch.compiler.assume_constant_result  # a constant of the graph: tracing the load would guard on it
def triton_selective_scan_available() -> bool:
    """True when the fused Triton selective scan can be imported."""
    return _load_triton_kernel() is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def validate_backend(backend: str) -> ScanBackend:
    """Return ``backend`` if it names a backend, else raise."""
    if backend not in _BACKENDS:
        raise ValueError(f"scan backend must be one of {_BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def resolve_backend(backend: ScanBackend, device: torch.device) -> Literal["cuda", "triton", "cpu", "torch"]:
    """The backend that runs for tensors on ``device``; a named fused backend that cannot run raises a clear error."""
    validate_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if torch.compiler.is_exporting():  # torch.export (and so ONNX) needs plain tensor ops, not custom kernels
            return "torch"
        if device.type == "cuda":
            compiling = torch.compiler.is_compiling()  # mamba-ssm's op is no custom op: compiled graphs take triton's
            if cuda_selective_scan_available() and not (compiling and triton_selective_scan_available()):
                return "cuda"
            return "triton" if triton_selective_scan_available() else "torch"
        return "cpu" if device.type == "cpu" and cpu_selective_scan_available() else "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise RuntimeError(
                f"scan backend 'cpu' was requested for tensors on {device}; it runs on CPU tensors only. "
                "Use backend 'auto' to pick the fastest backend per device."
            )
        if not cpu_selective_scan_available():
            raise RuntimeError(
                "scan backend 'cpu' was requested but numba cannot be imported. Install it with `pip install numba`, "
                "or use backend 'auto'/'torch'."
            )
        return "cpu"
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
            raise RuntimeError(
                f"scan backend 'triton' was requested for tensors on {device}; it runs on CUDA tensors (or on CPU "
                "tensors under TRITON_INTERPRET=1, for tests). Use backend 'auto' to pick the fastest per device."
            )
        if not triton_selective_scan_available():
            raise RuntimeError(
                "scan backend 'triton' was requested but triton cannot be imported; it ships with CUDA builds of "
                "torch (`pip install triton` otherwise), or use backend 'auto'/'torch'."
            )
        return "triton"
    if device.type != "cuda":
        raise RuntimeError(
            f"scan backend 'cuda' was requested for tensors on {device}; it runs on CUDA tensors only. "
            "Use backend 'auto' (or 'torch') to run elsewhere."
        )
    if not cuda_selective_scan_available():
        raise RuntimeError(
            "scan backend 'cuda' was requested but mamba-ssm's selective_scan_cuda extension cannot be imported. "
            "Install it with `MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-cache-dir "
            "mamba-ssm==2.3.2.post1` against your torch build, or use backend 'auto'/'torch'."
        )
    return "cuda"


def _n_groups(B: Tensor, C: Tensor) -> int:
    groups = {x.shape[1] for x in (B, C) if x.dim() == 4}
    if len(groups) > 1:
        raise ValueError(f"B and C have different group counts: {tuple(B.shape)} vs {tuple(C.shape)}")
    return groups.pop() if groups else 1


def _grouped(x: Tensor, groups: int) -> Tensor:
    """B or C as a tensor that broadcasts against the grouped layout (batch, G, D/G, N, L)."""
    if x.dim() == 2:  # constant (dim, N)
        return x.view(1, groups, x.shape[0] // groups, x.shape[1], 1)
    if x.dim() == 3:  # (batch, N, L): a single group shared by all channels
        return x.view(x.shape[0], 1, 1, *x.shape[1:])
    return x.unsqueeze(2)  # (batch, G, N, L)


class _Layout(NamedTuple):
    """The scan's operands in the grouped layout (batch, G, D/G, N, L): grouped B/C broadcast, never copied."""

    shape5: tuple[int, ...]  # (batch, G, D/G, 1, L)
    full: torch.Size  # shape of the states h
    delta5: Tensor  # softplus'ed delta (when asked)
    u5: Tensor
    A5: Tensor
    Bg: Tensor
    Cg: Tensor
    decay: Tensor  # exp(delta * A), expanded to ``full``


def _grouped_layout(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, softplus: bool) -> _Layout:
    batch, dim, length = u.shape
    groups = _n_groups(B, C)
    if dim % groups:
        raise ValueError(f"{dim} channels cannot be split into {groups} groups of B/C")
    shape5 = (batch, groups, dim // groups, 1, length)
    delta5 = (F.softplus(dt) if softplus else dt).view(shape5)
    A5 = A.view(1, groups, dim // groups, A.shape[1], 1)
    Bg, Cg = _grouped(B, groups), _grouped(C, groups)
    decay = torch.exp(delta5 * A5)
    full = torch.broadcast_shapes(decay.shape, Bg.shape, Cg.shape, shape5)
    return _Layout(shape5, full, delta5, u.view(shape5), A5, Bg, Cg, decay.expand(full))


class _SelectiveScanFn(torch.autograd.Function):
    """Fused pure-PyTorch selective scan (fp32): blocked scan forward, hand-written adjoint backward.

    Saves u, the pre-softplus delta and the states h; the decay exp(delta * A) is recomputed in backward. The
    gradient w.r.t. the pre-activation x = delta * A of the decay a = exp(x) is g[l] * h[l-1] * a[l], where g is the
    adjoint state (:func:`qmamba.ops.linear_scan.scan_adjoint`).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):  # type: ignore[override]  # noqa: ANN001
        dt = delta if delta_bias is None else delta + delta_bias[:, None]
        shape5, full, delta5, u5, _, Bg, Cg, decay = _grouped_layout(u, dt, A, B, C, delta_softplus)
        length = u.shape[-1]
        inputs = ((delta5 * u5) * Bg).expand(full)
        h = scan(decay.reshape(-1, length), inputs.reshape(-1, length)).view(full)
        y = (h * Cg).sum(3).view(u.shape)
        if D is not None:
            y.addcmul_(D[:, None], u)
        ctx.save_for_backward(u, dt, A, B, C, D, h)
        ctx.delta_softplus = delta_softplus
        ctx.has_bias = delta_bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]  # noqa: ANN001, ANN205
        u, dt, A, B, C, D, h = ctx.saved_tensors
        shape5, full, delta5, u5, A5, Bg, Cg, decay = _grouped_layout(u, dt, A, B, C, ctx.delta_softplus)
        length = u.shape[-1]
        gy5 = grad_y.view(shape5)
        grad_C = _reduce_to(gy5 * h, Cg.shape, C.shape)
        g = scan_adjoint(decay.reshape(-1, length), (gy5 * Cg).expand(full).reshape(-1, length)).view(full)
        grad_x = torch.zeros(full, dtype=g.dtype, device=g.device)  # d loss / d (delta * A)
        torch.mul(g[..., 1:], h[..., :-1], out=grad_x[..., 1:])
        grad_x.mul_(decay)
        grad_A = _reduce_to(grad_x * delta5, A5.shape, A.shape)
        grad_B = _reduce_to(g * (delta5 * u5), Bg.shape, B.shape)
        grad_du = (g * Bg).sum(3, keepdim=True)  # d loss / d (delta * u)
        grad_delta = (grad_x * A5).sum(3, keepdim=True) + grad_du * u5
        grad_u = grad_du * delta5
        grad_D = None
        if D is not None:
            grad_u = grad_u + gy5 * D.view(shape5[1:-1] + (1,))
            grad_D = (grad_y * u).sum((0, 2))
        if ctx.delta_softplus:
            grad_delta = grad_delta * torch.sigmoid(dt).view(shape5)
        grad_delta = grad_delta.view(u.shape)
        grad_bias = grad_delta.sum((0, 2)) if ctx.has_bias else None
        return grad_u.view(u.shape), grad_delta, grad_A, grad_B, grad_C, grad_D, grad_bias, None


def _reduce_to(grad: Tensor, broadcast_shape: tuple[int, ...], shape: torch.Size) -> Tensor:
    """Sum a full-size gradient down to the broadcast view of an input, then back to the input's own shape."""
    return grad.sum_to_size(broadcast_shape).reshape(shape)


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"A must be (dim, N) = ({u.shape[1]}, N); got {tuple(A.shape)}")
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by qmamba's scans")
    for name, x in (("B", B), ("C", C)):
        if x.dim() not in (2, 3, 4) or (x.dim() > 2 and (x.shape[0] != u.shape[0] or x.shape[-1] != u.shape[2])):
            raise ValueError(f"{name} must be (dim, N), (batch, N, L) or (batch, G, N, L); got {tuple(x.shape)}")
        if x.shape[-2 if x.dim() > 2 else 1] != A.shape[1]:
            raise ValueError(f"{name}'s state size does not match A's N = {A.shape[1]}: {tuple(x.shape)}")


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Pure-PyTorch selective scan: fp32 inside, output in u's dtype, exact gradients, any device."""
    _check_shapes(u, delta, A, B, C)
    y = _SelectiveScanFn.apply(
        u.float(), delta.float(), A.float(), B.float(), C.float(),
        None if D is None else D.float(), None if delta_bias is None else delta_bias.float(), delta_softplus,
    )
    return y.to(u.dtype)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Sequential reference: the recurrence as a Python loop over L under plain autograd (slow)."""
    _check_shapes(u, delta, A, B, C)
    dt = delta.float() if delta_bias is None else delta.float() + delta_bias.float()[:, None]
    layout = _grouped_layout(u.float(), dt, A.float(), B.float(), C.float(), delta_softplus)
    h = linear_scan_reference(layout.decay, (layout.delta5 * layout.u5) * layout.Bg)
    y = (h * layout.Cg).sum(3).view(u.shape)
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    return y.to(u.dtype)


def _selective_scan_cuda(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> Tensor:
    """mamba-ssm's kernel with its dtype contract applied: delta, B, C in u's dtype; A, D, bias fp32."""
    kernel = _load_cuda_kernel()
    assert kernel is not None  # resolve_backend checked it

    def last_contiguous(x: Tensor) -> Tensor:
        return x if x.stride(-1) == 1 else x.contiguous()

    dtype = u.dtype
    B = B.float() if B.dim() == 2 else last_contiguous(B.to(dtype))
    C = C.float() if C.dim() == 2 else last_contiguous(C.to(dtype))
    return kernel(
        last_contiguous(u),
        last_contiguous(delta.to(dtype)),
        A.float().contiguous(),
        B,
        C,
        None if D is None else D.float().contiguous(),
        None,
        None if delta_bias is None else delta_bias.float().contiguous(),
        delta_softplus,
    )


_FUSED = ("cpu", "triton")  # backends that take the fused kernels' layout (qmamba.ops.cpu_scan's docstring)


def _fused(backend: str, u: Tensor) -> tuple[Callable[..., Tensor], Callable[[Tensor], Tensor], torch.dtype]:
    """A fused kernel, what its operands u / delta / B / C become before it takes them, and the dtype of its
    parameters A / D / bias / proj."""
    if backend == "cpu":  # float64 for float64 inputs (gradcheck); else each operand in float32 or bf16 as it is
        kernel, params = _load_cpu_kernel(), torch.float64 if u.dtype == torch.float64 else torch.float32
        readable = (torch.float32, torch.bfloat16) if params == torch.float32 else (params,)

        def operand(x: Tensor) -> Tensor:
            return x if x.dtype in readable else x.to(params)
    else:  # Triton loads fp32 / bf16 / fp16, all in u's dtype, and keeps the states in fp32
        kernel, params = _load_triton_kernel(), torch.float32
        dtype = u.dtype if u.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32

        def operand(x: Tensor) -> Tensor:
            return x.to(dtype)
    assert kernel is not None  # resolve_backend checked it
    return kernel, operand, params


def _skip_or_bias(x: Tensor | None, shape: tuple[int, int], like: Tensor) -> Tensor:
    """D or delta_bias in the kernels' (sequences, channels) layout; zeros when absent."""
    return like.new_zeros(shape) if x is None else x.to(like.dtype).view(shape)


def _per_channel(x: Tensor, batch: int, dim: int, length: int) -> Tensor:
    """B or C as (batch, dim, N, L): one group per channel (how the kernels take a constant (dim, N) B or C)."""
    if x.dim() == 2:
        return x[None, :, :, None].expand(batch, dim, x.shape[1], length)
    if x.dim() == 3:
        return x.unsqueeze(1).expand(batch, dim, *x.shape[1:])
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def _selective_scan_fused(
    backend: str,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> Tensor:
    """A fused kernel on (batch, dim, L) sequences: channel group g of B/C is the kernel's sequence g."""
    kernel, operand, params = _fused(backend, u)
    batch, dim, length = u.shape
    if B.dim() == 2 or C.dim() == 2:
        B, C = (_per_channel(x, batch, dim, length) for x in (B, C))
    groups = _n_groups(B, C)
    if dim % groups:
        raise ValueError(f"{dim} channels cannot be split into {groups} groups of B/C")
    width = dim // groups

    def channels_last(x: Tensor) -> Tensor:
        """(batch, dim, L) -> (batch, G, L, dim / G), copied here so that backward reuses the copy."""
        return operand(x).view(batch, groups, width, length).transpose(2, 3).contiguous()

    def by_step(x: Tensor) -> Tensor:
        """(batch, N, L) or (batch, G, N, L) -> (batch, G, L, N)."""
        x = x if x.dim() == 4 else x.unsqueeze(1)
        return operand(x).expand(batch, groups, *x.shape[2:]).transpose(2, 3)

    A_k = A.to(params).view(groups, width, -1).transpose(1, 2)
    y = kernel(
        channels_last(u), channels_last(delta), A_k, by_step(B), by_step(C), _skip_or_bias(D, (groups, width), A_k),
        _skip_or_bias(delta_bias, (groups, width), A_k), identity_table(length, groups), False, delta_softplus,
        out_dtype=u.dtype,
    )
    return y.transpose(2, 3).reshape(batch, dim, length)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: ScanBackend = "auto",
) -> Tensor:
    """Selective scan of ``u`` (batch, dim, L) with mamba-ssm's argument conventions.

    Args:
        u: inputs (batch, dim, L) in fp32, fp16 or bf16.
        delta: step sizes, same shape as u (cast to u's dtype for the CUDA kernel).
        A: state matrix (dim, N), used in fp32.
        B: input projection: grouped (batch, G, N, L), (batch, N, L) or constant (dim, N).
        C: output projection, same forms as B.
        D: optional skip weight (dim,), fp32.
        delta_bias: optional (dim,) bias added to delta before the softplus, fp32.
        delta_softplus: apply softplus to delta.
        backend: ``auto`` (the fused kernel of the tensors' device when available), ``cuda``, ``triton``, ``cpu`` or
            ``torch``.

    Returns:
        y (batch, dim, L) in u's dtype.
    """
    resolved = resolve_backend(backend, u.device)
    if resolved == "cuda":
        return _selective_scan_cuda(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if resolved in _FUSED:
        _check_shapes(u, delta, A, B, C)
        return _selective_scan_fused(resolved, u, delta, A, B, C, D, delta_bias, delta_softplus)
    return selective_scan_torch(u, delta, A, B, C, D, delta_bias, delta_softplus)


def ordered_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    order: ScanOrder,
    merge: bool = True,
    delta_softplus: bool = True,
    backend: ScanBackend = "auto",
    delta_proj: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    scan_dtype: torch.dtype | None = None,
    layer_norm: tuple[Tensor | None, Tensor | None, float] | None = None,
) -> Tensor:
    """Selective scans of one token set read in K orders (SS2D), inputs and outputs at the tokens' own positions.

    Projections are per token, so callers compute delta, B and C on the unpermuted map and no permuted copy of
    anything is needed on the ``cpu`` backend. Padding steps of an order (window scans of maps that are not a
    multiple of the window) see a zero token: zero input, B and C, and delta = softplus(delta_bias).

    Args:
        u: tokens (batch, T, D), channel-last, shared by the K orders.
        delta: step sizes before bias and softplus (batch, K, T, D), one set per order; with ``delta_proj``, their
            rank-R factor (batch, K, T, R).
        A: (K * D, N), order-major like VMamba's ``A_logs``.
        B, C: (batch, K, T, N), one per order, shared by its D channels.
        D: optional skip weight (K * D,); delta_bias: optional (K * D,).
        order: the K orders (:func:`qmamba.ops.scan_order.scan_order`), over T = H * W tokens.
        merge: sum the K outputs at each token (VMamba): (batch, T, D); else one per order: (batch, K, T, D).
        delta_softplus: apply softplus to delta + delta_bias.
        backend: as for :func:`selective_scan`.
        delta_proj: optional (K, D, R), VMamba's ``dt_projs_weight``: the step sizes are ``delta @ delta_proj[k].T``,
            which the ``cpu`` and ``triton`` backends compute per step instead of materialising (batch, K, T, D).
        out_dtype: y's dtype, u's by default. The fused kernels compute in fp32 whatever their operands' and
            output's dtypes (both read bf16 operands as they are, the Triton kernels fp16 too; the CPU kernel writes
            a bf16 y itself, rounded once from its fp32 sums).
        scan_dtype: the dtype the other backends scan in: u, delta, B, C and delta_proj cast to it (``out_dtype``
            by default). So ``out_dtype=torch.float32`` is an fp32 scan of bf16 operands on every backend, without
            casting copies on the fused ones, and adding ``scan_dtype=torch.float32`` to ``out_dtype=torch.bfloat16``
            is the same fp32 scan returning bf16 (SS2D's for bf16 inference).
        layer_norm: (weight, bias, eps) of a LayerNorm over the channels of the merged output (SS2D's ``out_norm``;
            weight and bias optional), applied to y. In eager inference on the CPU
            (:func:`qmamba.ops.cpu_fusion.eager_cpu_inference`) the ``cpu`` backend computes it in its kernel from
            the float32 sums, saving a pass over y; everywhere else ``F.layer_norm`` runs after the scan.

    Returns:
        y in ``out_dtype``.
    """
    batch, tokens, dim = u.shape
    k = len(order.directions)
    rank = dim if delta_proj is None else delta_proj.shape[-1]
    if tokens != order.num_tokens or delta.shape != (batch, k, tokens, rank):
        raise ValueError(f"u must be (batch, {order.num_tokens}, D) and delta (batch, {k}, {order.num_tokens}, "
                         f"{'D' if delta_proj is None else 'R'}) for this scan order; got {tuple(u.shape)} and "
                         f"{tuple(delta.shape)}")
    if delta_proj is not None and delta_proj.shape != (k, dim, rank):
        raise ValueError(f"delta_proj must be ({k}, {dim}, R); got {tuple(delta_proj.shape)}")
    if A.shape[0] != k * dim or B.shape[:3] != (batch, k, tokens) or C.shape != B.shape:
        raise ValueError(f"A must be ({k * dim}, N) and B, C (batch, {k}, {tokens}, N); got {tuple(A.shape)}, "
                         f"{tuple(B.shape)}, {tuple(C.shape)}")
    if layer_norm is not None and not merge:
        raise ValueError("layer_norm normalizes the merged output: pass merge=True")
    resolved = resolve_backend(backend, u.device)
    out_dtype = out_dtype or u.dtype
    if resolved in _FUSED:
        kernel, operand, params = _fused(resolved, u)
        A_k = A.to(params).view(k, dim, -1).transpose(1, 2)
        in_kernel = layer_norm is not None and resolved == "cpu" and eager_cpu_inference(u)
        y = kernel(
            operand(u).unsqueeze(1), operand(delta), A_k, operand(B), operand(C), _skip_or_bias(D, (k, dim), A_k),
            _skip_or_bias(delta_bias, (k, dim), A_k), order.table, merge, delta_softplus,
            None if delta_proj is None else delta_proj.to(params).transpose(1, 2), out_dtype,
            **({"layer_norm": layer_norm} if in_kernel else {}),  # the cpu kernel's alone
        )
        y = y.squeeze(1) if merge else y
        return y if layer_norm is None or in_kernel else F.layer_norm(y, (dim,), *layer_norm)
    scan_dtype = scan_dtype or out_dtype
    u, delta, B, C = (x.to(scan_dtype) for x in (u, delta, B, C))
    if delta_proj is not None:
        delta = delta @ delta_proj.to(delta.dtype).transpose(1, 2)  # (batch, K, T, R) @ (K, R, D)
    ys = selective_scan(
        order.scan(u.transpose(1, 2)).reshape(batch, k * dim, order.length),
        order.scan_each(delta.transpose(2, 3)).reshape(batch, k * dim, order.length),
        A, order.scan_each(B.transpose(2, 3)), order.scan_each(C.transpose(2, 3)), D, delta_bias, delta_softplus,
        backend,
    )
    ys = order.unscan(ys.view(batch, k, dim, order.length))  # (batch, K, D, T)
    y = (ys.sum(1).transpose(1, 2) if merge else ys.transpose(2, 3)).to(out_dtype)
    return y if layer_norm is None else F.layer_norm(y, (dim,), *layer_norm)
