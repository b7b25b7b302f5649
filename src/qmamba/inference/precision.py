"""The numeric precision a trained model scores in: ``fp32`` (the default), ``bf16``, or ``auto``.

``bf16`` runs the forward under ``torch.autocast`` with bfloat16: matrix products and convolutions in bf16 on units
that compute it natively (CPUs with AVX-512-BF16 or AMX, GPUs of compute capability 8.0 and later), the selective
scan's state and sums in fp32 inside the fused kernels, the scores returned in fp32. Elsewhere bf16 is emulated, slower
than fp32 and no more accurate, so asking for it there is refused on one line rather than run slowly, and never
replaced by fp32 silently. ``auto`` is bf16 where the device has it natively and fp32 elsewhere.

fp32 is the default: its scores are the same on every machine to the last digits, while bf16's differ from fp32's by
up to about 0.01 on the unit scale (docs/scoring.md, Precision), which a score file compared across machines should
not carry unless asked for.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING, Literal

from qmamba.errors import UsageError
from qmamba.machine import cpu_flags

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "Precision", "add_precision_argument", "native_bf16", "precision_context",
           "resolve_precision"]

Precision = Literal["fp32", "bf16", "auto"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's names for native bf16 arithmetic


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (default: the same scores on every machine), bf16 (faster where the CPU has "
                        "AVX-512-BF16 or AMX, or on a GPU of compute capability 8.0+; refused elsewhere) or auto "
                        "(bf16 where native, else fp32)")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (not emulated)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """The precision to run: ``auto`` decided for ``device``; ``bf16`` where the device lacks it is a
    :class:`UsageError`."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return "fp32"
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if not native:
        what = ("this CPU has neither AVX-512-BF16 nor AMX" if device.type == "cpu" else
                f"{device} computes bf16 natively only from compute capability 8.0")
        raise UsageError(f"precision bf16: {what}, so bf16 would be emulated, slower than fp32; use precision fp32 "
                         "(or auto, which picks bf16 only where it is native)")
    return "bf16"


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The context a forward runs in: autocast to bf16, or nothing for fp32."""
    import torch

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
