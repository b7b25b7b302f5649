"""Matrix products and convolutions with what follows them (bias, activation, residual sum) in one oneDNN call, for
inference on the CPU.

Run one op at a time, a ``Linear`` with a bias first copies the bias into every row of its output and then adds the
product to it, the activation after it reads and writes the whole output again, and so does the residual sum. On a
QMamba-T these passes over its largest maps (stage 0's MLP: 8 x 56 x 56 x 384 floats a batch of 8) cost more than
their arithmetic; oneDNN applies them to each block of the product while it is still in the cache (its "post-ops").
:func:`linear` and :func:`conv2d` compute ``residual + act(layer(x))`` that way wherever it gives the same function,
and as the separate torch ops everywhere else:

* on the CPU, with oneDNN available and enabled (``torch.backends.mkldnn``), in fp32 or bf16 (bf16 autocast included,
  whose casts they make, where oneDNN computes bf16 natively);
* without autograd (``no_grad`` / ``inference_mode``): the fused ops have no backward, so training runs the torch
  ops, bit for bit as before;
* for plain ``nn.Linear`` / ``nn.Conv2d`` layers without forward hooks, and a ``GELU``, ``SiLU`` or no activation;
* outside ``torch.compile`` / ``torch.export`` and TorchScript (which see the torch ops and fuse on their own), and
  outside ``torch.func`` transforms (``vmap``: the fused ops have no batching rule) and any ``TorchDispatchMode``
  (FLOP counters, fake tensors), which should see the ops a model is written with.

The fused result equals the separate ops' to rounding: oneDNN's GELU and SiLU round differently in the last bit
(fp32), and in bf16 the activation reads the product before its rounding to bf16 instead of after.

:func:`eager_cpu_inference` and :func:`hooked` say where any such fusion may run; the CPU scan uses them to compute
SS2D's output LayerNorm in its kernel (:func:`qmamba.ops.ordered_selective_scan`'s ``layer_norm``), and
:func:`eager_cpu` where a layer may run other ops for the same function with autograd on.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["conv2d", "eager_cpu", "eager_cpu_inference", "fused_dtype", "hooked", "linear"]


def linear(x: Tensor, layer: nn.Linear, act: nn.Module | None = None, residual: Tensor | None = None) -> Tensor:
    """``residual + act(layer(x))`` (``act`` and ``residual`` optional), fused where :func:`fused_dtype` allows."""
    post_op = _post_op(act)
    dtype = fused_dtype(x, layer) if post_op is not None else None
    if dtype is None:
        y = layer(x) if act is None else act(layer(x))
        return y if residual is None else residual + y
    weight, bias = layer.weight.to(dtype), None if layer.bias is None else layer.bias.to(dtype)
    if residual is not None and post_op[0] == "none" and residual.dtype == dtype and residual.is_contiguous() and \
            residual.shape == (*x.shape[:-1], layer.out_features):
        return torch.ops.mkldnn._linear_pointwise.binary(x.to(dtype), residual, weight, bias, "add")
    y = torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, *post_op)
    return y if residual is None else residual + y


def conv2d(x: Tensor, conv: nn.Conv2d, act: nn.Module | None = None) -> Tensor:
    """``act(conv(x))``, fused where :func:`fused_dtype` allows (zero padding given as numbers)."""
    post_op = _post_op(act)
    if post_op is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str) or \
            (dtype := fused_dtype(x, conv)) is None:
        return conv(x) if act is None else act(conv(x))
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return torch.ops.mkldnn._convolution_pointwise(x.to(dtype), conv.weight.to(dtype), bias, conv.padding,
                                                   conv.stride, conv.dilation, conv.groups, *post_op)


def eager_cpu(x: Tensor) -> bool:
    """Whether ``x`` is computed on the CPU in eager mode, with nothing observing the ops (not compiling, exporting,
    scripting or tracing, no dispatch mode, no functorch transform): where other ops may compute what a model's are
    written to compute, autograd included (:class:`qmamba.models.layers.PatchwiseConv2d`)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_scripting() and \
        not torch.jit.is_tracing() and _get_current_dispatch_mode() is None and \
        torch._C._functorch.peek_interpreter_stack() is None


def eager_cpu_inference(x: Tensor) -> bool:
    """Whether ``x`` is computed without autograd in :func:`eager_cpu` execution: where a fused op, which has no
    backward, may stand in for the ops a model is written with."""
    return not torch.is_grad_enabled() and eager_cpu(x)


def hooked(module: nn.Module) -> bool:
    """Whether a forward hook (the module's own or a global one) would see ``module`` run."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module_hooks._global_forward_hooks or
                module_hooks._global_forward_pre_hooks)


def fused_dtype(x: Tensor, layer: nn.Module) -> torch.dtype | None:
    """The dtype oneDNN would compute ``layer(x)`` in, or None where the fused ops cannot stand in for torch's (see
    the module docstring)."""
    if type(layer) not in (nn.Linear, nn.Conv2d) or hooked(layer) or not eager_cpu_inference(x) or \
            not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    elif x.dtype == layer.weight.dtype and (layer.bias is None or layer.bias.dtype == x.dtype):
        dtype = x.dtype
    else:  # torch's op says what is wrong
        return None
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _native_bf16()):
        return dtype
    return None


def _post_op(act: nn.Module | None) -> tuple[str, list[float], str | None] | None:
    """oneDNN's name, scalars and algorithm for ``act``; None for an activation it does not fuse."""
    if act is None or type(act) is nn.Identity:
        return "none", [], None
    if type(act) is nn.GELU:
        return "gelu", [], act.approximate
    if type(act) is nn.SiLU:
        return "swish", [], None
    return None


@functools.cache
def _native_bf16() -> bool:
    """Whether oneDNN computes bf16 here (AVX-512 BW/VL/DQ or newer); elsewhere torch's own bf16 path runs."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
