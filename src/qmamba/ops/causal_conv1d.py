"""Depthwise causal 1-D convolution (the Vim / Mamba block's local mixer) with per-call backend dispatch.

``cuda``: causal-conv1d's fused kernel, imported lazily (it cannot be imported without its compiled extension).
``torch``: the same math as a left-padded depthwise ``conv1d``; runs on any device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from qmamba.ops.selective_scan import ScanBackend, load_once, validate_backend

__all__ = ["causal_conv1d", "causal_conv1d_available", "causal_conv1d_torch"]

log = logging.getLogger(__name__)


@load_once
def _load_cuda_kernel() -> Callable[..., Tensor] | None:
    try:
        import causal_conv1d_cuda  # noqa: F401  (the compiled extension)
        from causal_conv1d import causal_conv1d_fn
    except Exception as err:
        log.debug("causal-conv1d unavailable: %s", err)
        return None
    return causal_conv1d_fn


def causal_conv1d_available() -> bool:
    """True when the causal-conv1d CUDA extension can be imported."""
    return _load_cuda_kernel() is not None


def causal_conv1d_torch(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: Literal["silu"] | None = None
) -> Tensor:
    """Pure-PyTorch depthwise causal conv: x (batch, dim, L), weight (dim, width), bias (dim,)."""
    width = weight.shape[-1]
    y = F.conv1d(F.pad(x.to(weight.dtype), (width - 1, 0)), weight.unsqueeze(1), bias, groups=weight.shape[0])
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: Literal["silu"] | None = None,
    backend: ScanBackend = "auto",
) -> Tensor:
    """Depthwise causal convolution of x (batch, dim, L) with weight (dim, width), optional SiLU.

    The CUDA kernel supports widths 2-4; other widths and non-CUDA tensors use the PyTorch path under ``auto``.
    """
    validate_backend(backend)
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    use_cuda = x.is_cuda and 2 <= weight.shape[-1] <= 4 and causal_conv1d_available()
    if backend == "cuda" and not use_cuda:
        raise RuntimeError(
            "causal-conv1d backend 'cuda' needs CUDA tensors, a kernel width of 2-4 and the causal_conv1d_cuda "
            "extension (`CAUSAL_CONV1D_FORCE_BUILD=TRUE pip install --no-build-isolation causal-conv1d==1.7.0`)."
        )
    if use_cuda and backend != "torch":
        kernel = _load_cuda_kernel()
        assert kernel is not None
        return kernel(x if x.stride(-1) == 1 else x.contiguous(), weight.contiguous(), bias, activation=activation)
    return causal_conv1d_torch(x, weight, bias, activation)
