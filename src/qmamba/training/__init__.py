"""Lightning training code: the IQA module, losses, metrics, schedules and callbacks."""

from .losses import IQALoss
from .metrics import iqa_metrics
from .module import QMambaIQA
from .schedules import WarmupCosine, WarmupStepDecay

__all__ = ["IQALoss", "QMambaIQA", "WarmupCosine", "WarmupStepDecay", "iqa_metrics"]
