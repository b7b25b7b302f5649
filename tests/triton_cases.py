"""The Triton selective scan, run on CPU tensors by Triton's interpreter: every scan order, N = 1 and N > 1,
grouped / single / constant B and C, full and low-rank step sizes, forward and every gradient against the
sequential reference (1e-5 relative, fp32).

Triton reads TRITON_INTERPRET when it is imported, so these cases run in a subprocess with the variable set,
started by ``test_triton_scan.py``; the file's name keeps pytest from collecting it in the main process.
"""

from __future__ import annotations

import os

import pytest
import torch
from scan_cases import ORDERS, check_gradients, check_ordered_scan, ordered_inputs

from qmamba.ops import ordered_selective_scan, selective_scan, selective_scan_reference
from qmamba.ops.scan_order import CROSS_2D, ScanOrder
from qmamba.ops.selective_scan import resolve_backend

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton cases run under TRITON_INTERPRET=1 (tests/test_triton_scan.py starts them)",
                allow_module_level=True)


# The interpreter runs a few thousand kernel steps a second: a covering set of cases rather than the full product.
ORDERED_CASES = [  # (scan order, N, merge, rank of delta, batch, channels)
    (ORDERS[0], 1, True, None, 2, 40),  # cross-scan, two batch rows, two channel blocks (one partial)
    (ORDERS[0], 3, True, 3, 1, 20),
    (ORDERS[1], 1, True, None, 1, 20),  # L = 1
    (ORDERS[2], 1, False, 3, 1, 20),  # LQMamba windows with padding steps, one output per direction
    (ORDERS[2], 3, True, None, 1, 20),
    (ORDERS[3], 2, False, None, 1, 20),  # mixed orders
    (ORDERS[4], 1, True, 3, 1, 20),  # Vim's two directions
]


@pytest.mark.parametrize("order_case,n,merge,rank,batch,dim", ORDERED_CASES,
                         ids=[f"{c[0].id}-N{c[1]}-{'merged' if c[2] else 'each'}-{'rank' if c[3] else 'full'}"
                              for c in ORDERED_CASES])
def test_ordered_triton_scan_matches_sequential_reference(order_case, n, merge, rank, batch, dim):
    check_ordered_scan("triton", ScanOrder(*order_case.values), batch, dim, n, merge, rank)


@pytest.mark.parametrize("bc_form,n,length,softplus", [("grouped:4", 1, 23, True), ("grouped:2", 3, 23, False),
                                                       ("single", 4, 23, True), ("constant", 2, 23, False),
                                                       ("single", 1, 300, True)])  # a long sequence
def test_1d_triton_scan_matches_sequential_reference(bc_form, n, length, softplus):
    g = torch.Generator().manual_seed(0)
    batch, dim = (2, 8) if length < 100 else (1, 4)
    if bc_form.startswith("grouped"):
        groups = int(bc_form.split(":")[1])
        B, C = torch.randn(batch, groups, n, length, generator=g), torch.randn(batch, groups, n, length, generator=g)
    elif bc_form == "single":
        B, C = torch.randn(batch, n, length, generator=g), torch.randn(batch, n, length, generator=g)
    else:
        B, C = torch.randn(dim, n, generator=g), torch.randn(dim, n, generator=g)
    u, delta = torch.randn(batch, dim, length, generator=g), 0.5 * torch.rand(batch, dim, length, generator=g)
    A, D, bias = -(torch.rand(dim, n, generator=g) + 0.1), torch.randn(dim, generator=g), torch.rand(dim, generator=g)
    args = [t.requires_grad_() for t in (u, delta, A, B, C, D, bias)]
    y = selective_scan(*args, delta_softplus=softplus, backend="triton")
    check_gradients(y, selective_scan_reference(*args, delta_softplus=softplus), args,
                     "u delta A B C D delta_bias".split())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_fp32_states(dtype):
    order = ScanOrder(CROSS_2D, 4, 5)
    args = [t.detach() for t in ordered_inputs(1, 4, 20, 16, 1)]
    half = [t.to(dtype) if i in (0, 1, 3, 4) else t for i, t in enumerate(args)]  # u, delta, B, C
    y = ordered_selective_scan(*half, order, backend="triton")
    assert y.dtype == dtype
    y32 = ordered_selective_scan(*[t.float() for t in half], order, backend="triton")
    assert torch.equal(y, y32.to(dtype))  # the inputs' rounding only: the scan itself ran in fp32


def test_backend_resolution_under_the_interpreter():
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) != "triton"  # auto keeps CPU tensors on the CPU kernel
