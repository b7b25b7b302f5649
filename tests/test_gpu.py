"""CUDA kernels against the pure-PyTorch paths (run on a GPU machine: benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from qmamba.models import build_model
from qmamba.ops import causal_conv1d, cuda_selective_scan_available, ordered_selective_scan, selective_scan
from qmamba.ops.causal_conv1d import causal_conv1d_available
from qmamba.ops.scan_order import scan_order
from qmamba.ops.selective_scan import triton_selective_scan_available

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


FUSED = [
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda_selective_scan_available(), reason="mamba-ssm kernel not "
                                                                                                 "installed")),
    pytest.param("triton", marks=pytest.mark.skipif(not triton_selective_scan_available(), reason="no triton")),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n,groups", [(1, 4), (16, 1)])
def test_fused_scan_matches_torch_scan(backend, dtype, tol, n, groups):
    g = torch.Generator(device="cuda").manual_seed(0)
    batch, dim, length = 2, 64, 300
    u = torch.randn(batch, dim, length, device="cuda", generator=g).to(dtype).requires_grad_()
    delta = (0.5 * torch.randn(batch, dim, length, device="cuda", generator=g)).to(dtype).requires_grad_()
    A = (-torch.rand(dim, n, device="cuda", generator=g) - 0.5).requires_grad_()
    B = torch.randn(batch, groups, n, length, device="cuda", generator=g).to(dtype).requires_grad_()
    C = torch.randn(batch, groups, n, length, device="cuda", generator=g).to(dtype).requires_grad_()
    D = torch.randn(dim, device="cuda", generator=g).requires_grad_()
    bias = torch.randn(dim, device="cuda", generator=g).requires_grad_()
    inputs = (u, delta, A, B, C, D, bias)
    outs = {}
    for name in (backend, "torch"):
        y = selective_scan(*inputs, delta_softplus=True, backend=name)
        assert y.dtype == dtype
        outs[name] = (y, torch.autograd.grad(y.float().sum(), inputs))
    assert _rel(outs[backend][0], outs["torch"][0]) < tol
    for g_fused, g_torch in zip(outs[backend][1], outs["torch"][1], strict=True):
        assert _rel(g_fused, g_torch) < tol * 10


@pytest.mark.skipif(not triton_selective_scan_available(), reason="no triton")
@pytest.mark.parametrize("directions", [("h", "v", "h_flip", "v_flip"), ("w7", "w7c", "w7_flip", "w7c_flip")])
def test_triton_ordered_scan_matches_torch_on_a_padded_map(directions):
    g = torch.Generator(device="cuda").manual_seed(0)
    batch, height, width, dim, rank = 2, 10, 13, 96, 6
    k, tokens = len(directions), height * width
    inputs = [
        torch.randn(batch, tokens, dim, device="cuda", generator=g),
        torch.randn(batch, k, tokens, rank, device="cuda", generator=g),
        -torch.rand(k * dim, 1, device="cuda", generator=g) - 0.5,
        torch.randn(batch, k, tokens, 1, device="cuda", generator=g),
        torch.randn(batch, k, tokens, 1, device="cuda", generator=g),
        torch.randn(k * dim, device="cuda", generator=g),
        torch.randn(k * dim, device="cuda", generator=g),
        torch.randn(k, dim, rank, device="cuda", generator=g) / rank,
    ]
    inputs = [t.requires_grad_() for t in inputs]
    order = scan_order(directions, height, width)
    outs = {}
    for name in ("triton", "torch"):
        y = ordered_selective_scan(*inputs[:7], order, backend=name, delta_proj=inputs[7])
        outs[name] = (y, torch.autograd.grad(y.sum(), inputs))
    assert _rel(outs["triton"][0], outs["torch"][0]) < 1e-5
    for g_triton, g_torch in zip(outs["triton"][1], outs["torch"][1], strict=True):
        assert _rel(g_triton, g_torch) < 1e-4


@pytest.mark.skipif(not causal_conv1d_available(), reason="causal-conv1d kernel not installed")
def test_cuda_causal_conv_matches_torch():
    x, w, b = torch.randn(2, 64, 100, device="cuda"), torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
    y_cuda = causal_conv1d(x, w, b, activation="silu", backend="cuda")
    y_torch = causal_conv1d(x, w, b, activation="silu", backend="torch")
    assert _rel(y_cuda, y_torch) < 1e-5


def test_models_run_on_cuda_with_auto_backend():
    for name in ("qmamba_test", "lqmamba_test", "vim_test"):
        model = build_model(name).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            scores = model(torch.randn(2, 3, 64, 64, device="cuda"))
        scores.float().sum().backward()
        assert scores.shape == (2,) and torch.isfinite(scores).all()
