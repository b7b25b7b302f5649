"""Lightning training code, kept thin around the models: the IQA module, its CLI, losses, metrics, schedules and
callbacks. Imports every layer below (``data``, ``inference``, ``models``, ``ops``, ``files``), nothing above."""

from .losses import IQALoss
from .metrics import iqa_metrics
from .module import QMambaIQA
from .prompt_tuning import PromptTuning, load_tuned
from .schedules import WarmupCosine, WarmupStepDecay

__all__ = ["IQALoss", "PromptTuning", "QMambaIQA", "WarmupCosine", "WarmupStepDecay", "iqa_metrics", "load_tuned"]
