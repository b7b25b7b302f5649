"""The machine every speed table names: the CPU's model and vector ISA class, from /proc/cpuinfo's lines."""

from __future__ import annotations

import pytest

from qmamba import machine

AVX2 = "fpu sse sse2 avx fma avx2"
CPUS = {
    "first-generation EPYC": ("AMD EPYC 7551 32-Core Processor", "23", "1", AVX2, "AVX2"),
    "Zen 3 EPYC": ("AMD EPYC", "25", "1", AVX2 + " vaes", "AVX2"),
    "Zen 4 EPYC": ("AMD EPYC 9R14", "25", "17", AVX2 + " avx512f avx512bw avx512_bf16", "AVX-512-BF16"),
    "Ice Lake Xeon": ("Intel(R) Xeon(R) Platinum 8375C", "6", "106", AVX2 + " avx512f avx512bw", "AVX-512"),
    "Sapphire Rapids Xeon": ("Intel(R) Xeon(R) Platinum 8488C", "6", "143",
                             AVX2 + " avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", "AMX"),
    "no AVX2": ("QEMU Virtual CPU", "6", "6", "fpu sse sse2", "unknown"),
}


@pytest.mark.parametrize("name", CPUS)
def test_the_cpu_is_named_with_its_isa_class(monkeypatch, name):
    model, family, number, flags, isa = CPUS[name]
    lines = ("processor\t: 0", f"cpu family\t: {family}", f"model\t\t: {number}", f"model name\t: {model}",
             f"flags\t\t: {flags}", "", "processor\t: 1", f"flags\t\t: {flags}")
    monkeypatch.setattr(machine, "_cpuinfo", lambda: lines)
    assert machine.cpu_isa() == isa
    assert machine.cpu_model() == f"{model} (family {family} model {number})"
    assert machine.device_description("cpu").startswith(f"{model} (family {family} model {number}), {isa}, ")
    assert ("amx_tile" in machine.cpu_flags()) == (isa == "AMX")


def test_without_cpuinfo_nothing_is_claimed(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ())
    assert machine.cpu_flags() == frozenset() and machine.cpu_isa() == "unknown"
    assert machine.cpu_model() == "unknown CPU"
