"""Regression losses for IQA on unit-scale scores, with optional correlation and ranking terms."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IQALoss"]


class IQALoss(nn.Module):
    """``base(pred, target) + plcc_weight * (1 - PLCC) / 2 + rank_weight * pairwise margin-ranking loss``.

    The correlation and ranking terms act within a batch: they reward getting the order and the linear trend
    right, which is what SRCC/PLCC measure, while the base loss anchors the scale.
    """

    def __init__(self, base: Literal["smoothl1", "l1", "mse"] = "smoothl1", smoothl1_beta: float = 0.1,
                 plcc_weight: float = 0.0, rank_weight: float = 0.0, rank_margin: float = 0.0) -> None:
        super().__init__()
        if base not in ("smoothl1", "l1", "mse"):
            raise ValueError(f"loss must be smoothl1, l1 or mse, got {base!r}")
        self.base, self.beta = base, smoothl1_beta
        self.plcc_weight, self.rank_weight, self.rank_margin = plcc_weight, rank_weight, rank_margin

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.base == "smoothl1":
            loss = F.smooth_l1_loss(pred, target, beta=self.beta)
        elif self.base == "l1":
            loss = F.l1_loss(pred, target)
        else:
            loss = F.mse_loss(pred, target)
        if self.plcc_weight and pred.numel() > 1:
            p, t = pred - pred.mean(), target - target.mean()
            plcc = (p * t).sum() / (p.norm() * t.norm()).clamp_min(1e-8)
            loss = loss + self.plcc_weight * (1.0 - plcc) / 2.0
        if self.rank_weight:
            sign = torch.sign(target[:, None] - target[None, :])
            ordered = sign != 0  # pairs with a defined order
            if ordered.any():
                hinge = F.relu(self.rank_margin - sign * (pred[:, None] - pred[None, :]))
                loss = loss + self.rank_weight * hinge[ordered].mean()
        return loss
