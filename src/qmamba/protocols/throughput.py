"""Steady-state speed and peak memory of one architecture, as users run it: blocks of consecutive inference batches
and of training steps (forward, backward, AdamW), each in a fresh process so that one model's caches, allocator
state and memory high-water mark never reach the next. Imports no Lightning (a spawned process starts fast).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qmamba.inference.trained import build_architecture

__all__ = ["Throughput", "images_per_second", "measure_in_new_process"]


@dataclass(frozen=True)
class Throughput:
    """One block's images per second, inference and training, and the training steps' peak memory in MiB (on a
    GPU torch's peak allocation; on the CPU, Linux's peak resident size of the process above its size before the
    steps)."""

    inference: float
    training: float
    peak_mib: float


def measure_in_new_process(architecture: dict[str, Any], size: int, batch: int, device: str,
                           block_seconds: float) -> Throughput:
    """:func:`measure` in a process of its own (spawned: nothing inherited but the arguments)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return Throughput(**pool.submit(_measure_dict, architecture, size, batch, device, block_seconds).result())


def _measure_dict(*args: Any) -> dict[str, float]:
    return asdict(measure(*args))


def measure(architecture: dict[str, Any], size: int, batch: int, device: str, block_seconds: float) -> Throughput:
    """The architecture's steady state on ``device``: a warm-up, then consecutive calls for at least
    ``block_seconds`` (and 3 calls), inference under ``inference_mode`` and then training steps."""
    torch.manual_seed(0)
    model = build_architecture(**architecture).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    target = torch.rand(batch, device=device)
    model.eval()
    with torch.inference_mode():
        inference = images_per_second(lambda: model(images), batch, device, block_seconds)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(model(images), target).backward()
        optimizer.step()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        training = images_per_second(step, batch, device, block_seconds)
        return Throughput(inference, training, torch.cuda.max_memory_allocated(device) / 2**20)
    resident = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size restarts from the size now
    training = images_per_second(step, batch, device, block_seconds)
    return Throughput(inference, training, max(0.0, _status_mib("VmHWM") - resident))


def images_per_second(call: Callable[[], Any], batch: int, device: str, block_seconds: float, warmup: int = 2
                      ) -> float:
    """One steady-state block: ``warmup`` calls untimed (first-call allocations, oneDNN primitives, numba's
    dispatch, caches another model evicted), then consecutive calls for at least ``block_seconds`` and 3 calls."""
    for _ in range(warmup):
        call()
    _synchronise(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < block_seconds:
        call()
        calls += 1
        if calls % 4 == 0:
            _synchronise(device)
    _synchronise(device)
    return batch * calls / (time.perf_counter() - start)


def _synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _status_mib(field: str) -> float:
    """A memory figure of this process from Linux's /proc/self/status (kB there). ``ru_maxrss`` would not do: a
    spawned process keeps its parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")
