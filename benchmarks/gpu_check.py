"""GPU check: the ``cuda`` and ``torch`` scan backends agree on QMamba-T; training/inference throughput vs Swin-T.

    python benchmarks/gpu_check.py                       # on a CUDA machine (see gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu --batch 2 --size 64 --steps 1   # smoke test of the script itself

1. Agreement: one QMamba-T, weights shared, run with ``scan_backend="cuda"`` and ``"torch"``: relative error of the
   scores and of every parameter gradient, in fp32 and under bf16 autocast.
2. Throughput (img/s at --size, bf16 autocast): inference and a full training step (forward, backward, AdamW) of
   QMamba-T next to timm's swin_tiny_patch4_window7_224 measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from qmamba.models import build_model, set_scan_backend
from qmamba.ops import cuda_selective_scan_available


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def agreement(device: str, batch: int, size: int) -> None:
    if device != "cuda" or not cuda_selective_scan_available():
        print("agreement: skipped (needs CUDA and mamba-ssm's selective_scan_cuda)")
        return
    torch.manual_seed(0)
    model = build_model("qmamba_tiny").to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    print(f"{'precision':<10} {'scores rel err':>15} {'max grad rel err':>17} {'worst parameter':<45}")
    for precision in ("fp32", "bf16"):
        results = {}
        for backend in ("cuda", "torch"):
            set_scan_backend(model, backend)
            model.zero_grad(set_to_none=True)
            autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16"
                        else contextlib.nullcontext())
            with autocast:
                scores = model(images)
            scores.float().sum().backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            results[backend] = (scores.detach().float(), grads)
        (s_cuda, g_cuda), (s_torch, g_torch) = results["cuda"], results["torch"]
        errors = {n: rel(g_cuda[n], g_torch[n]) for n in g_torch}
        worst = max(errors, key=errors.get)
        print(f"{precision:<10} {rel(s_cuda, s_torch):>15.2e} {errors[worst]:>17.2e} {worst:<45}")


def throughput(model: torch.nn.Module, device: str, batch: int, size: int, steps: int, train: bool) -> float:
    images = torch.randn(batch, 3, size, size, device=device)
    target = torch.randn(batch, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train(train)
    autocast = torch.autocast(device, dtype=torch.bfloat16)

    def step() -> None:
        with autocast, torch.set_grad_enabled(train):
            out = model(images).reshape(-1)  # (B,) scores; Swin with one class gives (B, 1)
        if train:
            loss = torch.nn.functional.smooth_l1_loss(out.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for _ in range(2):  # warm-up: kernel loading, cudnn autotune, allocator
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
              f"mamba-ssm kernel: {cuda_selective_scan_available()}")
    agreement(args.device, batch=min(args.batch, 8), size=args.size)

    models = {"qmamba_tiny (auto scan)": lambda: build_model("qmamba_tiny", scan_backend="auto"),
              "qmamba_tiny (torch scan)": lambda: build_model("qmamba_tiny", scan_backend="torch")}
    try:
        import timm

        models["swin_tiny_patch4_window7_224"] = lambda: timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, num_classes=1, img_size=args.size)
    except ImportError:
        print("timm not installed: Swin-T baseline skipped")
    print(f"\nthroughput, bf16 autocast, batch {args.batch}, {args.size}x{args.size}")
    print(f"{'model':<32} {'params M':>9} {'train img/s':>12} {'infer img/s':>12}")
    for name, make in models.items():
        model = make().to(args.device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        train = throughput(model, args.device, args.batch, args.size, args.steps, train=True)
        infer = throughput(model, args.device, args.batch, args.size, args.steps, train=False)
        print(f"{name:<32} {params:>9.2f} {train:>12.1f} {infer:>12.1f}")
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
