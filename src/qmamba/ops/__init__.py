"""The selective scan on every device (numba on CPUs, Triton and mamba-ssm on GPUs, pure PyTorch everywhere), scan
orders as index tables, the causal 1-D convolution, and oneDNN's fused matrix-product epilogues for CPU inference
(:mod:`qmamba.ops.cpu_fusion`). Imports nothing of qmamba but :mod:`qmamba.errors`."""

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
