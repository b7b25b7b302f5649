"""CPU throughput of QMamba next to timm's Swin-T and ConvNeXt-T, and the selective scan alone per backend.

    pip install -e ".[benchmark]"                 # timm, for the baselines
    python benchmarks/cpu_models.py               # the full table (about 5 minutes on 2 cores)
    python benchmarks/cpu_models.py --rounds 3 --models qmamba_tiny:cpu swin_tiny --no-scan
    python benchmarks/cpu_models.py --models qmamba_tiny:cpu+compiled swin_tiny+compiled --no-scan
    python benchmarks/cpu_models.py --models qmamba_tiny:cpu@bf16 swin_tiny@bf16 --no-scan   # bf16 autocast
    python benchmarks/cpu_models.py --models qmamba_tiny:cpu@bf16 qmamba_tiny:cpu@bf16+frozen swin_tiny@bf16 \
        swin_tiny@bf16+frozen --no-scan                                                     # as score --compile

Inference: batch 8 at 224x224 under ``torch.inference_mode``. Training step: batch 2, forward, backward and an
AdamW step, fused on the CPU as ``qmamba fit`` steps it (:mod:`qmamba.training.optimizers`), every model with a
one-output regression head (timm's ``num_classes=1``). Each model is measured as users
run it, in a process whose C heap keeps freed memory as the ``qmamba`` command's does (:mod:`qmamba.heap`), in
steady state: a block of consecutive calls (one untimed call first, to bring back what the previous model
evicted from the caches) lasting at least --block-seconds. Each round runs one block per model and mode, models
alternated, so that slow drifts of the machine hit every model alike. The table gives the median and the spread
(min-max over rounds) of each figure and of each model's ratio to swin_tiny in the same round, under a header naming
the CPU and its vector ISA class. A ``+compiled`` model
runs through ``torch.compile`` (static shapes; QMamba as one graph with the fused scan inside) and is compared with
``swin_tiny+compiled``; its compile time is the first inference plus the first training step. A ``+frozen`` model is
compiled as ``qmamba score --compile`` compiles a scorer (:mod:`qmamba.models.compiling`: one graph, the batch
dimension dynamic, the weights frozen into it) and is measured in inference only. A ``@bf16`` model runs
under bf16 autocast (inference as ``qmamba score --precision bf16``, with its matrix products' weights stored in bf16,
Swin-T's too; the training step as ``bf16-mixed``) and is
compared with ``swin_tiny@bf16`` in the same mode. Run it on an otherwise idle machine: a second torch process on the
same cores slows both by an order of magnitude.

The scan table times the selective scan at QMamba-T's stage-0 and stage-1 shapes (batch 2, fp32, grouped B/C): the
1-D ``selective_scan`` on (batch, K*D, L) sequences and ``ordered_selective_scan``, the cross-scan form SS2D calls.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from scan import make_inputs, measure, scan_backends

from qmamba.heap import keep_freed_memory
from qmamba.machine import device_description
from qmamba.models import build_model
from qmamba.models.compiling import compile_model, run_compiled
from qmamba.models.low_precision import prepare_bf16_inference
from qmamba.ops import ordered_selective_scan
from qmamba.ops.scan_order import CROSS_2D, scan_order
from qmamba.protocols.throughput import images_per_second
from qmamba.training.optimizers import fused_on_cpu

DEFAULT_MODELS = ["qmamba_tiny:cpu", "qmamba_tiny:torch", "lqmamba_tiny:cpu", "lqmamba_tiny:torch", "swin_tiny",
                  "convnext_tiny", "qmamba_tiny:cpu+compiled", "lqmamba_tiny:cpu+compiled", "swin_tiny+compiled",
                  "qmamba_tiny:cpu@bf16", "lqmamba_tiny:cpu@bf16", "swin_tiny@bf16", "qmamba_tiny:cpu@bf16+compiled",
                  "lqmamba_tiny:cpu@bf16+compiled", "swin_tiny@bf16+compiled"]
COMPILED, FROZEN, BF16 = "+compiled", "+frozen", "@bf16"
TIMM_NAMES = {"swin_tiny": "swin_tiny_patch4_window7_224", "convnext_tiny": "convnext_tiny"}


def build(spec: str, inference: bool) -> torch.nn.Module:
    """``name`` (a timm baseline) or ``qmamba_preset:backend``, either with ``@bf16`` and ``+compiled``; an ``@bf16``
    model for inference prepared as ``qmamba score --precision bf16`` loads it (matrix products' weights and SS2D's
    scan outputs in bf16)."""
    base = spec.removesuffix(COMPILED).removesuffix(FROZEN).removesuffix(BF16)
    if base in TIMM_NAMES:
        import timm

        model = timm.create_model(TIMM_NAMES[base], num_classes=1)
    else:
        name, _, backend = base.partition(":")
        model = build_model(name, scan_backend=backend or "auto")
    if inference and BF16 in spec:
        prepare_bf16_inference(model, torch.device("cpu"))
    if spec.endswith(COMPILED):  # qmamba's whole model is one graph; timm's models are not checked for that
        return torch.compile(model, dynamic=False, fullgraph=base not in TIMM_NAMES)
    if spec.endswith(FROZEN):
        return compile_model(model, torch.device("cpu"), FROZEN, frozen=True)
    return model


def precision(spec: str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast for an ``@bf16`` model, nothing for fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if BF16 in spec else contextlib.nullcontext()


def inference_step(spec: str, model: torch.nn.Module, batch: int, size: int) -> Callable[[], None]:
    images = torch.randn(batch, 3, size, size)

    def step() -> None:
        model.eval()
        with torch.inference_mode(), precision(spec):
            run_compiled(model, images, FROZEN) if spec.endswith(FROZEN) else model(images)

    return step


def training_step(spec: str, model: torch.nn.Module, batch: int, size: int) -> Callable[[], None]:
    images, targets = torch.randn(batch, 3, size, size), torch.rand(batch)
    optimizer = fused_on_cpu(lambda groups: torch.optim.AdamW(groups, lr=1e-6),
                             lambda: [{"params": list(model.parameters())}])

    def step() -> None:
        model.train()
        with precision(spec):
            loss = torch.nn.functional.mse_loss(model(images).reshape(batch).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def spread(values: list[float], digits: int = 2) -> str:
    """median (min-max)."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def model_table(specs: list[str], rounds: int, size: int, infer_batch: int, train_batch: int,
                block_seconds: float, heap: str) -> None:
    models = {spec: build(spec, inference=spec.endswith(FROZEN)) for spec in specs}
    steps = {(spec, "inference"): inference_step(
        spec, build(spec, inference=True) if BF16 in spec and not spec.endswith(FROZEN) else model, infer_batch, size)
        for spec, model in models.items()}
    steps |= {(spec, "training"): training_step(spec, m, train_batch, size) for spec, m in models.items()
              if not spec.endswith(FROZEN)}  # a frozen model is a scorer's
    compile_s = {}
    for key, step in steps.items():  # the first calls: compilation, allocator, optimizer state
        start = time.perf_counter()
        step()
        compile_s[key] = time.perf_counter() - start
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(rounds):  # each round one steady-state block per model and mode, alternated
        for key, step in steps.items():
            batch = infer_batch if key[1] == "inference" else train_batch
            rates[key].append(images_per_second(step, batch, "cpu", block_seconds, warmup=1))
    print(f"\nmodels on {device_description()}: {size}x{size} fp32 (@bf16: bf16 autocast), inference batch "
          f"{infer_batch}, training step batch {train_batch}; images/s in steady state, median (min-max) of {rounds} "
          f"blocks of at least {block_seconds:g} s, models alternated; x swin: the ratio in each round; {heap}")
    header = (f"| {'model':<30} | {'params':>7} | {'inference img/s':>19} | {'x swin':>16} | {'train img/s':>19} "
              f"| {'x swin':>16} | {'compile s':>9} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for spec, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        # eager to eager, compiled to compiled, bf16 to bf16
        swin = "swin_tiny" + (BF16 if BF16 in spec else "") + next(
            (mode for mode in (COMPILED, FROZEN) if spec.endswith(mode)), "")
        cells = []
        for mode in ("inference", "training"):
            ours, base = rates.get((spec, mode)), rates.get((swin, mode))
            ratio = spread([a / b for a, b in zip(ours, base, strict=True)]) if ours and base else "-"
            cells.append(f"{spread(ours) if ours else '-':>19} | {ratio:>16}")
        first = compile_s[spec, "inference"] + compile_s.get((spec, "training"), 0.0)
        print(f"| {spec:<30} | {params:>6.1f}M | {cells[0]} | {cells[1]} | "
              f"{f'{first:.0f}' if spec.endswith((COMPILED, FROZEN)) else '-':>9} |")


def ordered_scan_inputs(batch: int, dim: int, height: int) -> list[torch.Tensor]:
    """SS2D's operands for ordered_selective_scan: tokens (B, T, D), per-direction delta/B/C at token positions."""
    g = torch.Generator().manual_seed(0)
    k, tokens = len(CROSS_2D), height * height
    tensors = [
        torch.randn(batch, tokens, dim, generator=g),
        0.5 * torch.randn(batch, k, tokens, dim, generator=g),
        -(torch.rand(k * dim, 1, generator=g) + 0.5),
        torch.randn(batch, k, tokens, 1, generator=g),
        torch.randn(batch, k, tokens, 1, generator=g),
        torch.randn(k * dim, generator=g),
        torch.randn(k * dim, generator=g),
    ]
    return [t.requires_grad_() for t in tensors]


def scan_table(repeats: int) -> None:
    print("\nselective scan alone, batch 2, fp32 (best of", repeats, "repeats)")
    header = f"| {'op':<22} | {'shape (B, K*D, N, L)':<20} | {'backend':<7} | {'fwd ms':>7} | {'fwd+bwd ms':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for height, dim in ((56, 192), (28, 384)):
        shape = f"(2, {4 * dim}, 1, {height * height})"
        inputs = make_inputs(2, 4 * dim, 1, height * height, "cpu", torch.float32)
        for name, scan in scan_backends("cpu").items():
            fwd, fwd_bwd = measure(scan, inputs, "cpu", repeats)
            print(f"| {'selective_scan':<22} | {shape:<20} | {name:<7} | {fwd * 1e3:>7.1f} | {fwd_bwd * 1e3:>10.1f} |")
        ordered = ordered_scan_inputs(2, dim, height)
        order = scan_order(CROSS_2D, height, height)
        for name in scan_backends("cpu"):
            def scan(*args: torch.Tensor, backend: str = name, **kwargs: object) -> torch.Tensor:
                return ordered_selective_scan(*args, order, backend=backend)

            fwd, fwd_bwd = measure(scan, ordered, "cpu", repeats)
            print(f"| {'ordered_selective_scan':<22} | {shape:<20} | {name:<7} | {fwd * 1e3:>7.1f} | "
                  f"{fwd_bwd * 1e3:>10.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS,
                        help="qmamba presets as name:backend, or swin_tiny / convnext_tiny")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per model and mode, alternated")
    parser.add_argument("--block-seconds", type=float, default=3.0,
                        help="each block's consecutive calls last at least this long (and 3 calls)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--infer-batch", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--scan-repeats", type=int, default=5)
    parser.add_argument("--no-scan", action="store_true", help="skip the scan op table")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as the qmamba command's process runs
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.models:
        heap = "freed memory kept for reuse (qmamba.heap)" if kept else "the C heap as set (qmamba.heap not applied)"
        model_table(args.models, args.rounds, args.size, args.infer_batch, args.train_batch, args.block_seconds, heap)
    if not args.no_scan:
        scan_table(args.scan_repeats)


if __name__ == "__main__":
    main()
