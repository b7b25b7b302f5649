"""The Triton selective scan, run on CPU tensors by Triton's interpreter: every scan order, N = 1 and N > 1,
grouped / single / constant B and C, full and low-rank step sizes, forward and every gradient against the
sequential reference (1e-5 relative, fp32), with the default chunk and with chunks of 8 steps so that short test
sequences cross chunk boundaries (L not a multiple of the chunk, L shorter than one chunk, L = 1); bf16 operands;
bit-identical reruns.

Triton reads TRITON_INTERPRET when it is imported, so these cases run in a subprocess with the variable set,
started by ``test_triton_scan.py``; the file's name keeps pytest from collecting it in the main process.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scan_cases import (
    ORDERS,
    check_gradients,
    check_ordered_scan,
    kernel_args,
    ordered_inputs,
    ordered_reference,
    rel_err,
)

from qmamba.ops import ordered_selective_scan, selective_scan, selective_scan_reference, triton_scan
from qmamba.ops.scan_order import CROSS_2D, ScanOrder
from qmamba.ops.selective_scan import resolve_backend

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton cases run under TRITON_INTERPRET=1 (tests/test_triton_scan.py starts them)",
                allow_module_level=True)


from triton.language import core as tl_core  # noqa: E402 (after the skip: triton reads TRITON_INTERPRET once)
from triton.runtime import interpreter  # noqa: E402

ELEMENT_BY_ELEMENT = interpreter.ScanOps.generic_scan


def _scan_by_rows(self, inputs):  # noqa: ANN001, ANN202 - the interpreter's ScanOps and tensors
    """``tl.associative_scan`` with a combine function of one's own, as Triton's interpreter computes it (the same
    left-to-right combinations, each stored in the input's dtype and read back), a row of the tile at a time: the
    interpreter's own loop calls the combine function once per element and took 95 % of these cases' time."""
    data = [x.handle.data for x in inputs]
    out = [np.empty_like(d) for d in data]

    def row(i: int) -> tuple:
        return (slice(None),) * self.axis + (slice(i, i + 1),)

    for o, d in zip(out, data, strict=True):
        o[row(0)] = d[row(0)]
    for i in range(1, data[0].shape[self.axis]):
        combined = self.combine_fn.fn(*(self.to_tensor(o[row(i - 1)], x.dtype) for o, x in zip(out, inputs)),
                                      *(self.to_tensor(d[row(i)], x.dtype) for d, x in zip(data, inputs)))
        for o, value in zip(out, combined if isinstance(combined, tuple) else (combined,), strict=True):
            o[row(i)] = value.handle.data if isinstance(value, tl_core.tensor) else value
    return [self.to_tensor(o, x.dtype) for o, x in zip(out, inputs)]


@pytest.fixture(autouse=True)
def scans_by_rows(monkeypatch):
    monkeypatch.setattr(interpreter.ScanOps, "generic_scan", _scan_by_rows)


def test_scans_by_rows_give_the_interpreters_own_results_bit_for_bit(monkeypatch):
    """Both combine functions (the forward recurrence, the reverse adjoint of the backward), chunks crossed: the
    output and every gradient equal those of Triton's element-by-element scan."""
    monkeypatch.setattr(triton_scan, "TILE", triton_scan.Tile(chunk=8))
    order = ScanOrder(("w3", "w3c_flip"), 4, 5)  # padded windows: 20 tokens, 24 steps in 3 chunks
    runs = []
    for scan in (_scan_by_rows, ELEMENT_BY_ELEMENT):
        monkeypatch.setattr(interpreter.ScanOps, "generic_scan", scan)
        args = ordered_inputs(1, 2, 20, 4, 2)
        y = ordered_selective_scan(*args, order, merge=True, backend="triton")
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        runs.append((y, *torch.autograd.grad(y, args, grad_y)))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.fixture
def short_chunks(monkeypatch):
    monkeypatch.setattr(triton_scan, "TILE", triton_scan.Tile(chunk=8))


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


# Every case with chunks of 8 steps, which the test maps' 1 to 35 steps cross; the default chunk (one chunk for
# these maps, the path the 1-D cases of 23 steps take too) on the first two.
ORDERED_RUNS = [(*case, 8) for case in ORDERED_CASES] + [(*case, triton_scan.TILE.chunk) for case in ORDERED_CASES[:2]]


@pytest.mark.parametrize("order_case,n,merge,rank,batch,dim,chunk", ORDERED_RUNS,
                         ids=[f"chunk{c[6]}-{c[0].id}-N{c[1]}-{'merged' if c[2] else 'each'}-"
                              f"{'rank' if c[3] else 'full'}" for c in ORDERED_RUNS])
def test_ordered_triton_scan_matches_sequential_reference(order_case, n, merge, rank, batch, dim, chunk, monkeypatch):
    monkeypatch.setattr(triton_scan, "TILE", triton_scan.Tile(chunk=chunk))
    check_ordered_scan("triton", ScanOrder(*order_case.values), batch, dim, n, merge, rank)


@pytest.mark.parametrize("bc_form,n,length,softplus", [("grouped:4", 1, 23, True), ("grouped:2", 3, 23, False),
                                                       ("single", 4, 23, True), ("constant", 2, 23, False),
                                                       ("single", 1, 300, True)])  # 5 chunks of 64
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
    # SS2D's scan_fp32: the half operands read as they are, the fp32 result kept
    assert torch.equal(ordered_selective_scan(*half, order, backend="triton", out_dtype=torch.float32), y32)


def test_bf16_gradients_are_as_close_as_the_inputs_rounding_allows(short_chunks):
    """bf16 u, delta, B, C read as they are: the output and every gradient match the fp32 reference run on the same
    (rounded) values to fp32 accuracy, so the scan adds no bf16 error of its own."""
    order = ScanOrder(("w3", "w3c_flip"), 5, 7)
    args = [t.detach() for t in ordered_inputs(1, 2, 35, 20, 1)]
    args = [(t.to(torch.bfloat16) if i in (0, 1, 3, 4) else t).requires_grad_() for i, t in enumerate(args)]
    y = ordered_selective_scan(*args, order, merge=True, backend="triton")
    exact = [t.detach().float().requires_grad_() for t in args]
    y_ref = ordered_reference(*exact, order, True, True)
    assert rel_err(y.float(), y_ref) < 1e-2  # the output is cast back to bf16
    grad_out = torch.randn_like(y_ref).to(torch.bfloat16).float()  # what reaches the kernel through the casts
    grads = torch.autograd.grad(y.float(), args, grad_out)
    grads_ref = torch.autograd.grad(y_ref, exact, grad_out)
    for name, g, g_ref in zip("u delta A B C D delta_bias".split(), grads, grads_ref, strict=True):
        half = name in ("u", "delta", "B", "C")  # their gradients come back in bf16: one rounding
        assert g.dtype == (torch.bfloat16 if half else torch.float32), name
        assert rel_err(g.float(), g_ref) < (1e-2 if half else 1e-5), name


def test_reruns_are_bit_identical(short_chunks):
    """No atomics: the same inputs give the same output and gradients, bit for bit."""
    order = ScanOrder(CROSS_2D, 5, 7)
    runs = []
    for _ in range(2):
        args = ordered_inputs(1, 4, 35, 20, 1)
        y = ordered_selective_scan(*args, order, backend="triton")
        runs.append((y, *torch.autograd.grad(y, args, torch.ones_like(y))))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_backend_resolution_under_the_interpreter():
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) != "triton"  # auto keeps CPU tensors on the CPU kernel


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_scan_custom_ops_pass_opcheck(short_chunks, out_dtype):
    """bf16: the output cast from the fp32 sums, and its bf16 gradient read by the backward kernels as fp32."""
    from qmamba.ops.triton_scan import _scan

    args = kernel_args(ScanOrder(("w3", "w3c_flip"), 4, 5), 1, 8, 1, True, None, out_dtype)  # padded windows
    torch.library.opcheck(_scan.op, args)
    grad_y = torch.randn_like(_scan.op(*args))
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1]]  # the backward is not differentiable
    torch.library.opcheck(_scan.backward_op, (grad_y, *plain))
