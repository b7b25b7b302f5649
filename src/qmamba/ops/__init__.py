"""Sequence operators with optional CUDA kernels and pure-PyTorch fallbacks."""

from qmamba.ops.causal_conv1d import causal_conv1d
from qmamba.ops.linear_scan import linear_scan
from qmamba.ops.selective_scan import (
    ScanBackend,
    cuda_selective_scan_available,
    selective_scan,
    selective_scan_reference,
    selective_scan_torch,
)

__all__ = [
    "ScanBackend",
    "causal_conv1d",
    "cuda_selective_scan_available",
    "linear_scan",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_torch",
]
