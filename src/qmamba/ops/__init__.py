"""Sequence operators with optional CUDA kernels and pure-PyTorch fallbacks."""

from qmamba.ops.causal_conv1d import causal_conv1d
from qmamba.ops.linear_scan import linear_scan
from qmamba.ops.selective_scan import (
    ScanBackend,
    cpu_selective_scan_available,
    cuda_selective_scan_available,
    ordered_selective_scan,
    selective_scan,
    selective_scan_reference,
    selective_scan_torch,
)

__all__ = [
    "ScanBackend",
    "causal_conv1d",
    "cpu_selective_scan_available",
    "cuda_selective_scan_available",
    "linear_scan",
    "ordered_selective_scan",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_torch",
]
