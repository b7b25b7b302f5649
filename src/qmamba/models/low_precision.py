"""Trained models made ready to score under bf16 autocast: the weights of matrix products stored in bf16 once, and
the SS2D scans returning bf16.

Autocast casts a weight to bf16 each time a matrix product or a convolution reads it, and keeps the cast only until
its region ends: one batch when scoring, so every batch of a QMamba-T recasts its 28 M weights. Stored in bf16, they
are read as they are, and the results are bit for bit those of autocast, which computes these products from the same
bf16 values. Everything else keeps its dtype: norms, the selective scans' parameters (their kernels compute in fp32),
position embeddings and prompts.

The scans still compute in fp32. On the CPU, where autocast runs LayerNorm in its input's dtype, they return bf16
(rounded once from the fp32 sums), so that the LayerNorm after each scan reads bf16 and computes its statistics in
fp32 inside the op, where an fp32 output costs that norm twice the memory traffic and the projection after it a cast
copy; the scores move within bf16's rounding (docs/scoring.md, Precision). CUDA's autocast computes LayerNorm in fp32
whatever its input, so on a GPU the scans keep returning fp32 (a bf16 output would only be cast back). For inference
only: the model then runs under autocast alone, and an optimiser would update bf16 weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .ss2d import SS2D

__all__ = ["cast_matmul_weights", "prepare_bf16_inference"]

MATMUL_MODULES = (nn.Linear, nn.Conv2d)  # autocast runs both in its dtype; Vim's conv1d feeds a custom op instead


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store in ``dtype`` (in place) the parameters that only autocast matrix products read: Linear and Conv2d layers
    and SS2D's ``x_proj_weight``. Returns the model."""
    for module in model.modules():
        if isinstance(module, MATMUL_MODULES):
            module.to(dtype)
        elif isinstance(module, SS2D):
            module.x_proj_weight.data = module.x_proj_weight.data.to(dtype)
    return model


def prepare_bf16_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """The model as a bf16 scorer runs it on ``device`` (in place): matrix-product weights in bf16 and, on the CPU,
    SS2D scans returning bf16. Returns the model."""
    if device.type == "cpu":
        for module in model.modules():
            if isinstance(module, SS2D):
                module.scan_out_dtype = torch.bfloat16
    return cast_matmul_weights(model, torch.bfloat16)
