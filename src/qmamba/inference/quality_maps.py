"""Quality maps: where in an image quality drops, from the scores of crop-size windows slid over it.

A QMamba score is the mean over crops of the image; scoring windows on a denser grid shows how that quality varies
across the image. :class:`QualityMap` holds the window scores (the scorer's :meth:`~qmamba.inference.scoring.Scorer.
quality_map` makes one), :func:`render` draws them over the image as a red (worse) to green (better) tint whose
colours mean the same on every image: they span the training dataset's score range, not each image's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from qmamba.inference.scale import ScoreScale

__all__ = ["QualityMap", "render", "window_starts"]

# red (unit score 0), yellow (0.5), green (1)
_ANCHORS = np.array([[215, 48, 39], [254, 224, 139], [26, 152, 80]], np.float64)


@dataclass(frozen=True)
class QualityMap:
    """Scores of square windows on an image (native scale): ``scores[r, c]`` is the window at ``(tops[r],
    lefts[c])`` of side ``size`` in an image of ``height`` x ``width`` pixels."""

    scores: np.ndarray
    tops: np.ndarray
    lefts: np.ndarray
    size: int
    height: int
    width: int

    def dense(self) -> np.ndarray:
        """(height, width) map: each pixel gets the mean score of the windows that cover it."""
        total = np.zeros((self.height, self.width), np.float64)
        count = np.zeros((self.height, self.width), np.float64)
        for r, top in enumerate(self.tops):
            for c, left in enumerate(self.lefts):
                total[top : top + self.size, left : left + self.size] += self.scores[r, c]
                count[top : top + self.size, left : left + self.size] += 1
        return total / np.maximum(count, 1)

    def worst_window(self, scale: ScoreScale) -> tuple[int, int]:
        """(top, left) of the window with the worst quality on ``scale``'s direction."""
        r, c = np.unravel_index(np.argmin(scale.to_unit(self.scores)), self.scores.shape)
        return int(self.tops[r]), int(self.lefts[c])


def window_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Window offsets every ``stride`` pixels, the last one flush with the end (every pixel is covered)."""
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return np.asarray(starts)


def render(image: np.ndarray, qmap: QualityMap, scale: ScoreScale, max_side: int = 1024) -> Image.Image:
    """The (H, W, 3) uint8 image in grey, tinted by the map: red where quality is worst on the dataset's scale,
    green where it is best; at most ``max_side`` pixels on its longer side."""
    scores = qmap.dense()  # a fitted scale has no bounds: its colours span two standard deviations either side
    unit = (scores + 2.0) / 4.0 if scale.fitted else scale.to_unit(scores)
    unit = np.clip(unit, 0.0, 1.0) * 2.0  # 0..2 across the two colour segments
    low = np.minimum(unit.astype(int), 1)
    t = (unit - low)[..., None]
    tint = _ANCHORS[low] * (1 - t) + _ANCHORS[low + 1] * t
    grey = image.astype(np.float64).mean(axis=-1, keepdims=True)
    picture = Image.fromarray((0.4 * grey + 0.6 * tint).round().clip(0, 255).astype(np.uint8))
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return picture
