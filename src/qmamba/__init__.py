"""qmamba: vision-Mamba no-reference image quality assessment (QMamba / LQMamba, ICML 2025)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmamba.inference.scoring import Scorer

__version__ = "0.1.0"


def load(checkpoint: str | os.PathLike[str], **kwargs: Any) -> Scorer:
    """A scorer for a trained checkpoint: ``qmamba.load(ckpt).score(images)``; imported lazily, so ``import qmamba``
    stays light. Options: :meth:`qmamba.inference.scoring.Scorer.from_checkpoint`."""
    from qmamba.inference.scoring import load as load_scorer

    return load_scorer(checkpoint, **kwargs)
