"""The machine a number was measured on, named the way every speed table names it: the CPU's model and its vector ISA
class (AVX2, AVX-512, AVX-512-BF16, AMX), or the GPU. A speed without it means little: the same code runs QMamba-T
at very different ratios to Swin-T on a first-generation EPYC (AVX2 only) and on a Sapphire Rapids (AMX)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["cpu_flags", "cpu_isa", "cpu_model", "device_description"]

# From the most capable down: the class a CPU belongs to is the first whose flags it has, as /proc/cpuinfo names them
ISA_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("AMX", ("amx_tile", "amx_bf16")),
    ("AVX-512-BF16", ("avx512f", "avx512_bf16")),
    ("AVX-512", ("avx512f",)),
    ("AVX2", ("avx2", "fma")),
)


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:  # not Linux: nothing to read, so nothing is claimed
        return ()


def _first(field: str) -> str:
    return next((line.partition(":")[2].strip() for line in _cpuinfo() if line.split(":")[0].strip() == field), "")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is no /proc/cpuinfo)."""
    return frozenset(_first("flags").split())


def cpu_isa() -> str:
    """The CPU's vector ISA class: ``AMX``, ``AVX-512-BF16``, ``AVX-512``, ``AVX2``, or ``unknown``."""
    flags = cpu_flags()
    return next((name for name, needed in ISA_CLASSES if set(needed) <= flags), "unknown")


def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers where the name alone is vague ("AMD EPYC" is three
    generations of very different cores)."""
    name = _first("model name") or "unknown CPU"
    family, model = _first("cpu family"), _first("model")
    return f"{name} (family {family} model {model})" if family and model else name


def device_description(device: str | torch.device = "cpu") -> str:
    """One line for a table's header: the GPU's name, or the CPU's model, ISA class and torch's thread count."""
    import torch  # here: reading the CPU's flags (the precision check) needs no torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {cpu_isa()}, {torch.get_num_threads()} threads"
