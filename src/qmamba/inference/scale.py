"""Score scales: each dataset's native scores mapped to [0, 1] with higher = better, and back.

Universal training needs one scale and direction across datasets; metrics and outputs are reported on the native
scale (so a DMOS dataset's predictions are DMOS again). A checkpoint records the scale of every training dataset.

A model trained from comparisons (``A looks better than B``) has no native scale: its dataset's scale is *fitted*
(:meth:`ScoreScale.fitted`), an affine map of the model's output with no bounds, and says what its numbers mean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmamba.errors import UsageError

if TYPE_CHECKING:  # plain arithmetic on either: `qmamba score --help` need not import torch
    import numpy as np
    import torch

__all__ = ["ScoreScale"]


class ScoreScale:
    """A native score range and direction; ``to_unit`` maps scores into [0, 1] higher-is-better, ``to_native`` back."""

    def __init__(self, low: float, high: float, lower_better: bool, fitted: str | None = None) -> None:
        if not high > low:
            raise ValueError(f"score range must have high > low, got ({low}, {high})")
        self.low, self.high, self.lower_better = float(low), float(high), bool(lower_better)
        self.fitted = fitted  # what a fitted scale's numbers mean; None for a rating scale with bounds

    @classmethod
    def fitted_scale(cls, centre: float, spread: float, meaning: str) -> ScoreScale:
        """The scale whose scores are ``(output - centre) / spread``: no bounds, higher is better. ``low`` and
        ``high`` are then the scores of outputs 0 and 1 (what makes ``to_native`` that map), not a range."""
        if not spread > 0:
            raise ValueError(f"a fitted scale needs a spread > 0, got {spread}")
        return cls(-centre / spread, (1.0 - centre) / spread, False, meaning)

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
        """``above range`` / ``below range`` for a prediction outside the scale, else an empty string (always, on a
        fitted scale: it has no bounds)."""
        if self.fitted:
            return ""
        return "above range" if score > self.high else "below range" if score < self.low else ""

    def report(self, score: float, clip: bool) -> tuple[float, str]:
        """The score to report and its flag: out-of-range predictions are kept and flagged, or clipped when asked
        (the flag then keeps the prediction)."""
        flag = self.out_of_range(score)
        if flag and clip:
            return min(max(score, self.low), self.high), f"clipped ({flag}: {score:.6g})"
        return score, flag

    def check_clip(self, dataset: str) -> None:
        """Clipping needs bounds: asked of a fitted scale it is one line, never a silent no-op."""
        if self.fitted:
            raise UsageError(f"clipping needs a scale with bounds, and the model's {dataset} scores are on a fitted "
                             f"scale ({self.fitted}): score without clipping")

    def describe(self) -> str:
        """The scale in words, for outputs and model cards."""
        return self.fitted or f"{self.low:g} to {self.high:g}, {self.direction}"

    @property
    def bounds(self) -> list[float] | None:
        """``[low, high]`` of a rating scale; None for a fitted one, which has no bounds (its ``low`` and ``high``
        are the scores of outputs 0 and 1, not a range to show)."""
        return None if self.fitted else [self.low, self.high]

    def as_header(self) -> dict[str, list[float] | str | None]:
        """What every output says about its numbers: the bounds (null on a fitted scale), the direction and the
        scale in words."""
        return {"score_range": self.bounds, "direction": self.direction, "scale": self.describe()}

    def as_dict(self) -> dict[str, float | bool | str]:
        values: dict[str, float | bool | str] = {"low": self.low, "high": self.high, "lower_better": self.lower_better}
        if self.fitted:
            values["fitted"] = self.fitted
        return values

    @classmethod
    def from_dict(cls, values: dict[str, float | bool | str]) -> ScoreScale:
        fitted = values.get("fitted")
        return cls(float(values["low"]), float(values["high"]), bool(values["lower_better"]),
                   str(fitted) if fitted else None)
