"""Predicted-vs-MOS scatter figures for TensorBoard (matplotlib, headless)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["scatter_figure"]


def scatter_figure(preds: torch.Tensor, target: torch.Tensor, title: str, max_points: int = 2000) -> Any | None:
    """A matplotlib figure of predictions against ground truth with the y = x line; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    preds, target = preds.detach().float().cpu(), target.detach().float().cpu()
    if preds.numel() > max_points:
        keep = torch.randperm(preds.numel(), generator=torch.Generator().manual_seed(0))[:max_points]
        preds, target = preds[keep], target[keep]
    figure, axes = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    axes.scatter(target.numpy(), preds.numpy(), s=6, alpha=0.6)
    low = float(min(target.min(), preds.min()))
    high = float(max(target.max(), preds.max()))
    axes.plot([low, high], [low, high], color="gray", linewidth=1, linestyle="--")
    axes.set_xlabel("MOS (ground truth)")
    axes.set_ylabel("predicted")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure
