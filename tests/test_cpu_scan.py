"""The fused CPU scan: every scan order against the sequential reference, whole models against the torch backend,
and the kernel's behaviour under threads, DataLoader workers, inference mode and a missing numba."""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import types

import pytest
import torch
from scan_cases import ORDERS, check_ordered_scan, kernel_args, low_rank, ordered_inputs, ordered_reference, rel_err

from qmamba.models import build_model, set_scan_backend
from qmamba.ops import ordered_selective_scan, selective_scan
from qmamba.ops.scan_order import CROSS_2D, ScanOrder

dispatch = importlib.import_module("qmamba.ops.selective_scan")  # the module (the package exports the function)


@pytest.mark.parametrize("directions,height,width", ORDERS)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("rank", [None, 6])  # 6: the held steps' rank-quad loop and a remainder
def test_ordered_cpu_scan_matches_sequential_reference(directions, height, width, n, merge, rank):
    """All orders, N = 1 and 3, merged or per-direction outputs, full or low-rank (dt_proj fused) step sizes."""
    check_ordered_scan("cpu", ScanOrder(directions, height, width), 2, 20, n, merge, rank)


@pytest.mark.parametrize("softplus", [True, False])
def test_ordered_scan_backends_agree_without_softplus_or_optional_terms(softplus):
    order = ScanOrder(("w2", "w2c_flip"), 3, 5)
    u, delta, A, B, C, _, _ = ordered_inputs(1, 2, 15, 16, 2)
    y_cpu = ordered_selective_scan(u, delta, A, B, C, None, None, order, False, softplus, backend="cpu")
    y_torch = ordered_selective_scan(u, delta, A, B, C, None, None, order, False, softplus, backend="torch")
    assert rel_err(y_cpu, y_torch) < 1e-5


@pytest.mark.slow  # 11 s on 2 cores of a Zen 3 EPYC, numba's compilations included
def test_cpu_kernels_gradcheck_in_float64():
    order = ScanOrder(("w2", "v_flip"), 3, 3)  # padding steps included
    args = ordered_inputs(1, 2, 9, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: ordered_selective_scan(*a, order, merge=True, backend="cpu"), args)
    factored, proj = low_rank(args, 2)
    assert torch.autograd.gradcheck(
        lambda *a: ordered_selective_scan(*a[:-1], order, merge=False, backend="cpu", delta_proj=a[-1]),
        [*factored, proj])
    g = torch.Generator().manual_seed(1)
    u, delta = torch.randn(2, 4, 7, generator=g, dtype=torch.float64), torch.rand(2, 4, 7, generator=g).double()
    A, B, C = -torch.rand(4, 2).double() - 0.1, torch.randn(2, 2, 2, 7).double(), torch.randn(2, 2, 2, 7).double()
    D, bias = torch.randn(4).double(), torch.randn(4).double()
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D, bias)]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, delta_softplus=True, backend="cpu"), inputs)


def _bf16_operands(order: ScanOrder) -> tuple[list[torch.Tensor], torch.Tensor]:
    """SS2D's scan operands under bf16 autocast, requiring gradients: u, delta's rank-3 factor, B and C in bf16 (the
    matrix products' outputs), A, D and bias in fp32; and the fp32 delta projection."""
    args, proj = low_rank(ordered_inputs(2, 4, order.num_tokens, 32, 1), 3)
    return [x.detach().to(torch.bfloat16).requires_grad_() if i in (0, 1, 3, 4) else x
            for i, x in enumerate(args)], proj


@pytest.mark.parametrize("directions,height,width", [ORDERS[0], ORDERS[2]])
@pytest.mark.parametrize("merge", [True, False])
def test_the_cpu_scan_reads_bf16_operands_as_they_are(directions, height, width, merge):
    """bf16 u, delta, B, C (autocast's matrix products) with fp32 parameters: the kernel widens them in registers and
    scans in fp32, so it matches the torch scan of the same values in fp32; every gradient too (bf16 inputs' in
    bf16, so within bf16's rounding)."""
    order = ScanOrder(directions, height, width)
    low, proj = _bf16_operands(order)
    results = {}
    for backend in ("cpu", "torch"):
        y = ordered_selective_scan(*low, order, merge=merge, backend=backend, delta_proj=proj,
                                   out_dtype=torch.float32)
        grads = torch.autograd.grad(y, [*low, proj], torch.ones_like(y))
        results[backend] = y, grads
    (y, grads), (y_ref, grads_ref) = results["cpu"], results["torch"]
    assert y.dtype == torch.float32 and rel_err(y, y_ref) < 1e-5
    for name, g, g_ref, x in zip("u delta A B C D bias proj".split(), grads, grads_ref, [*low, proj], strict=True):
        assert g.dtype == x.dtype, name
        assert rel_err(g.float(), g_ref.float()) < (1e-2 if x.dtype == torch.bfloat16 else 1e-4), name


