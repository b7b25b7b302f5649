"""Selective-scan backends vs the sequential-autograd reference, at VMamba-T stage shapes.

    python benchmarks/scan.py                 # CPU: reference + cpu and torch backends (cuda on a GPU)
    python benchmarks/scan.py --device cuda --batches 2 8 32
    python benchmarks/scan.py --reference-batches 2 8   # the reference at batch 8 takes minutes on 2 cores

Prints one table: forward and forward+backward wall time (best of --repeats) per backend and the speed-up of each
backend over the reference measured in the same run. Shapes are (batch, K*D, N, L) with grouped B/C (K = 4), the
four stages of QMamba-T at 224x224.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from qmamba.heap import keep_freed_memory
from qmamba.ops.selective_scan import (
    cpu_selective_scan_available,
    cuda_selective_scan_available,
    selective_scan,
    selective_scan_reference,
    selective_scan_torch,
    triton_selective_scan_available,
)

STAGE_SHAPES = [(768, 1, 3136), (1536, 1, 784), (3072, 1, 196), (6144, 1, 49)]  # QMamba-T's four stages at 224


def make_inputs(batch: int, dim: int, n: int, length: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    groups = 4
    tensors = [
        torch.randn(batch, dim, length, generator=g),  # u
        0.5 * torch.randn(batch, dim, length, generator=g),  # delta (before softplus)
        -(torch.rand(dim, n, generator=g) + 0.5),  # A
        torch.randn(batch, groups, n, length, generator=g),  # B
        torch.randn(batch, groups, n, length, generator=g),  # C
        torch.randn(dim, generator=g),  # D
        torch.randn(dim, generator=g),  # delta_bias
    ]
    low_precision = {0, 1, 3, 4}  # u, delta, B, C follow the activation dtype; A, D, bias stay fp32
    return [
        (t.to(dtype) if i in low_precision else t).to(device).requires_grad_() for i, t in enumerate(tensors)
    ]


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(scan: Callable[..., torch.Tensor], inputs: list[torch.Tensor], device: str, repeats: int
            ) -> tuple[float, float]:
    def forward() -> None:
        with torch.no_grad():
            scan(*inputs, delta_softplus=True)

    def forward_backward() -> None:
        scan(*inputs, delta_softplus=True).float().sum().backward()

    forward()  # warm-up (kernel load, allocator)
    return timed(forward, device, repeats), timed(forward_backward, device, repeats)


def scan_backends(device: str) -> dict[str, Callable[..., torch.Tensor]]:
    """The fused backends available for ``device`` and the torch backend, as functions of the scan's arguments."""
    backends: dict[str, Callable[..., torch.Tensor]] = {}
    if device == "cuda" and cuda_selective_scan_available():
        backends["cuda"] = lambda *a, **k: selective_scan(*a, **k, backend="cuda")
    if device == "cuda" and triton_selective_scan_available():
        backends["triton"] = lambda *a, **k: selective_scan(*a, **k, backend="triton")
    if device == "cpu" and cpu_selective_scan_available():
        backends["cpu"] = lambda *a, **k: selective_scan(*a, **k, backend="cpu")
    backends["torch"] = selective_scan_torch
    return backends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--reference-batches", type=int, nargs="*", default=[2],
                        help="batches at which to run the slow sequential reference")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()  # as the qmamba command's process runs
    dtype = getattr(torch, args.dtype)

    backends = scan_backends(args.device)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    header = (f"{'shape (B, K*D, N, L)':<24} {'backend':<11} {'fwd ms':>10} {'fwd+bwd ms':>11} {'fwd x':>8} "
              f"{'fwd+bwd x':>10}")
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        for dim, n, length in STAGE_SHAPES:
            inputs = make_inputs(batch, dim, n, length, args.device, dtype)
            shape = f"({batch}, {dim}, {n}, {length})"
            ref = None
            if batch in args.reference_batches:
                ref = measure(selective_scan_reference, inputs, args.device, 1)
                print(f"{shape:<24} {'reference':<11} {ref[0] * 1e3:>10.1f} {ref[1] * 1e3:>11.1f} {'1.0':>8} "
                      f"{'1.0':>10}")
            for name, scan in backends.items():
                fwd, fwd_bwd = measure(scan, inputs, args.device, args.repeats)
                speedup = (f"{ref[0] / fwd:>8.1f} {ref[1] / fwd_bwd:>10.1f}" if ref else f"{'-':>8} {'-':>10}")
                print(f"{shape:<24} {name:<11} {fwd * 1e3:>10.1f} {fwd_bwd * 1e3:>11.1f} {speedup}")


if __name__ == "__main__":
    main()
