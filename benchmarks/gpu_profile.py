"""Where QMamba-T's GPU time goes, next to Swin-T: the CUDA kernels that take the most time in inference and in a
training step (bf16 autocast, batch 64, 224x224), summed by kernel name, from ``torch.profiler``.

    python benchmarks/gpu_profile.py                 # on a CUDA machine (device tool: see benchmarks/gpu_check.sh)
    python benchmarks/gpu_profile.py --rows 25 --batch 32

Swin-T runs about twice as fast as QMamba-T on an H200 (README, Benchmarks); this table says which operations make
the difference (the selective scan, the cross-scan copies, layer norms, the depthwise convolution, ...).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from qmamba.models import build_model


def profile_step(model: torch.nn.Module, batch: int, size: int, train: bool, rows: int) -> None:
    images = torch.randn(batch, 3, size, size, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    model.train(train)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(train):
            out = model(images).float()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            out.square().mean().backward()
            optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 5 / 1000
    print(f"\n{type(model).__name__} {'training step' if train else 'inference'}: {total:.1f} ms of CUDA time per "
          f"batch of {batch}")
    print(f"{'kernel':<90} {'ms/step':>8} {'share':>6} {'calls':>6}")
    for e in sorted(events, key=lambda e: e.device_time_total, reverse=True)[:rows]:
        ms = e.device_time_total / 5 / 1000
        print(f"{e.key[:90]:<90} {ms:>8.2f} {ms / total:>6.1%} {e.count // 5:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    models = {"qmamba_tiny": lambda: build_model("qmamba_tiny")}
    try:
        import timm

        models["swin_tiny"] = lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=1)
    except ImportError:
        print("timm not installed: no Swin-T table")
    for name, make in models.items():
        model = make().cuda()
        print(f"\n===== {name}")
        for train in (False, True):
            profile_step(model, args.batch, args.size, train, args.rows)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
