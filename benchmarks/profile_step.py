"""Where QMamba-T's time goes, next to Swin-T: the operations (CPU) or kernels (CUDA) that take the most time in
inference and in a training step at 224x224, summed by name, from ``torch.profiler``; and the share of layout copies
and fills (``aten::copy_``, ``aten::fill_``), which a channel-last model should keep small.

    python benchmarks/profile_step.py                        # CPU: fp32, batch 2 (training) and 8 (inference)
    python benchmarks/profile_step.py --precision bf16       # CPU: under bf16 autocast (inference as score runs it)
    python benchmarks/profile_step.py --device cuda          # CUDA: bf16 autocast, batch 64 (benchmarks/gpu_check.sh)
    python benchmarks/profile_step.py --rows 25 --models qmamba_tiny --train-only

CPU times are operators' self times (the fused scan is ``qmamba::cpu_scan`` and its backward, in inference
``qmamba::cpu_scan_normalized`` with SS2D's output LayerNorm); CUDA times are kernel times. In bf16, inference
profiles a copy of the model prepared as ``qmamba score --precision bf16`` prepares it
(:func:`qmamba.models.low_precision.prepare_bf16_inference`: matrix-product weights in bf16, on the CPU scans
returning bf16); the training step is ``bf16-mixed``'s plain autocast. Profile on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

from qmamba.heap import keep_freed_memory
from qmamba.models import build_model
from qmamba.models.low_precision import prepare_bf16_inference
from qmamba.training.optimizers import fused_on_cpu

LAYOUT_OPS = ("aten::copy_", "aten::fill_")
STEPS = 5


def profile_step(model: torch.nn.Module, device: str, batch: int, size: int, train: bool, rows: int,
                 bf16: bool) -> None:
    images = torch.randn(batch, 3, size, size, device=device)
    # stepped as `qmamba fit` steps it: fused on the CPU (torch's default there is a loop over the parameters)
    optimizer = fused_on_cpu(lambda groups: torch.optim.AdamW(groups, lr=1e-4),
                             lambda: [{"params": list(model.parameters())}]) if train else None
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    cuda = device == "cuda"
    model.train(train)

    def step() -> None:
        with autocast, torch.set_grad_enabled(train):
            out = model(images).float()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            out.square().mean().backward()
            optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(STEPS):
            step()
    events = prof.key_averages()

    def ms(event) -> float:  # noqa: ANN001
        return (event.self_device_time_total if cuda else event.self_cpu_time_total) / STEPS / 1000

    total = sum(ms(e) for e in events)
    layout = {name: sum(ms(e) for e in events if e.key == name) for name in LAYOUT_OPS}
    calls = {name: sum(e.count for e in events if e.key == name) // STEPS for name in LAYOUT_OPS}
    print(f"\n{type(model).__name__} {'training step' if train else 'inference'}{' (bf16)' if bf16 else ''}: "
          f"{total:.1f} ms of "
          f"{'CUDA' if cuda else 'CPU operator'} time per batch of {batch}; "
          + ", ".join(f"{name} {layout[name] / total:.1%} ({calls[name]} calls)" for name in LAYOUT_OPS))
    print(f"{'operation':<90} {'ms/step':>8} {'share':>6} {'calls':>6}")
    for e in sorted(events, key=ms, reverse=True)[:rows]:
        print(f"{e.key[:90]:<90} {ms(e):>8.2f} {ms(e) / total:>6.1%} {e.count // STEPS:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, help="training batch (default 2 on the CPU, 64 on CUDA)")
    parser.add_argument("--inference-batch", type=int, help="default 8 on the CPU, the training batch on CUDA")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--models", nargs="+", default=["qmamba_tiny", "swin_tiny"])
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="bf16 autocast or none (default: bf16 on CUDA)")
    args = parser.parse_args()
    keep_freed_memory()  # as the qmamba command's process runs
    cuda = args.device == "cuda"
    bf16 = (args.precision or ("bf16" if cuda else "fp32")) == "bf16"
    batch = args.batch or (64 if cuda else 2)
    inference_batch = args.inference_batch or (batch if cuda else 8)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for name in args.models:
        if name == "swin_tiny":
            try:
                import timm
            except ImportError:
                print("timm not installed (pip install -e '.[benchmark]'): no Swin-T table")
                continue
            model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=1)
        else:
            model = build_model(name)
        model = model.to(args.device)
        print(f"\n===== {name}")
        for train in (True,) if args.train_only else (False, True):
            profiled = model
            if bf16 and not train:  # a copy: the training step needs the fp32 weights
                profiled = prepare_bf16_inference(copy.deepcopy(model), torch.device(args.device))
            profile_step(profiled, args.device, batch if train else inference_batch, args.size, train, args.rows, bf16)
            del profiled
        del model
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