@pytest.mark.parametrize("merge", [True, False])
def test_the_low_rank_backward_as_matrix_products_matches_the_reference(monkeypatch, merge):
    """From GEMM_RANK on (QMamba-T's later stages) the backward computes the step-size projection's gradients as
    matrix products over the full-rank gradient; here at rank 3, against the sequential reference, padding included;
    and with bf16 operands against the kernel's own chain rule."""
    cpu_scan = importlib.import_module("qmamba.ops.cpu_scan")
    order = ScanOrder(("w2", "v_flip", "h", "w2c_flip"), 3, 5)
    monkeypatch.setattr(cpu_scan, "GEMM_RANK", 1)
    check_ordered_scan("cpu", order, 2, 20, 1, merge, 3)
    low, proj = _bf16_operands(order)
    grads = {}
    for gemm_rank in (1, 1000):
        monkeypatch.setattr(cpu_scan, "GEMM_RANK", gemm_rank)
        y = ordered_selective_scan(*low, order, merge=merge, backend="cpu", delta_proj=proj, out_dtype=torch.float32)
        grads[gemm_rank] = torch.autograd.grad(y, [*low, proj], torch.ones_like(y))
    for name, g, g_kernel, x in zip("u delta A B C D bias proj".split(), grads[1], grads[1000], [*low, proj],
                                    strict=True):
        assert g.dtype == g_kernel.dtype == x.dtype, name
        assert rel_err(g.float(), g_kernel.float()) < (1e-2 if x.dtype == torch.bfloat16 else 1e-5), name


def test_the_kernel_rounds_to_bf16_as_torch_does():
    """Ties to even, the largest finite floats to infinity, infinities, signed zeros, subnormals and NaN: the bits
    torch's own float32 -> bf16 conversion gives."""
    from qmamba.ops.cpu_scan import _bf16_bits

    g = torch.Generator().manual_seed(0)
    bits = torch.cat([
        torch.randint(-2**31, 2**31, (2000,), generator=g, dtype=torch.int64),
        torch.tensor([0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001, 0x7F7F_FFFF, 0x7F7F_7FFF, 0x7F80_0000,
                      0xFF80_0000, 0x0000_0000, 0x8000_0000, 0x0000_8000, 0x0001_8000, 0x7FC0_0000, 0x7F80_0001,
                      0xFFFF_FFFF]),
    ]).to(torch.int32)  # wraps the unsigned ones to their int32 bits
    values = bits.view(torch.float32)
    expected = values.to(torch.bfloat16).view(torch.int16)
    expected = torch.where(values.isnan(), torch.tensor(0x7FC0, dtype=torch.int16), expected)  # one NaN
    got = torch.tensor([int(_bf16_bits(v)) for v in values.numpy()], dtype=torch.int16)
    mismatched = (got != expected).nonzero().flatten()
    assert not len(mismatched), [hex(int(bits[i]) & 0xFFFFFFFF) for i in mismatched[:5]]


