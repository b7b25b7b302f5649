"""Selective scan, linear scan, causal conv and scan orders against plain reference implementations."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
from scan_cases import low_rank, ordered_inputs

from qmamba.ops import (
    causal_conv1d,
    linear_scan,
    ordered_selective_scan,
    selective_scan,
    selective_scan_reference,
    selective_scan_torch,
)
from qmamba.ops.causal_conv1d import causal_conv1d_torch
from qmamba.ops.linear_scan import linear_scan_reference
from qmamba.ops.scan_order import ScanOrder, direction_positions
from qmamba.ops.selective_scan import resolve_backend

BACKENDS = ["torch", "cpu"]  # every backend that runs on CPU tensors


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _scan_inputs(batch, dim, n, length, bc_form, seed=0):
    """Random selective-scan inputs; bc_form is 'grouped:<G>', 'single' (batch, N, L) or 'constant' (dim, N).

    delta is positive so that the recurrence decays with or without the softplus.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=g)
    delta = 0.5 * torch.rand(batch, dim, length, generator=g)
    A = -(torch.rand(dim, n, generator=g) + 0.1)
    if bc_form.startswith("grouped"):
        groups = int(bc_form.split(":")[1])
        B = torch.randn(batch, groups, n, length, generator=g)
        C = torch.randn(batch, groups, n, length, generator=g)
    elif bc_form == "single":
        B, C = torch.randn(batch, n, length, generator=g), torch.randn(batch, n, length, generator=g)
    else:
        B, C = torch.randn(dim, n, generator=g), torch.randn(dim, n, generator=g)
    D = torch.randn(dim, generator=g)
    bias = 0.5 * torch.rand(dim, generator=g)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, bias)]


