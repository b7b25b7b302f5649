"""Learning-rate schedules used by the IQA recipes (epoch-based, configurable from YAML)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine", "WarmupStepDecay"]


class WarmupStepDecay(LambdaLR):
    """DEIQT's recipe: linear warm-up from ``start_factor`` x lr over ``warmup_epochs``, then x ``gamma`` every
    ``step_epochs`` epochs, never below ``min_factor`` x lr (defaults: 3 warm-up epochs from 1e-3, x0.1 every 3)."""

    def __init__(self, optimizer: Optimizer, warmup_epochs: int = 3, step_epochs: int = 3, gamma: float = 0.1,
                 start_factor: float = 1e-3, min_factor: float = 1e-3) -> None:
        def factor(epoch: int) -> float:
            if epoch < warmup_epochs:
                return start_factor + (1.0 - start_factor) * epoch / warmup_epochs
            return max(min_factor, gamma ** ((epoch - warmup_epochs) // step_epochs))

        super().__init__(optimizer, factor)


class WarmupCosine(LambdaLR):
    """Linear warm-up over ``warmup_epochs``, then cosine decay to ``min_factor`` x lr at ``max_epochs``."""

    def __init__(self, optimizer: Optimizer, max_epochs: int | None, warmup_epochs: int = 1,
                 start_factor: float = 1e-2, min_factor: float = 1e-2) -> None:
        if max_epochs is None or max_epochs < 1:  # the CLI passes trainer.max_epochs, unset (None, -1) by default
            raise ValueError(f"WarmupCosine needs a finite run length, got max_epochs={max_epochs}; set "
                             "trainer.max_epochs")
        def factor(epoch: int) -> float:
            if epoch < warmup_epochs:
                return start_factor + (1.0 - start_factor) * epoch / warmup_epochs
            progress = min(1.0, (epoch - warmup_epochs) / max(1, max_epochs - warmup_epochs))
            return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
