"""What the fused scan backends (:mod:`qmamba.ops.cpu_scan`, :mod:`qmamba.ops.triton_scan`) share around their
kernels: their registration as ``torch.library`` custom ops with an autograd that saves only the inputs, and the
gradients assembled from the kernels' outputs.

A backend gives two functions over the kernels' layout (see :mod:`qmamba.ops.cpu_scan`'s docstring):
``forward(u, delta, proj, A, B, C, D, bias, table, merge, softplus, out_dtype) -> y`` and
``gradients(u, delta, proj, A, B, C, D, bias, table, grad_y, merge, softplus)`` returning the kernels' raw
gradients: u; delta (for a low-rank delta, its rank-R factor's: the kernels apply the projection's chain rule, so
that the full step sizes' gradient is never materialised); proj's partial sums (partials, K, R, C), or None when delta
is given in full (``proj`` is then an empty tensor); A, D and bias as partial sums (partials, ...); B and C per channel
block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["fused_scan"]


def _assemble(inputs: tuple[Tensor, ...], raw: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """Autograd's gradients: partial sums summed, each in its input's dtype."""
    u, delta, proj, A, B, C, D, bias = inputs
    grad_u, grad_delta, grad_proj, grad_A, grad_B, grad_C, grad_D, grad_bias = raw
    if grad_proj is not None:
        grad_proj = grad_proj.sum(0).to(proj.dtype)
    return (grad_u.to(u.dtype), grad_delta.to(delta.dtype), grad_proj, grad_A.sum(0).to(A.dtype),
            grad_B.sum(0).to(B.dtype), grad_C.sum(0).to(C.dtype), grad_D.sum(0).to(D.dtype),
            grad_bias.sum(0).to(bias.dtype))


def fused_scan(name: str, forward: Callable[..., Tensor], gradients: Callable[..., tuple[Tensor | None, ...]],
               normalizes: bool = False) -> Callable[..., Tensor]:
    """The entry point of a fused backend:
    ``scan(u, delta, A, B, C, D, bias, table, merge, softplus, delta_proj, out_dtype, layer_norm)``.

    The kernels are registered as the ``torch.library`` custom ops ``qmamba::<name>`` (forward) and
    ``qmamba::<name>_backward`` (every input's gradient), with fake-tensor implementations, so that
    ``torch.compile(fullgraph=True)`` keeps the fused kernel in its graph and compiles what is around it. The
    registered autograd saves only the inputs; under ``no_grad`` / ``inference_mode`` only the forward kernel runs and
    nothing is saved. The output, of shape (batch, 1 or K, T, C), is in ``out_dtype``: by default the compute dtype,
    A's (fp32, or fp64 for gradcheck); the states and sums are in the compute dtype whatever it is.

    A backend that ``normalizes`` also takes ``forward(..., out_dtype, weight, bias, eps)``: the merged output's
    LayerNorm over its channels (SS2D's ``out_norm``), registered as ``qmamba::<name>_normalized``, for inference
    only (it has no autograd): ``scan(..., layer_norm=(weight, bias, eps))`` with ``merge``.
    """

    @torch.library.custom_op(f"qmamba::{name}", mutates_args=())
    def scan_op(u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor,
                table: Tensor, merge: bool, softplus: bool, out_dtype: torch.dtype) -> Tensor:
        # an event of its own for the profiler: with autograd on, the op's autograd node redispatches to this kernel
        # without one, so a training profile gave the forward kernel's whole time to the node as "self time" of
        # GeneratedBackwardFor_qmamba_<name>_default (11.6 % of a bf16 training step), as if the wrapper cost it
        with torch.profiler.record_function(f"qmamba::{name}_kernel"):
            return forward(u, delta, proj, A, B, C, D, bias, table, merge, softplus, out_dtype)

    @scan_op.register_fake
    def _(u, delta, proj, A, B, C, D, bias, table, merge, softplus, out_dtype):  # noqa: ANN001, ANN202
        batch, _, tokens, channels = u.shape
        return u.new_empty(batch, 1 if merge else delta.shape[1], tokens, channels, dtype=out_dtype)

    @torch.library.custom_op(f"qmamba::{name}_backward", mutates_args=())
    def backward_op(grad_y: Tensor, u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, B: Tensor, C: Tensor,
                    D: Tensor, bias: Tensor, table: Tensor, merge: bool, softplus: bool) -> list[Tensor]:
        inputs = (u, delta, proj, A, B, C, D, bias)
        grads = _assemble(inputs, gradients(*inputs, table, grad_y, merge, softplus))
        # contiguous whatever the inputs' strides, as the fake implementation promises
        return [x.new_zeros(x.shape) if g is None else g.contiguous() for x, g in zip(inputs, grads, strict=True)]

    @backward_op.register_fake
    def _(grad_y, u, delta, proj, A, B, C, D, bias, table, merge, softplus):  # noqa: ANN001, ANN202
        return [x.new_empty(x.shape) for x in (u, delta, proj, A, B, C, D, bias)]

    def setup_context(ctx, inputs, output):  # noqa: ANN001, ANN202
        ctx.save_for_backward(*inputs[:9])
        ctx.merge, ctx.softplus = inputs[9], inputs[10]

    def backward(ctx, grad_y):  # noqa: ANN001, ANN202
        return (*backward_op(grad_y, *ctx.saved_tensors, ctx.merge, ctx.softplus), None, None, None, None)

    scan_op.register_autograd(backward, setup_context=setup_context)

    normalized_op = None
    if normalizes:
        @torch.library.custom_op(f"qmamba::{name}_normalized", mutates_args=())
        def normalized_op(u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                          bias: Tensor, table: Tensor, softplus: bool, out_dtype: torch.dtype, norm_weight: Tensor,
                          norm_bias: Tensor, eps: float) -> Tensor:
            return forward(u, delta, proj, A, B, C, D, bias, table, True, softplus, out_dtype, norm_weight, norm_bias,
                           eps)

        @normalized_op.register_fake
        def _(u, delta, proj, A, B, C, D, bias, table, softplus, out_dtype, norm_weight, norm_bias, eps):  # noqa: ANN001, ANN202
            batch, _, tokens, channels = u.shape
            return u.new_empty(batch, 1, tokens, channels, dtype=out_dtype)

    def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor, table: Tensor,
             merge: bool, softplus: bool, delta_proj: Tensor | None = None, out_dtype: torch.dtype | None = None,
             layer_norm: tuple[Tensor | None, Tensor | None, float] | None = None) -> Tensor:
        proj = A.new_empty(0, 0, 0) if delta_proj is None else delta_proj
        operands = [x if x.is_contiguous() else x.contiguous() for x in (u, delta, proj, A, B, C, D, bias)]
        out_dtype = A.dtype if out_dtype is None else out_dtype
        if layer_norm is None:
            return scan_op(*operands, table, merge, softplus, out_dtype)
        if normalized_op is None or not merge:
            raise ValueError(f"qmamba::{name} normalizes no output" if normalized_op is None else
                             "layer_norm normalizes the merged output: pass merge=True")
        weight, shift, eps = layer_norm
        channels = u.shape[-1]
        return normalized_op(*operands, table, softplus, out_dtype, A.new_ones(channels) if weight is None else weight,
                             A.new_zeros(channels) if shift is None else shift, eps)

    # for torch.library.opcheck and tests
    scan.op, scan.backward_op, scan.normalized_op = scan_op, backward_op, normalized_op
    return scan