@pytest.mark.parametrize(
    "batch,dim,n,length,bc_form",
    [
        (2, 8, 1, 37, "grouped:4"),  # VMamba layout, L prime
        (2, 16, 1, 196, "grouped:4"),  # L = 14 * 14
        (1, 12, 3, 64, "grouped:2"),  # N > 1, power-of-two L
        (2, 6, 4, 50, "single"),  # Mamba / Vim layout
        (2, 6, 2, 23, "constant"),
        (3, 4, 1, 1, "grouped:1"),  # a single step
        (1, 4, 2, 2, "single"),
    ],
)
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_backends_match_sequential_reference(batch, dim, n, length, bc_form, softplus, backend):
    args = _scan_inputs(batch, dim, n, length, bc_form)
    y = selective_scan(*args, delta_softplus=softplus, backend=backend)
    y_ref = selective_scan_reference(*args, delta_softplus=softplus)
    assert y.shape == (batch, dim, length)
    assert _rel_err(y, y_ref) < 1e-5
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, args, grad_out)
    grads_ref = torch.autograd.grad(y_ref, args, grad_out)
    for name, g, g_ref in zip("u delta A B C D delta_bias".split(), grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape, name
        assert _rel_err(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_arguments_default_to_none(backend):
    u, delta, A, B, C, _, _ = _scan_inputs(2, 8, 1, 20, "grouped:2")
    y = selective_scan(u, delta, A, B, C, backend=backend)  # no D, no bias, no softplus
    assert torch.allclose(y, selective_scan_reference(u, delta, A, B, C), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_keeps_input_dtype_and_computes_in_fp32(backend):
    args = _scan_inputs(2, 8, 1, 30, "grouped:4")
    u16, delta16 = args[0].detach().bfloat16(), args[1].detach().bfloat16()
    rest = [a.detach() for a in args[2:]]
    y = selective_scan(u16, delta16, *rest[:3], rest[3], rest[4], True, backend=backend)
    assert y.dtype == torch.bfloat16
    y32 = selective_scan(u16.float(), delta16.float(), *rest[:3], rest[3], rest[4], True, backend=backend)
    assert torch.equal(y, y32.bfloat16())  # fp32 inside: the only rounding is the final cast


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_scan_of_bf16_operands_equals_the_scan_of_their_fp32_copies(backend):
    """SS2D's scan_fp32 under bf16 autocast: out_dtype=float32 scans bf16 operands as if upcast first."""
    order = ScanOrder(("h", "v", "w2", "w2_flip"), 4, 5)
    args, proj = low_rank([t.detach() for t in ordered_inputs(2, 4, 20, 16, 1)], 3)
    half = [t.detach().bfloat16() if i in (0, 1, 3, 4) else t for i, t in enumerate(args)]  # u, delta, B, C
    half = [t.requires_grad_() for t in half]
    y = ordered_selective_scan(*half, order, backend=backend, delta_proj=proj.detach(), out_dtype=torch.float32)
    assert y.dtype == torch.float32
    y_ref = ordered_selective_scan(*[t.detach().float() for t in half], order, backend=backend,
                                   delta_proj=proj.detach())
    assert torch.equal(y, y_ref)
    grads = torch.autograd.grad(y.sum(), half)
    assert [g.dtype for g in grads] == [t.dtype for t in half]


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_is_stable(backend):
    """Strong decay over 20k steps: cumulative products underflow; a division-based scan would blow up."""
    batch, dim, length = 1, 4, 20_000
    u = torch.randn(batch, dim, length)
    delta = torch.full((batch, dim, length), 5.0)
    A = -torch.full((dim, 1), 8.0)
    B, C = torch.randn(batch, 1, 1, length), torch.randn(batch, 1, 1, length)
    with torch.no_grad():
        y = selective_scan(u, delta, A, B, C, backend=backend)
        y_ref = selective_scan_reference(u, delta, A, B, C)
    assert torch.isfinite(y).all()
    assert _rel_err(y, y_ref) < 1e-5


@pytest.mark.parametrize("length", [1, 2, 7, 64, 101])
def test_linear_scan_broadcasts_and_matches_loop(length):
    a = torch.rand(3, 1, length, requires_grad=True)  # broadcast over the middle axis
    b = torch.randn(3, 5, length, requires_grad=True)
    h, h_ref = linear_scan(a, b), linear_scan_reference(a, b)
    assert torch.allclose(h, h_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(h)
    for x, y in zip(torch.autograd.grad(h, (a, b), g), torch.autograd.grad(h_ref, (a, b), g), strict=True):
        assert x.shape == y.shape
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-5)


def test_linear_scan_gradcheck_double():
    a = (0.3 + 0.6 * torch.rand(2, 3, 11, dtype=torch.float64)).requires_grad_()
    b = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (a, b))


def test_backend_selection_errors_are_clear():
    with pytest.raises(ValueError, match="scan backend must be one of"):
        resolve_backend("numpy", torch.device("cpu"))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        resolve_backend("cpu", torch.device("cuda"))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="backend 'triton'.*runs on CUDA tensors"):
            resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    args = [a.detach() for a in _scan_inputs(1, 4, 1, 5, "grouped:1")]
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        selective_scan(*args, backend="cuda")


@pytest.mark.slow
def test_auto_backend_never_imports_mamba_ssm_on_cpu():
    code = (
        "import sys, torch; from qmamba.models import build_model; "
        "m = build_model('qmamba_test'); m(torch.randn(1, 3, 32, 32)).sum().backward(); "
        "bad = [k for k in sys.modules if k.split('.')[0] in ('mamba_ssm', 'selective_scan_cuda', 'causal_conv1d')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _causal_conv_loop(x, weight, bias):
    width = weight.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[-1]):
        for k in range(width):
            src = t - (width - 1) + k
            if src >= 0:
                out[..., t] += weight[:, k] * x[..., src]
    return torch.nn.functional.silu(out + bias[:, None])


@pytest.mark.parametrize("width", [2, 4, 5])
def test_causal_conv1d_torch_matches_loop(width):
    x, weight, bias = torch.randn(2, 6, 13), torch.randn(6, width), torch.randn(6)
    y = causal_conv1d(x, weight, bias, activation="silu")
    assert torch.allclose(y, _causal_conv_loop(x, weight, bias), atol=1e-5)
    assert torch.allclose(causal_conv1d_torch(x, weight, bias, "silu"), y)
    with pytest.raises(RuntimeError, match="causal-conv1d backend 'cuda'"):
        causal_conv1d(x, weight, bias, backend="cuda")


# ----------------------------------------------------------------------------------------------------- scan orders
def test_cross_scan_directions_match_vmamba():
    height, width = 3, 5  # H != W catches transposition mistakes
    grid = torch.arange(height * width).view(height, width)
    assert direction_positions("h", height, width).tolist() == grid.flatten().tolist()
    assert direction_positions("v", height, width).tolist() == grid.t().flatten().tolist()
    assert direction_positions("h_flip", height, width).tolist() == grid.flatten().flip(0).tolist()
    assert direction_positions("v_flip", height, width).tolist() == grid.t().flatten().flip(0).tolist()


@pytest.mark.parametrize("k,column_first", [(2, False), (3, False), (2, True), (4, True)])
def test_window_scan_follows_localmamba_formula(k, column_first):
    height, width = 5, 7
    hp, wp = -(-height // k) * k, -(-width // k) * k
    seq = direction_positions(f"w{k}{'c' if column_first else ''}", height, width)
    assert len(seq) == hp * wp
    for i in range(height):
        for j in range(width):
            if column_first:
                p = ((j // k) * (hp // k) + i // k) * k * k + (j % k) * k + (i % k)
            else:
                p = ((i // k) * (wp // k) + j // k) * k * k + (i % k) * k + (j % k)
            assert seq[p] == i * width + j
    assert (seq == -1).sum() == hp * wp - height * width


@pytest.mark.parametrize("directions", [("h", "v", "h_flip", "v_flip"), ("w3", "w3c", "w3_flip", "w2c_flip")])
def test_scan_then_unscan_recovers_each_direction(directions):
    height, width = 5, 6
    x = torch.randn(2, 3, height * width)
    order = ScanOrder(directions, height, width)
    seqs = order.scan(x)
    assert seqs.shape == (2, len(directions), 3, order.length)
    back = order.unscan(seqs)
    for k in range(len(directions)):
        assert torch.equal(back[:, k], x)


@pytest.mark.parametrize("directions", [("h", "v", "h_flip", "v_flip"), ("w3", "w3c", "w3_flip", "w2c_flip")])
def test_scan_orders_backpropagate_exactly_like_plain_indexing(directions):
    """scan / scan_each / unscan gather their gradients back through the inverse order (no index_add or
    scatter_add): the same gradients as plain indexing, padded window orders included."""
    order = ScanOrder(directions, 5, 6)
    k, length = len(directions), order.length
    table = order.table.long()

    def in_order(x, i):  # (..., T) -> (..., L), direction i's order, zeros at padding steps
        return x[..., table[i].clamp(min=0)] * (table[i] >= 0)

    def back(y, i):  # (..., L) -> (..., T)
        positions = torch.zeros(*y.shape[:-1], 30)
        positions[..., table[i][table[i] >= 0]] = y[..., table[i] >= 0]
        return positions

    cases = [
        (order.scan, torch.randn(2, 3, 30), lambda x: torch.stack([in_order(x, i) for i in range(k)], 1)),
        (order.scan_each, torch.randn(2, k, 30, 3).transpose(2, 3),  # a transposed view, as SS2D passes them
         lambda x: torch.stack([in_order(x[:, i], i) for i in range(k)], 1)),
        (order.unscan, torch.randn(2, k, 3, length), lambda y: torch.stack([back(y[:, i], i) for i in range(k)], 1)),
    ]
    for method, x, reference in cases:
        ours, theirs = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        out = method(ours)
        expected = reference(theirs)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        weight = torch.randn(out.shape)
        (out * weight).sum().backward()
        (expected * weight).sum().backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-6)


def test_unknown_direction_is_rejected():
    with pytest.raises(ValueError, match="unknown scan direction"):
        direction_positions("diagonal", 4, 4)


def test_channels_must_split_into_groups():
    u, delta = torch.randn(1, 6, 5), torch.rand(1, 6, 5)
    A, B = -torch.rand(6, 1), torch.randn(1, 4, 1, 5)
    scans = [selective_scan_torch, selective_scan_reference, functools.partial(selective_scan, backend="cpu")]
    for scan in scans:
        with pytest.raises(ValueError, match="cannot be split into 4 groups"):
            scan(u, delta, A, B, B)


def test_scan_orders_first_built_in_inference_mode_still_train():
    """Cached index tensors must not be inference tensors: a test before a fit in one process (qmamba transfer)."""
    from qmamba.ops.scan_order import scan_order

    order = scan_order(("h", "v"), 5, 3)  # odd size: not used by other tests, so built here first
    with torch.inference_mode():
        order = scan_order(("h", "v"), 5, 7)
        order.scan(torch.randn(1, 2, 35))
    x = torch.randn(1, 2, 35, requires_grad=True)
    order.scan(x).sum().backward()
    assert x.grad is not None


def test_the_suites_numba_cache_serves_a_kernel_at_another_path_and_never_an_edited_one(tmp_path, monkeypatch):
    """qmamba.ops.jit_cache files compiled kernels by their source text: the same file in another folder (a new
    clone, a new environment) loads what the first compiled; an edited file compiles anew. With numba's own locator
    the second folder compiled again."""
    import importlib.util

    import numba

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(numba.config, "CACHE_LOCATOR_CLASSES", "qmamba.ops.jit_cache.SourceKeyedCacheLocator")
    source = "from numba import njit\n\n\n@njit(cache=True)\ndef scaled(x):\n    return 2.0 * x\n"

    def kernel(folder: str, text: str):  # noqa: ANN202
        path = tmp_path / folder / "kernel.py"
        path.parent.mkdir()
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"kernel_in_{folder}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.scaled

    first = kernel("clone", source)
    assert first(3.0) == 6.0 and sum(first.stats.cache_misses.values()) == 1
    moved = kernel("elsewhere", source)
    assert moved(3.0) == 6.0 and sum(moved.stats.cache_hits.values()) == 1 and not moved.stats.cache_misses
    edited = kernel("edited", source.replace("2.0 * x", "3.0 * x"))
    assert edited(3.0) == 9.0 and sum(edited.stats.cache_misses.values()) == 1 and not edited.stats.cache_hits
