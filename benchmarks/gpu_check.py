"""GPU check: the fused scan backends agree with the torch scan on QMamba-T; throughput and memory vs Swin-T.

    python benchmarks/gpu_check.py                       # on a CUDA machine (see gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu --batch 2 --size 64 --steps 1   # smoke test of the script itself

1. Agreement: one QMamba-T, weights shared, run with each fused GPU backend (``cuda`` when mamba-ssm imports,
   ``triton``) and with ``torch``: relative error of the scores and of every parameter gradient, in fp32 and under
   bf16 autocast.
2. Throughput (img/s at --size, bf16 autocast) and peak memory: inference and a full training step (forward,
   backward, AdamW) of QMamba-T with each backend next to timm's swin_tiny_patch4_window7_224, in the same process.
3. ``qmamba fit`` through the real CLI: QMamba-T, bf16-mixed, --fit-steps steps on generated 1024x768 JPEGs in
   KonIQ-10k's layout (0 skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from qmamba.models import build_model, set_scan_backend
from qmamba.ops.selective_scan import cuda_selective_scan_available, triton_selective_scan_available


def gpu_backends(device: str) -> list[str]:
    """The fused scan backends that run on ``device`` here."""
    if device != "cuda":
        return []
    return [name for name, ok in (("cuda", cuda_selective_scan_available()),
                                  ("triton", triton_selective_scan_available())) if ok]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def agreement(device: str, batch: int, size: int) -> None:
    fused = gpu_backends(device)
    if not fused:
        print("agreement: skipped (needs CUDA and a fused GPU backend: mamba-ssm or triton)")
        return
    torch.manual_seed(0)
    model = build_model("qmamba_tiny").to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    print(f"{'backend':<8} {'precision':<10} {'scores rel err':>15} {'max grad rel err':>17} {'worst parameter':<45}")
    for backend, precision in ((b, p) for b in fused for p in ("fp32", "bf16")):
        results = {}
        for name in (backend, "torch"):
            set_scan_backend(model, name)
            model.zero_grad(set_to_none=True)
            autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16"
                        else contextlib.nullcontext())
            with autocast:
                scores = model(images)
            scores.float().sum().backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            results[name] = (scores.detach().float(), grads)
        (s_fused, g_fused), (s_torch, g_torch) = results[backend], results["torch"]
        errors = {n: rel(g_fused[n], g_torch[n]) for n in g_torch}
        worst = max(errors, key=errors.get)
        print(f"{backend:<8} {precision:<10} {rel(s_fused, s_torch):>15.2e} {errors[worst]:>17.2e} {worst:<45}")


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
    parser.add_argument("--fit-steps", type=int, default=50, help="qmamba fit steps through the CLI (0: skip)")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
              f"mamba-ssm kernel: {cuda_selective_scan_available()}  triton: {triton_selective_scan_available()}")
    agreement(args.device, batch=min(args.batch, 8), size=args.size)

    models = {f"qmamba_tiny ({backend} scan)": (lambda b=backend: build_model("qmamba_tiny", scan_backend=b))
              for backend in [*gpu_backends(args.device), "auto", "torch"]}
    try:
        import timm

        models["swin_tiny_patch4_window7_224"] = lambda: timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, num_classes=1, img_size=args.size)
    except ImportError:
        print("timm not installed: Swin-T baseline skipped")
    print(f"\nthroughput, bf16 autocast, batch {args.batch}, {args.size}x{args.size}")
    print(f"{'model':<32} {'params M':>9} {'train img/s':>12} {'infer img/s':>12} {'peak train GiB':>15}")
    for name, make in models.items():
        model = make().to(args.device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train = throughput(model, args.device, args.batch, args.size, args.steps, train=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
        infer = throughput(model, args.device, args.batch, args.size, args.steps, train=False)
        print(f"{name:<32} {params:>9.2f} {train:>12.1f} {infer:>12.1f} {peak:>15.2f}")
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.fit_steps:
        fit_check(args.device, args.fit_steps, args.batch)


def fit_check(device: str, steps: int, batch: int) -> None:
    """QMamba-T trained through ``qmamba fit`` (bf16-mixed on a GPU) on generated JPEGs; prints the wall time."""
    from score import fit_qmamba_tiny, make_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp) / "koniq", 2 * max(8, batch))  # 6 in 8 go to training: at least one batch
        start = time.perf_counter()
        ckpt = fit_qmamba_tiny(Path(tmp) / "fit", Path(tmp) / "koniq", steps=steps, batch=batch,
                               accelerator="gpu" if device == "cuda" else "cpu",
                               precision="bf16-mixed" if device == "cuda" else "32-true")
        seconds = time.perf_counter() - start
        print(f"\nqmamba fit: {steps} steps of batch {batch} in {seconds:.1f} s (start-up included), "
              f"checkpoint written: {ckpt.is_file()}")


if __name__ == "__main__":
    main()
