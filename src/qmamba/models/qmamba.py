"""The QMamba quality regressor: a vision-Mamba backbone and a quality head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["QMamba", "QualityHead"]


class QualityHead(nn.Module):
    """Pooled features -> one quality score.

    The default (``features=("pooled",)``, no hidden layer) is the paper's head as far as its parameter budget
    allows: global average pooling of the final normalised features and one Linear (769 / 1,025 parameters for
    T,S / B). Naming several stages (``stage1``, ``stage2``, ...) concatenates their globally pooled, LayerNorm'ed
    features -- a multi-scale option for ablations.

    Args:
        in_dims: widths of the selected features, in order.
        features: names of backbone features to pool (keys of ``forward_features``).
        hidden: optional hidden width of a GELU MLP before the regressor.
        dropout: dropout before the regressor.
    """

    def __init__(
        self,
        in_dims: list[int],
        features: tuple[str, ...] = ("pooled",),
        hidden: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.features = tuple(features)
        multi = len(self.features) > 1
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in in_dims) if multi else None
        width = sum(in_dims)
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers += [nn.Dropout(dropout), nn.Linear(width, 1)]
        self.regressor = nn.Sequential(*layers)
        for m in self.regressor:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        pooled = [features[name] if name == "pooled" else features[name].mean(dim=(2, 3)) for name in self.features]
        if self.norms is not None:
            pooled = [norm(p) for norm, p in zip(self.norms, pooled, strict=True)]
        return self.regressor(torch.cat(pooled, dim=-1)).squeeze(-1)


class QMamba(nn.Module):
    """Backbone + quality head; ``forward(images)`` maps (B, 3, H, W) to (B,) scores."""

    def __init__(self, backbone: nn.Module, head: QualityHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_features(self, images: Tensor) -> dict[str, Tensor]:
        return self.backbone.forward_features(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images))

    def num_params(self, include_head: bool = True) -> int:
        """Parameter count (the paper's counts are backbone-only: ``include_head=False``)."""
        modules = (self.backbone, self.head) if include_head else (self.backbone,)
        return sum(p.numel() for m in modules for p in m.parameters())
