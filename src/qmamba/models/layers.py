"""Small building blocks shared by the backbones."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qmamba.ops import cpu_fusion

__all__ = ["DropPath", "drop_path_rates", "Mlp", "Permute", "RMSNorm", "no_weight_decay", "trunc_normal_init"]


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