@pytest.mark.parametrize("directions,height,width", [ORDERS[0], ORDERS[2]])
@pytest.mark.parametrize("merge", [True, False])
def test_a_bf16_output_is_the_fp32_scan_rounded_once(directions, height, width, merge):
    """out_dtype bf16 (SS2D's for bf16 scoring): the kernel sums the K sequences in fp32 and rounds once, so its
    output is its fp32 output converted by torch, bit for bit; gradients flow back through it as through fp32's."""
    order = ScanOrder(directions, height, width)
    low, proj = _bf16_operands(order)
    y32 = ordered_selective_scan(*low, order, merge=merge, backend="cpu", delta_proj=proj, out_dtype=torch.float32)
    y16 = ordered_selective_scan(*low, order, merge=merge, backend="cpu", delta_proj=proj, out_dtype=torch.bfloat16,
                                 scan_dtype=torch.float32)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y32.to(torch.bfloat16))
    grad = torch.randn(y32.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    grads16 = torch.autograd.grad(y16, [*low, proj], grad)
    grads32 = torch.autograd.grad(y32, [*low, proj], grad.float())
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert torch.equal(g16, g32)  # the same gradient values, read by the same backward kernel
    y_torch = ordered_selective_scan(*low, order, merge=merge, backend="torch", delta_proj=proj,
                                     out_dtype=torch.bfloat16, scan_dtype=torch.float32)
    assert y_torch.dtype == torch.bfloat16 and rel_err(y_torch.float(), y32) < 1e-2  # fp32 scans, bf16 results


def _ops_run(call) -> set[str]:  # noqa: ANN001
    with torch.profiler.profile() as prof:
        call()
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_layer_normalizes_the_merged_output_in_inference(out_dtype):
    """SS2D's out_norm handed to the scan: in inference the kernel computes it from its fp32 sums where each task holds
    whole rows (batch 2), torch after the scan where two threads split the channels (batch 1); either way torch's
    LayerNorm of the fp32 scan output, rounded once to the output dtype. With autograd on, torch's op runs after the
    scan's, as before."""
    order = ScanOrder(("w3", "w3c", "w3_flip", "w3c_flip"), 5, 7)  # padding steps
    g = torch.Generator().manual_seed(4)
    norm = (1 + 0.3 * torch.randn(32, generator=g), 0.3 * torch.randn(32, generator=g), 1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for batch in (2, 1):
            args, proj = low_rank(ordered_inputs(batch, 4, order.num_tokens, 32, 1), 3)
            with torch.no_grad():
                ran = _ops_run(lambda: ordered_selective_scan(*args, order, backend="cpu", delta_proj=proj,
                                                              out_dtype=out_dtype, layer_norm=norm))
                y = ordered_selective_scan(*args, order, backend="cpu", delta_proj=proj, out_dtype=out_dtype,
                                           layer_norm=norm)
                y32 = ordered_selective_scan(*args, order, backend="cpu", delta_proj=proj)
            assert "qmamba::cpu_scan_normalized" in ran
            assert ("aten::native_layer_norm" in ran) == (batch == 1)
            expected = torch.nn.functional.layer_norm(y32, (32,), *norm)
            assert y.dtype == out_dtype
            if out_dtype == torch.float32 or batch == 2:  # bf16 from the fp32 sums: one rounding
                torch.testing.assert_close(y.float(), expected, rtol=2**-8 if y.dtype == torch.bfloat16 else 1e-5,
                                           atol=1e-5)
            else:  # torch's LayerNorm of the bf16-rounded scan
                torch.testing.assert_close(y.float(), expected, rtol=2**-6, atol=2**-6)
    finally:
        torch.set_num_threads(threads)
    ran = _ops_run(lambda: ordered_selective_scan(*args, order, backend="cpu", delta_proj=proj, layer_norm=norm))
    assert "qmamba::cpu_scan_normalized" not in ran and "aten::native_layer_norm" in ran
    with pytest.raises(ValueError, match="merge=True"):
        ordered_selective_scan(*args, order, merge=False, backend="cpu", delta_proj=proj, layer_norm=norm)


def test_ss2d_inference_computes_out_norm_in_the_scan_unless_it_is_hooked():
    from qmamba.models.ss2d import SS2D

    torch.manual_seed(0)
    layer = SS2D(16, scan_backend="cpu").eval()
    torch.nn.init.normal_(layer.out_norm.weight, 1, 0.3)
    torch.nn.init.normal_(layer.out_norm.bias, 0, 0.3)
    x = torch.randn(2, 5, 7, 16)
    expected = layer(x)  # autograd on: the module after the scan
    with torch.no_grad():
        ran = _ops_run(lambda: layer(x))
        got = layer(x)
    assert "qmamba::cpu_scan_normalized" in ran and "aten::native_layer_norm" not in ran
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    seen = []
    handle = layer.out_norm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            ran = _ops_run(lambda: layer(x))
    finally:
        handle.remove()
    assert seen and "qmamba::cpu_scan_normalized" not in ran


def test_an_order_that_misses_a_token_is_summed_into_a_zeroed_output():
    """The kernel assigns each output token on its first visit (no zero-filled output) only when every sequence
    visits each token exactly once; with another table (here sequence 0 steps on padding instead of token 2) the
    output is zeroed and summed into, and token 2 gets nothing from sequence 0, as in the reference."""
    order = ScanOrder(CROSS_2D, 2, 2)
    table = order.table.clone()
    table[0] = torch.tensor([0, 1, -1, 3], dtype=table.dtype)
    odd = types.SimpleNamespace(directions=order.directions, length=order.length, table=table, num_tokens=4)
    with torch.no_grad():
        for merge in (True, False):
            args = ordered_inputs(1, 4, 4, 16, 1)
            y = dispatch._load_cpu_kernel().op(*kernel_args(odd, 1, 16, 1, merge, None))  # the op: no order checks
            assert rel_err(y.squeeze(1), ordered_reference(*args, odd, merge, True)) < 1e-5
            y16 = dispatch._load_cpu_kernel().op(*kernel_args(odd, 1, 16, 1, merge, None, torch.bfloat16))
            assert torch.equal(y16, y.to(torch.bfloat16))  # its fp32 buffer zeroed in place of the output


def test_ordered_scan_checks_its_shapes():
    order = ScanOrder(CROSS_2D, 3, 3)
    u, delta, A, B, C, D, bias = (t.detach() for t in ordered_inputs(1, 4, 9, 8, 1))
    with pytest.raises(ValueError, match=r"u must be \(batch, 9, D\)"):
        ordered_selective_scan(u[:, :8], delta, A, B, C, D, bias, order)
    with pytest.raises(ValueError, match=r"A must be \(32, N\)"):
        ordered_selective_scan(u, delta, A[:16], B, C, D, bias, order)
    with pytest.raises(ValueError, match=r"delta_proj must be \(4, 8, R\)"):
        ordered_selective_scan(u, delta[..., :2], A, B, C, D, bias, order, delta_proj=torch.randn(4, 7, 2))


def test_inference_saves_nothing_and_training_records_the_fused_backward():
    order = ScanOrder(CROSS_2D, 4, 4)
    args = ordered_inputs(1, 4, 16, 16, 1)
    with torch.inference_mode():
        assert ordered_selective_scan(*args, order, backend="cpu").grad_fn is None
    with torch.no_grad():
        assert ordered_selective_scan(*args, order, backend="cpu").grad_fn is None
    y = ordered_selective_scan(*args, order, backend="cpu")
    nodes, seen = [y.grad_fn], []
    while nodes:
        node = nodes.pop()
        seen.append(type(node).__name__)
        nodes += [next_node for next_node, _ in node.next_functions if next_node is not None]
    assert "GeneratedBackwardFor_qmamba_cpu_scan_defaultBackward" in seen  # the custom op's registered autograd


@pytest.mark.parametrize("rank", [None, 3], ids=["full", "low-rank"])
def test_thread_count_does_not_change_the_result(rank: int | None):
    """Tasks split channels differently for 1 and 2 threads: the forward is bitwise equal, gradients close (also
    the low-rank chain rule's, whose partial sums are then per channel block)."""
    order = ScanOrder(CROSS_2D, 6, 6)
    args = ordered_inputs(1, 4, 36, 48, 1)  # batch 1: two threads split the channels into blocks
    proj = None
    if rank:
        args, proj = low_rank(args, rank)
        args.append(proj)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            y = ordered_selective_scan(*args[:7], order, backend="cpu", delta_proj=proj)
            results.append((y.detach(), torch.autograd.grad(y.sum(), args)))
    finally:
        torch.set_num_threads(threads)
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2, strict=True):
        assert rel_err(a, b) < 1e-6


def test_the_scan_runs_on_torchs_own_threads_and_each_task_once(monkeypatch):
    """The kernels' tasks run as one OpenMP region of torch's runtime: one slice in the calling thread, the other in a
    thread Python did not start (torch's worker, which would otherwise spin beside the scan), each task once; without
    that runtime, on a pool of Python threads. The scan's values and gradients are the same bits either way, and an
    error in a slice reaches the caller."""
    intra_op = importlib.import_module("qmamba.ops.intra_op")
    openmp = intra_op._torch_openmp()
    assert (openmp is not None) == torch.backends.openmp.is_available()
    order = ScanOrder(CROSS_2D, 6, 6)
    args = ordered_inputs(1, 4, 36, 48, 1)
    threads, results = torch.get_num_threads(), {}
    runners = {"pool": None} if openmp is None else {"openmp": openmp, "pool": None}
    try:
        torch.set_num_threads(2)
        for name, runtime in runners.items():
            monkeypatch.setattr(intra_op, "_torch_openmp", lambda runtime=runtime: runtime)
            slices = []
            intra_op.run_slices(lambda first, last: slices.append((first, last, threading.current_thread())), 7)
            assert sorted(s[:2] for s in slices) == [(0, 3), (3, 7)], name
            ran_on = {s[2] for s in slices}
            if name == "openmp":
                assert threading.current_thread() in ran_on
                assert any(isinstance(t, threading._DummyThread) for t in ran_on)  # not started by Python
            else:
                assert {t.name.split("_")[0] for t in ran_on} == {"qmamba-slices"}

            def fail(first: int, last: int) -> None:
                if first:
                    raise ValueError(f"slice from {first}")

            with pytest.raises(ValueError, match="slice from 3"):
                intra_op.run_slices(fail, 7)
            y = ordered_selective_scan(*args, order, backend="cpu")
            results[name] = y.detach(), torch.autograd.grad(y.sum(), args)
    finally:
        torch.set_num_threads(threads)
    (y1, g1), *others = results.values()
    for y2, g2 in others:
        assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


class _ScoringDataset(torch.utils.data.Dataset):
    """Runs the model inside DataLoader workers (forked after the parent ran the kernel on its threads)."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor) -> None:
        self.model, self.images = model, images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(self.images[index : index + 1])[0]


def test_kernel_runs_in_dataloader_workers():
    torch.manual_seed(0)
    model = build_model("qmamba_test", scan_backend="cpu").eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        expected = model(images)  # the parent has used the kernel (and its thread pool) before the fork
    loader = torch.utils.data.DataLoader(_ScoringDataset(model, images), batch_size=2, num_workers=2)
    scores = torch.cat(list(loader))
    assert torch.allclose(scores, expected, rtol=1e-5, atol=1e-6)


def _scores_and_grads_per_backend(model: torch.nn.Module, images: torch.Tensor) -> dict[str, tuple]:
    outputs = {}
    for backend in ("cpu", "torch"):
        set_scan_backend(model, backend)
        model.zero_grad(set_to_none=True)
        scores = model(images)
        scores.sum().backward()
        outputs[backend] = (scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return outputs


def _assert_backends_agree(model: torch.nn.Module, images: torch.Tensor) -> None:
    outputs = _scores_and_grads_per_backend(model, images)
    (s_cpu, g_cpu), (s_torch, g_torch) = outputs["cpu"], outputs["torch"]
    assert rel_err(s_cpu, s_torch) < 1e-4
    errors = {n: rel_err(g_cpu[n], g_torch[n]) for n in g_torch}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


@pytest.mark.parametrize("name,size", [("qmamba_test", 32), ("lqmamba_test", 40), ("vim_test", 32),
                                       ("vmamba_vanilla_tiny", 64)])
def test_every_backbone_family_gives_the_torch_backend_result(name, size):
    """VMamba v2, LQMamba (padded windows at 40 px), Vim and the gated v0 model (d_state 16)."""
    torch.manual_seed(0)
    _assert_backends_agree(build_model(name), torch.randn(2, 3, size, size))


@pytest.mark.slow
@pytest.mark.parametrize("name,batch,size", [("qmamba_tiny", 1, 224), ("lqmamba_tiny", 2, 160)])
def test_full_size_models_give_the_torch_backend_result(name, batch, size):
    """QMamba-T at 224 and LQMamba-T at 160 (maps 40/20/10/5: every window scan pads) through both backends."""
    torch.manual_seed(0)
    _assert_backends_agree(build_model(name), torch.randn(batch, 3, size, size))


def test_auto_uses_the_cpu_kernel_and_falls_back_loudly_without_numba(monkeypatch, caplog):
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "cpu"
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    monkeypatch.delitem(sys.modules, "qmamba.ops.cpu_scan")
    with caplog.at_level(logging.WARNING, logger="qmamba.ops.selective_scan"):
        assert dispatch._load_cpu_kernel.__wrapped__() is None
    assert "fused CPU selective scan is unavailable" in caplog.text and "pip install numba" in caplog.text
    monkeypatch.setattr(dispatch, "_load_cpu_kernel", lambda: None)
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="numba cannot be imported.*pip install numba"):
        dispatch.resolve_backend("cpu", torch.device("cpu"))
