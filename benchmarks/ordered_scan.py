"""SS2D's scan as QMamba-T runs it, per backend, at its four stage shapes: the op table of the GPU check.

    python benchmarks/ordered_scan.py                          # CUDA: triton, cuda (mamba-ssm + gathers), torch
    python benchmarks/ordered_scan.py --tiles 64x32x4 128x32x4 32x32x4   # also other Triton tiles (chunk x ch x warps)
    python benchmarks/ordered_scan.py --device cpu --batch 2 --stages 2 3   # CPU: the cpu and torch backends

What a row times is ``ordered_selective_scan`` exactly as SS2D calls it: channel-last tokens (batch, H*W, D), the
rank-R step-size factor (batch, K, H*W, R) with ``dt_projs_weight``, B and C per direction, the four cross-scan
directions merged. The fused backends (``triton``, ``cpu``) read tokens in scan order and expand the step sizes per
step; ``cuda`` and ``torch`` expand the step sizes, gather the four sequences, scan and scatter back. The row
``cuda op alone`` is mamba-ssm's ``selective_scan_fn`` on sequences already gathered (no expansion, gathers or
scatter): the floor the issue measures the Triton kernel against. Forward under ``no_grad`` and forward + backward,
best of --repeats, each in ms, and each row's ratio to ``cuda op alone`` (or to the first row without mamba-ssm).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from scan import timed  # benchmarks/scan.py, next to this script

from qmamba.heap import keep_freed_memory
from qmamba.ops import ordered_selective_scan, selective_scan
from qmamba.ops.scan_order import CROSS_2D, scan_order
from qmamba.ops.selective_scan import (
    cpu_selective_scan_available,
    cuda_selective_scan_available,
    triton_selective_scan_available,
)

# QMamba-T at 224x224: (map side, d_inner); dt_rank = ceil(dim / 16) with dim = d_inner / 2; d_state 1
STAGES = [(56, 192), (28, 384), (14, 768), (7, 1536)]


def stage_inputs(batch: int, side: int, inner: int, device: str, dtype: torch.dtype) -> tuple[list[torch.Tensor],
                                                                                              torch.Tensor]:
    """SS2D's scan operands at one stage (requiring gradients) and its dt_projs_weight (K, D, R)."""
    g = torch.Generator().manual_seed(0)
    k, tokens, rank = 4, side * side, math.ceil(inner / 2 / 16)
    tensors = [
        torch.randn(batch, tokens, inner, generator=g),  # u
        torch.randn(batch, k, tokens, rank, generator=g),  # the step sizes' rank-R factor
        -torch.exp(torch.zeros(k * inner, 1)),  # A (VMamba's init for d_state 1)
        torch.randn(batch, k, tokens, 1, generator=g),  # B
        torch.randn(batch, k, tokens, 1, generator=g),  # C
        torch.ones(k * inner),  # D
        torch.rand(k * inner, generator=g) * 4 - 6,  # delta_bias (softplus^-1 of dt in [1e-3, 1e-1]-ish)
    ]
    half = {0, 1, 3, 4}
    inputs = [(t.to(dtype) if i in half else t).to(device).requires_grad_() for i, t in enumerate(tensors)]
    proj = (torch.randn(k, inner, rank, generator=g) / rank**0.5).to(device, dtype).requires_grad_()
    return inputs, proj


def best_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()  # warm-up: compilation, kernel load, allocator
    return timed(fn, device, repeats) * 1e3


def ordered_row(backend: str, inputs: list[torch.Tensor], proj: torch.Tensor, order, device: str,
                repeats: int) -> tuple[float, float]:
    def run() -> torch.Tensor:
        return ordered_selective_scan(*inputs, order, merge=True, backend=backend, delta_proj=proj)

    def forward() -> None:
        with torch.no_grad():
            run()

    def forward_backward() -> None:
        run().float().sum().backward()

    return best_ms(forward, device, repeats), best_ms(forward_backward, device, repeats)


