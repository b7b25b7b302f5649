"""Trained models made ready to run under bf16 autocast: the weights of matrix products stored in bf16 once.

Autocast casts a weight to bf16 each time a matrix product or a convolution reads it, and keeps the cast only until
its region ends: one batch when scoring, so every batch of a QMamba-T recasts its 28 M weights. Stored in bf16, they
are read as they are, and the results are bit for bit those of autocast, which computes these products from the same
bf16 values. Everything else keeps its dtype: norms, the selective scans' parameters (their kernels compute in fp32),
position embeddings and prompts. For inference only: the model then runs under autocast alone, and an optimiser
would update bf16 weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .ss2d import SS2D

__all__ = ["cast_matmul_weights"]

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
