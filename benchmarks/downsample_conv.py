"""VMamba's downsampling convolutions (3x3, stride 2, channel-last) as oneDNN's convolution and as one matrix product
over their patches (:class:`qmamba.models.layers.PatchwiseConv2d`), and which of the two the layer picks.

    python benchmarks/downsample_conv.py                  # QMamba-T's three downsamplings, batches 1 2 4 8 (~3 min)
    python benchmarks/downsample_conv.py --batches 2 --modes train-fp32 train-bf16

Modes: ``train`` is a forward and a backward (gradients of the input, the weight and the bias), ``infer`` a forward
under ``torch.inference_mode``; ``bf16`` runs under bf16 autocast, as ``bf16-mixed`` training and ``qmamba score
--precision bf16`` do. Each figure is the median (min-max) over blocks of consecutive calls, the two alternated; the
ratio is the product's time over the convolution's, per block. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from scan_floor import block_times, ms
from torch import nn

from qmamba.heap import keep_freed_memory
from qmamba.machine import device_description
from qmamba.models.layers import PatchwiseConv2d

# QMamba-T's downsamplings at 224x224: (input channels, map side)
SHAPES = ((96, 56), (192, 28), (384, 14))
MODES = ("train-fp32", "train-bf16", "infer-fp32", "infer-bf16")


def calls(conv: PatchwiseConv2d, batch: int, side: int, mode: str) -> dict[str, Callable[[], object]]:
    """One call of each computation of ``conv`` on a channel-last batch, as ``mode`` runs it."""
    train, bf16 = mode.startswith("train"), mode.endswith("bf16")
    x = torch.randn(batch, side, side, conv.in_channels).permute(0, 3, 1, 2).requires_grad_(train)
    grad = torch.randn(conv(x).shape).to(torch.bfloat16 if bf16 else torch.float32)

    def run(compute: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def call() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.inference_mode(not train):
                y = compute(x)
            if train:
                torch.autograd.backward(y, grad, inputs=[x, *conv.parameters()])
                conv.zero_grad(set_to_none=True)
            return y

        return call

    return {"convolution": run(lambda x: nn.Conv2d.forward(conv, x)), "product": run(conv.patch_product)}


def table(shapes: tuple, batches: list[int], modes: list[str], blocks: int, block_seconds: float) -> None:
    print(f"\nVMamba's downsampling convolution (3x3, stride 2) on {device_description()}: ms per call, median "
          f"(min-max) of {blocks} blocks of at least {block_seconds:g} s; product / conv: per block")
    header = (f"| {'in -> out, map':<16} | {'batch':>5} | {'positions':>9} | {'mode':<10} | {'convolution ms':>20} "
              f"| {'product ms':>20} | {'product / conv':>18} | {'picked':<11} |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for channels, side in shapes:
        torch.manual_seed(0)
        conv = PatchwiseConv2d(channels, 2 * channels, 3, 2, 1).to(memory_format=torch.channels_last)
        for batch in batches:
            x = torch.empty(batch, channels, side, side)
            positions = batch * ((side + 1) // 2) ** 2
            picked = "product" if conv.as_product(x) else "convolution"
            for mode in modes:
                times = block_times(calls(conv, batch, side, mode), blocks, block_seconds)
                ratios = [p / c for p, c in zip(times["product"], times["convolution"])]
                ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                print(f"| {f'{channels} -> {2 * channels}, {side}':<16} | {batch:>5} | {positions:>9} | {mode:<10} "
                      f"| {ms(times['convolution']):>20} | {ms(times['product']):>20} | {ratio:>18} | {picked:<11} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--block-seconds", type=float, default=0.3)
    parser.add_argument("--shape", nargs=2, type=int, action="append", metavar=("CHANNELS", "SIDE"),
                        help="another downsampling instead of QMamba-T's: input channels, map side (repeatable)")
    args = parser.parse_args()
    keep_freed_memory()  # as the qmamba command's process runs
    table(tuple(map(tuple, args.shape)) if args.shape else SHAPES, args.batches, args.modes, args.blocks,
          args.block_seconds)


if __name__ == "__main__":
    main()
