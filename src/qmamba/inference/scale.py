"""Score scales: each dataset's native scores mapped to [0, 1] with higher = better, and back.

Universal training needs one scale and direction across datasets; metrics and outputs are reported on the native
scale (so a DMOS dataset's predictions are DMOS again). A checkpoint records the scale of every training dataset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plain arithmetic on either: `qmamba score --help` need not import torch
    import numpy as np
    import torch

__all__ = ["ScoreScale"]


class ScoreScale:
    """A native score range and direction; ``to_unit`` maps scores into [0, 1] higher-is-better, ``to_native`` back."""

    def __init__(self, low: float, high: float, lower_better: bool) -> None:
        if not high > low:
            raise ValueError(f"score range must have high > low, got ({low}, {high})")
        self.low, self.high, self.lower_better = float(low), float(high), bool(lower_better)

    def to_unit(self, score: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        unit = (score - self.low) / (self.high - self.low)
        return 1.0 - unit if self.lower_better else unit

    def to_native(self, unit: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        unit = 1.0 - unit if self.lower_better else unit
        return unit * (self.high - self.low) + self.low

    @property
    def direction(self) -> str:
        return "lower is better" if self.lower_better else "higher is better"

    def out_of_range(self, score: float) -> str:
        """``above range`` / ``below range`` for a prediction outside the scale, else an empty string."""
        return "above range" if score > self.high else "below range" if score < self.low else ""

    def report(self, score: float, clip: bool) -> tuple[float, str]:
        """The score to report and its flag: out-of-range predictions are kept and flagged, or clipped when asked
        (the flag then keeps the prediction)."""
        flag = self.out_of_range(score)
        if flag and clip:
            return min(max(score, self.low), self.high), f"clipped ({flag}: {score:.6g})"
        return score, flag

    def as_dict(self) -> dict[str, float | bool]:
        return {"low": self.low, "high": self.high, "lower_better": self.lower_better}

    @classmethod
    def from_dict(cls, values: dict[str, float | bool]) -> ScoreScale:
        return cls(float(values["low"]), float(values["high"]), bool(values["lower_better"]))