def op_alone_row(inputs: list[torch.Tensor], proj: torch.Tensor, order, repeats: int) -> tuple[float, float]:
    """mamba-ssm's op on the four sequences, gathered and expanded beforehand (not timed)."""
    u, factor, A, B, C, D, bias = inputs
    batch, k, inner = u.shape[0], len(order.directions), u.shape[-1]
    with torch.no_grad():
        seqs = order.scan(u.transpose(1, 2)).reshape(batch, k * inner, order.length)
        delta = order.scan_each((factor @ proj.transpose(1, 2)).transpose(2, 3)).reshape(batch, k * inner, -1)
        Bs, Cs = (order.scan_each(x.transpose(2, 3)).contiguous() for x in (B, C))
    operands = [t.detach().requires_grad_() for t in (seqs, delta, A, Bs, Cs, D, bias)]

    def run() -> torch.Tensor:
        return selective_scan(*operands[:5], operands[5], operands[6], True, backend="cuda")

    def forward() -> None:
        with torch.no_grad():
            run()

    def forward_backward() -> None:
        run().float().sum().backward()

    return best_ms(forward, "cuda", repeats), best_ms(forward_backward, "cuda", repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiles", nargs="*", default=[],
                        help="extra Triton tiles CHUNKxCHANNELSxWARPS to time (the default tile always runs)")
    args = parser.parse_args()
    keep_freed_memory()  # as the qmamba command's process runs
    dtype = getattr(torch, args.dtype)
    cuda = args.device == "cuda"
    rows: list[tuple[str, Callable[..., tuple[float, float]]]] = []
    if cuda and cuda_selective_scan_available():
        rows.append(("cuda op alone", lambda i, p, o: op_alone_row(i, p, o, args.repeats)))
        rows.append(("cuda + gathers", lambda i, p, o: ordered_row("cuda", i, p, o, args.device, args.repeats)))
    if cuda and triton_selective_scan_available():
        from qmamba.ops import triton_scan

        default = triton_scan.TILE
        tiles = [default] + [triton_scan.Tile(*map(int, spec.split("x"))) for spec in args.tiles]

        def triton_row(tile):  # noqa: ANN001, ANN202
            def run(i, p, o):  # noqa: ANN001, ANN202
                triton_scan.TILE = tile
                try:
                    return ordered_row("triton", i, p, o, args.device, args.repeats)
                finally:
                    triton_scan.TILE = default
            return run

        rows += [(f"triton {t.chunk}x{t.channels}x{t.warps}", triton_row(t)) for t in tiles]
    if not cuda and cpu_selective_scan_available():
        rows.append(("cpu", lambda i, p, o: ordered_row("cpu", i, p, o, args.device, args.repeats)))
    rows.append(("torch", lambda i, p, o: ordered_row("torch", i, p, o, args.device, args.repeats)))

    name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"SS2D scan (4 directions merged, rank-R step sizes), {args.dtype}, batch {args.batch}; {name}; "
          f"torch {torch.__version__}")
    print("| stage (B, K*D, N, L) | backend | fwd ms | fwd+bwd ms | fwd x | fwd+bwd x |")
    print("| --- | --- | --- | --- | --- | --- |")
    for stage in args.stages:
        side, inner = STAGES[stage]
        inputs, proj = stage_inputs(args.batch, side, inner, args.device, dtype)
        order = scan_order(CROSS_2D, side, side)
        shape = f"{stage}: ({args.batch}, {4 * inner}, 1, {side * side})"
        base = None
        for label, row in rows:
            try:
                fwd, both = row(inputs, proj, order)
            except Exception as err:  # one failing backend does not hide the others' numbers
                print(f"| {shape} | {label} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} | | | |")
                continue
            base = base or (fwd, both)
            print(f"| {shape} | {label} | {fwd:.3f} | {both:.3f} | {fwd / base[0]:.2f} | {both / base[1]:.2f} |")
        del inputs, proj
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
