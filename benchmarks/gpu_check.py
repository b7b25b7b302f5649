"""GPU check: the fused scan backends agree with the torch scan on whole models; throughput and memory vs Swin-T.

    python benchmarks/gpu_check.py agreement               # on a CUDA machine (see gpu_check.sh)
    python benchmarks/gpu_check.py models                  # eager table
    python benchmarks/gpu_check.py models --compiled       # torch.compile table (compile time reported)
    python benchmarks/gpu_check.py fit
    python benchmarks/gpu_check.py models --device cpu --batches 2 --size 64 --steps 1 --models qmamba_test  # smoke

1. ``agreement``: QMamba-T and LQMamba-T, weights shared, run with each fused GPU backend (``cuda`` when mamba-ssm
   imports, ``triton``) and with ``torch``: relative error of the scores and of every parameter gradient, in fp32
   and under bf16 autocast.
2. ``models``: img/s at --size (bf16 autocast) and peak training memory, inference and a full training step
   (forward, backward, AdamW) of each model with each backend next to timm's swin_tiny_patch4_window7_224, at each
   of --batches, in one process; with ``--compiled`` every model is ``torch.compile``'d (Swin-T too) and the compile
   time of the first training and inference step is reported. Ratios to Swin-T in the same mode and batch.
3. ``fit``: ``qmamba fit`` through the real CLI: QMamba-T, bf16-mixed, --fit-steps steps on generated 1024x768
   JPEGs in KonIQ-10k's layout.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
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


def agreement(device: str, batch: int, size: int, model_names: list[str]) -> None:
    fused = gpu_backends(device)
    if not fused:
        print("agreement: skipped (needs CUDA and a fused GPU backend: mamba-ssm or triton)")
        return
    print(f"{'model':<14} {'backend':<8} {'precision':<10} {'scores rel err':>15} {'max grad rel err':>17} "
          f"{'worst parameter':<45}")
    for model_name in model_names:
        torch.manual_seed(0)
        model = build_model(model_name).to(device)
        images = torch.randn(batch, 3, size, size, device=device)
        model_agreement(model_name, model, images, fused)


def model_agreement(model_name: str, model: torch.nn.Module, images: torch.Tensor, fused: list[str]) -> None:
    for backend, precision in ((b, p) for b in fused for p in ("fp32", "bf16")):
        results = {}
        for name in (backend, "torch"):
            set_scan_backend(model, name)
            model.zero_grad(set_to_none=True)
            autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16) if precision == "bf16"
                        else contextlib.nullcontext())
            with autocast:
                scores = model(images)
            scores.float().sum().backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            results[name] = (scores.detach().float(), grads)
        (s_fused, g_fused), (s_torch, g_torch) = results[backend], results["torch"]
        errors = {n: rel(g_fused[n], g_torch[n]) for n in g_torch}
        worst = max(errors, key=errors.get)
        print(f"{model_name:<14} {backend:<8} {precision:<10} {rel(s_fused, s_torch):>15.2e} {errors[worst]:>17.2e} "
              f"{worst:<45}")


def throughput(model: torch.nn.Module, device: str, batch: int, size: int, steps: int, train: bool
               ) -> tuple[float, float]:
    """(img/s, seconds of the first step: compilation when the model is compiled)."""
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

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    synchronize()
    first = time.perf_counter() - start
    step()  # warm-up: kernel loading, cudnn autotune, allocator
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return batch * steps / (time.perf_counter() - start), first


def model_table(device: str, batches: list[int], size: int, steps: int, model_names: list[str],
                backends: list[str], compiled: bool) -> None:
    makers: dict[str, Callable[[], torch.nn.Module]] = {
        f"{name} ({backend})": (lambda n=name, b=backend: build_model(n, scan_backend=b))
        for name in model_names for backend in backends}
    try:
        import timm

        makers["swin_tiny (timm)"] = lambda: timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, num_classes=1, img_size=size)
    except ImportError:
        print("timm not installed: Swin-T baseline skipped")
    mode = "torch.compile" if compiled else "eager"
    print(f"\n{mode}, bf16 autocast, {size}x{size}; x: ratio to Swin-T in the same mode and batch")
    print("| model (scan) | batch | train img/s | train x | infer img/s | infer x | peak train GiB |"
          + (" compile s (train + infer) |" if compiled else ""))
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if compiled else ""))
    for batch in batches:
        results = {}
        for name, make in makers.items():
            try:
                results[name] = model_row(make, device, batch, size, steps, compiled)
            except Exception as err:  # one failing row does not hide the others
                print(f"| {name} | {batch} | failed: {type(err).__name__}: {str(err).splitlines()[0][:150]} |")
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
        swin = results.get("swin_tiny (timm)")
        for name, (train, infer, peak, compile_s) in results.items():
            ratios = (f"{train / swin[0]:.2f}", f"{infer / swin[1]:.2f}") if swin else ("-", "-")
            print(f"| {name} | {batch} | {train:.1f} | {ratios[0]} | {infer:.1f} | {ratios[1]} | {peak:.2f} |"
                  + (f" {compile_s:.0f} |" if compiled else ""))


def model_row(make: Callable[[], torch.nn.Module], device: str, batch: int, size: int, steps: int, compiled: bool
              ) -> tuple[float, float, float, float]:
    """(train img/s, infer img/s, peak train GiB, compile seconds) of one model."""
    model = make().to(device)
    runner = torch.compile(model, dynamic=False) if compiled else model  # static shapes: one graph per mode
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train, first_train = throughput(runner, device, batch, size, steps, train=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    infer, first_infer = throughput(runner, device, batch, size, steps, train=False)
    return train, infer, peak, first_train + first_infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["agreement", "models", "fit"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["qmamba_tiny", "lqmamba_tiny"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="scan backends of the model table (default: the fused GPU ones and torch)")
    parser.add_argument("--compiled", action="store_true", help="torch.compile every model of the table")
    parser.add_argument("--fit-steps", type=int, default=50, help="qmamba fit steps through the CLI")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
              f"mamba-ssm kernel: {cuda_selective_scan_available()}  triton: {triton_selective_scan_available()}")
    if args.table == "agreement":
        agreement(args.device, batch=min(args.batches[0], 8), size=args.size, model_names=args.models)
    elif args.table == "models":
        backends = args.backends or [*gpu_backends(args.device), "torch"]
        model_table(args.device, args.batches, args.size, args.steps, args.models, backends, args.compiled)
    else:
        fit_check(args.device, args.fit_steps, args.batches[0])


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
