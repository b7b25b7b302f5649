"""Small building blocks shared by the backbones."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmamba.ops import cpu_fusion

__all__ = ["DropPath", "drop_path_rates", "Mlp", "PatchwiseConv2d", "Permute", "RMSNorm", "no_weight_decay",
           "trunc_normal_init"]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p`` while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(max_rate: float, n_blocks: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``max_rate`` over the blocks."""
    return [max_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module, so layout changes keep the official Sequential indices."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


# Weights per output position from which PatchwiseConv2d computes as a matrix product: on 2 AMX Xeon cores, at
# QMamba-T's last downsampling (2.65 M weights) the product took 0.56-0.81x the convolution's time in training (fp32
# and bf16 autocast) and 0.70-0.96x in inference with 49 to 196 output positions (13,500 or more weights each),
# 0.82-1.06x with 392 (6,800); at the downsampling before it (0.66 M weights) the convolution was the faster from 196
# positions (3,400 weights each) on. `python benchmarks/downsample_conv.py` measures both on the machine at hand.
PATCH_PRODUCT_WEIGHTS_PER_POSITION = 8192


class PatchwiseConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (the same parameters and function) that, in eager CPU execution, computes as one matrix product
    over its input's patches where its output map has few positions for the size of its weight.

    oneDNN's convolution reorders its weight into a blocked layout at every call, and in training again for the
    backward and for the weight's gradient: at VMamba's last downsampling (384 -> 768 channels on a 14 x 14 map) that
    costs more than the arithmetic at small batches. The product reads the channel-last weight (OHWI, as VMamba
    stores its convolutions') as it is and gathers the patches from the channel-last input (the measurements are at
    ``PATCH_PRODUCT_WEIGHTS_PER_POSITION``). Compiling, exporting, tracing, FLOP counting and every other backend see
    the convolution. The two differ by rounding only (summation order)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.patch_product(x) if self.as_product(x) else super().forward(x)

    def as_product(self, x: Tensor) -> bool:
        """Whether ``forward(x)`` computes as the matrix product (:meth:`patch_product`)."""
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or \
                isinstance(self.padding, str) or x.dim() != 4 or not cpu_fusion.eager_cpu(x):
            return False
        positions = x.shape[0] * math.prod(self._output_size(x))
        return positions * PATCH_PRODUCT_WEIGHTS_PER_POSITION <= self.weight.numel()

    def patch_product(self, x: Tensor) -> Tensor:
        """The convolution of ``x`` (B, C, H, W) as one matrix product over its patches, channel-last in and out."""
        batch, channels = x.shape[:2]
        (out_h, out_w), (kh, kw), (sh, sw), (ph, pw) = self._output_size(x), self.kernel_size, self.stride, self.padding
        padded = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view of a channel-last map
        if ph or pw:
            padded = F.pad(padded, (0, 0, pw, pw, ph, ph))
        b, h, w, c = padded.stride()
        patches = padded.as_strided((batch, out_h, out_w, kh, kw, channels), (b, sh * h, sw * w, h, w, c))
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)  # (O, kh kw C): a view of OHWI
        return F.linear(patches.reshape(batch, out_h, out_w, -1), weight, self.bias).permute(0, 3, 1, 2)

    def _output_size(self, x: Tensor) -> tuple[int, int]:
        return tuple((size + 2 * pad - kernel) // stride + 1 for size, pad, kernel, stride in
                     zip(x.shape[2:], self.padding, self.kernel_size, self.stride))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, on channel-last tensors; plus a residual when given, summed inside fc2
    where that can be fused (:mod:`qmamba.ops.cpu_fusion`)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.training and self.drop.p:
            y = self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
            return y if residual is None else residual + y
        return cpu_fusion.linear(cpu_fusion.linear(x, self.fc1, self.act), self.fc2, residual=residual)


def no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Flag a parameter (an SSM's A_logs or Ds) to be excluded from weight decay, as mamba-ssm and VMamba do."""
    param._no_weight_decay = True  # type: ignore[attr-defined]
    return param


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """VMamba's init: truncated-normal Linear weights with zero bias, unit LayerNorms; convs keep PyTorch's."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, RMSNorm)):
        nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Vim's block norm), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)
