"""What the fused scan backends (:mod:`qmamba.ops.cpu_scan`, :mod:`qmamba.ops.triton_scan`) share around their
kernels: the autograd Function that saves only the inputs, and the gradients assembled from the kernels' outputs.

A backend gives two functions over the kernels' layout (see :mod:`qmamba.ops.cpu_scan`'s docstring):
``forward(u, delta, proj, A, B, C, D, bias, table, merge, softplus) -> y`` and
``gradients(u, delta, proj, A, B, C, D, bias, table, grad_y, merge, softplus)`` returning the kernels' raw
gradients: u; delta, either as given or, for a low-rank delta, the full step sizes' (batch, K, T, C); proj's partial
sums (partials, K, R, C), or None when the step sizes are returned and the low-rank chain rule is left to torch; A, D
and bias as partial sums (partials, ...); B and C per channel block. ``proj`` is an empty tensor when delta is given
in full.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["fused_scan"]


def _assemble(inputs: tuple[Tensor, ...], raw: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """Autograd's gradients: the low-rank chain rule where the kernel left it, partial sums summed, each in its input's
    dtype."""
    u, delta, proj, A, B, C, D, bias = inputs
    grad_u, grad_delta, grad_proj, grad_A, grad_B, grad_C, grad_D, grad_bias = raw
    if grad_proj is not None:
        grad_proj = grad_proj.sum(0).to(proj.dtype)
    elif proj.numel():  # steps = delta @ proj[k]: (batch, K, T, R) @ (K, R, C)
        grad_steps = grad_delta
        grad_delta = grad_steps @ proj.to(grad_steps.dtype).transpose(1, 2)
        grad_proj = torch.einsum("bktr,bktc->krc", delta.to(grad_steps.dtype), grad_steps).to(proj.dtype)
    return (grad_u.to(u.dtype), grad_delta.to(delta.dtype), grad_proj, grad_A.sum(0).to(A.dtype),
            grad_B.sum(0).to(B.dtype), grad_C.sum(0).to(C.dtype), grad_D.sum(0).to(D.dtype),
            grad_bias.sum(0).to(bias.dtype))


def fused_scan(name: str, forward: Callable[..., Tensor], gradients: Callable[..., tuple[Tensor, ...]]
               ) -> Callable[..., Tensor]:
    """The entry point of a fused backend: ``scan(u, delta, A, B, C, D, bias, table, merge, softplus, delta_proj)``.

    Through autograd (an autograd Function ``name`` that saves only the inputs) when an input needs a gradient;
    otherwise, as under ``no_grad`` / ``inference_mode``, only the forward kernel runs and nothing is saved.
    """

    def function_forward(ctx, u, delta, proj, A, B, C, D, bias, table, merge, softplus):  # noqa: ANN001, ANN202
        ctx.save_for_backward(u, delta, proj, A, B, C, D, bias, table)
        ctx.merge, ctx.softplus = merge, softplus
        return forward(u, delta, proj, A, B, C, D, bias, table, merge, softplus)

    def function_backward(ctx, grad_y):  # noqa: ANN001, ANN202
        *inputs, table = ctx.saved_tensors
        raw = gradients(*inputs, table, grad_y, ctx.merge, ctx.softplus)
        return (*_assemble(tuple(inputs), raw), None, None, None)

    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(function_forward), "backward": staticmethod(function_backward)})

    def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor, table: Tensor,
             merge: bool, softplus: bool, delta_proj: Tensor | None = None) -> Tensor:
        operands = (u, delta, A.new_empty(0, 0, 0) if delta_proj is None else delta_proj, A, B, C, D, bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
            return function.apply(*operands, table, merge, softplus)
        return forward(*operands, table, merge, softplus)

    return scan
