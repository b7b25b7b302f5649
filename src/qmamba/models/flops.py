"""FLOPs counted as the paper counts them, for qmamba's models and any other ``nn.Module`` (timm's included).

QMamba's GFLOPs (4.47 for QMamba-T) come from VMamba's counter, and timm's published GMACs (Swin-T 4.51, ViT-B
17.58) from the same tool, fvcore. Its conventions, which :data:`CONVENTION` names wherever a count is printed:

* one multiply-add is one FLOP (matmuls, linear layers, convolutions without their bias, attention's two matmuls);
* the selective scan counts VMamba's ``selective_scan_flop_jit``, ``9·B·L·D·N + B·D·L`` per call, with ``D`` all
  directions' channels; qmamba's fused scan also computes the step sizes' low-rank projection, which VMamba runs as a
  separate grouped conv1d (``B·K·L·D·R``), so it is counted as that conv is;
* LayerNorm and GroupNorm count 5 per element (4 without affine parameters), batch norm in eval 2 (1), adaptive
  average pooling 1 per input element: fvcore's own handles, part of every published count;
* other elementwise ops (activations, additions, gating) count nothing.

Why ``torch.utils.flop_counter`` and not fvcore itself: fvcore traces with TorchScript, which qmamba's custom scan
ops and timm's fused attention do not pass through cleanly, and it is unmaintained. torch's counter dispatches on
the ops that actually run, so each formula is registered here: torch's own (two per multiply-add) halved, CPU
attention (``_scaled_dot_product_flash_attention_for_cpu``, which torch's registry misses and would count as 0), the
norms and the scan. Counts are of one forward pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

from qmamba.models import set_scan_backend
from qmamba.ops.selective_scan import cpu_selective_scan_available, triton_selective_scan_available

__all__ = ["CONVENTION", "FlopCount", "count_flops", "flop_counter", "paper_formulas"]

CONVENTION = ("one multiply-add = one FLOP; selective scan 9·B·L·D·N + B·D·L; norms 5 per element; other "
              "elementwise ops 0 (fvcore's, as VMamba and timm count)")

aten = torch.ops.aten
_FUSED_SCANS = ("cpu_scan", "triton_scan")  # qmamba's custom scan ops (qmamba.ops.fused_scan)


def _raw(formula: Callable[..., int]) -> Callable[..., int]:
    """Mark ``formula`` as taking the op's own arguments (tensors), as torch's counter then passes them."""
    formula._get_raw = True  # type: ignore[attr-defined]
    return formula


def _multiply_adds(counted: Callable[..., int]) -> Callable[..., int]:
    """One of torch's formulas, which count two FLOPs per multiply-add, in multiply-adds."""
    return _raw(lambda *args, out_val=None, **kwargs: counted(*args, out_val=out_val, **kwargs) // 2)


@_raw
def _cpu_attention(query: Tensor, key: Tensor, value: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape) // 2


def _norm(weight_index: int) -> Callable[..., int]:
    @_raw
    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return args[0].numel() * (5 if args[weight_index] is not None else 4)
    return formula


def _batch_norm(training_index: int | None) -> Callable[..., int]:
    @_raw
    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        affine = args[1] is not None
        if training_index is not None and args[training_index]:
            return args[0].numel() * (5 if affine else 4)
        return args[0].numel() * (2 if affine else 1)
    return formula


@_raw
def _input_elements(x: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return x.numel()


@_raw
def _fused_scan(u: Tensor, delta: Tensor, proj: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor,
                table: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """qmamba::cpu_scan / triton_scan: u (batch, 1 or K, T, D), delta (batch, K, T, R or D), proj (K, R, D) or
    empty, A (K, N, D), table (K, L): L steps per direction, padding steps of window scans included."""
    batch, directions, channels = u.shape[0], delta.shape[1], u.shape[-1]
    steps, state = table.shape[-1], A.shape[1]
    scan = 9 * batch * steps * directions * channels * state + (batch * directions * channels * steps if D.numel()
                                                                  else 0)
    projection = batch * directions * steps * channels * proj.shape[1] if proj.numel() else 0
    return scan + projection


def paper_formulas() -> dict[Any, Callable[..., int]]:
    """The formulas of :data:`CONVENTION`, for ``FlopCounterMode(custom_mapping=...)``."""
    formulas: dict[Any, Callable[..., int]] = {op: _multiply_adds(f) for op, f in flop_registry.items()}
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention
    formulas[aten.native_layer_norm] = _norm(2)
    formulas[aten.native_group_norm] = _norm(1)
    formulas[aten._native_batch_norm_legit_no_training] = _batch_norm(None)
    formulas[aten._batch_norm_no_update] = _batch_norm(None)
    formulas[aten._native_batch_norm_legit] = _batch_norm(5)
    formulas[aten.native_batch_norm] = _batch_norm(5)
    formulas[aten._batch_norm_with_update] = _batch_norm(None)  # updates running statistics: training
    formulas[aten._adaptive_avg_pool2d] = _input_elements
    cpu_selective_scan_available()  # registers qmamba's custom scan ops, which load on their first call
    if torch.cuda.is_available():
        triton_selective_scan_available()
    for name in _FUSED_SCANS:
        if hasattr(torch.ops.qmamba, name):
            formulas[getattr(torch.ops.qmamba, name)] = _fused_scan
    return formulas


def flop_counter(depth: int = 2) -> FlopCounterMode:
    """torch's ``FlopCounterMode`` counting by :data:`CONVENTION` (Lightning's model summary uses it too)."""
    return FlopCounterMode(display=False, depth=depth, custom_mapping=paper_formulas())


@dataclass(frozen=True)
class FlopCount:
    """One forward pass's count: in all, and by operation."""

    total: int
    by_op: dict[str, int]

    @property
    def gflops(self) -> float:
        return self.total / 1e9


@contextmanager
def _fused_scans(model: nn.Module) -> Iterator[None]:
    """The model's selective scans on the fused CPU kernel while counting: the torch scan is a loop of elementwise
    ops, which the convention counts as nothing, so a count through it would miss every scan."""
    scans = [m for m in model.modules() if hasattr(m, "scan_backend")]
    before = [m.scan_backend for m in scans]
    set_scan_backend(model, "cpu")
    try:
        yield
    finally:
        for module, backend in zip(scans, before, strict=True):
            module.scan_backend = backend


def count_flops(model: nn.Module, size: int | tuple[int, int] = 224, batch: int = 1) -> FlopCount:
    """FLOPs of ``model`` on a (batch, 3, H, W) input by :data:`CONVENTION`: one forward in eval mode, without
    gradients, on the CPU (a model elsewhere is counted on a CPU copy: the count depends on shapes alone)."""
    height, width = (size, size) if isinstance(size, int) else size
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    training = model.training
    model.eval()
    try:
        with _fused_scans(model), torch.no_grad(), flop_counter() as counter:
            model(torch.zeros(batch, 3, height, width))
    finally:
        model.train(training)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items() if n}
    return FlopCount(total=sum(by_op.values()), by_op=dict(sorted(by_op.items(), key=lambda item: -item[1])))

