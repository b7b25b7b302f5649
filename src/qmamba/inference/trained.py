"""A trained model from its checkpoint: architecture, weights, prompts and what it was trained on, read one way.

Training (Lightning rebuilds :class:`~qmamba.training.QMambaIQA` from its hyper-parameters through
:func:`build_architecture`), scoring, transfer and export all go through this module, so a checkpoint means the
same thing to each of them. It imports torch and qmamba's models only: no Lightning, no data stack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from qmamba.errors import UsageError
from qmamba.files.checkpoint import CheckpointError, model_state, read_checkpoint
from qmamba.inference.preprocessing import Preprocessing
from qmamba.inference.scale import ScoreScale
from qmamba.models import QMamba, build_model
from qmamba.models.prompts import attach_prompts

__all__ = ["ARCHITECTURE_ARGS", "DataSpec", "TrainedModel", "build_architecture", "load_trained",
           "read_architecture"]

ARCHITECTURE_ARGS = ("backbone", "backbone_args", "head_features", "head_hidden", "head_dropout")


def build_architecture(
    backbone: str,
    backbone_args: dict[str, Any] | None = None,
    head_features: tuple[str, ...] | list[str] = ("pooled",),
    head_hidden: int | None = None,
    head_dropout: float = 0.0,
) -> QMamba:
    """The untrained regressor that a run's :data:`ARCHITECTURE_ARGS` describe."""
    return build_model(backbone, head_features=tuple(head_features), head_hidden=head_hidden,
                       head_dropout=head_dropout, **(backbone_args or {}))


@dataclass
class DataSpec:
    """What a model was trained on: its datasets' names and score scales, and its preprocessing.

    The DataModule provides it to the LightningModule, which stores it in every checkpoint (``checkpoint["qmamba"]``).
    """

    datasets: list[str] = field(default_factory=lambda: ["default"])
    scales: list[ScoreScale] = field(default_factory=lambda: [ScoreScale(0.0, 1.0, False)])
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def scale_of(self, dataset: str) -> ScoreScale:
        if dataset not in self.datasets:
            raise UsageError(f"the model was trained on {', '.join(self.datasets)}: choose one of them (--dataset in "
                             f"qmamba score and serve, dataset= in Python), not {dataset!r}")
        return self.scales[self.datasets.index(dataset)]

    def to_meta(self) -> dict[str, Any]:
        return {"datasets": list(self.datasets), "scales": [s.as_dict() for s in self.scales],
                "preprocessing": self.preprocessing.as_dict()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> DataSpec:
        return cls(list(meta["datasets"]), [ScoreScale.from_dict(s) for s in meta["scales"]],
                   Preprocessing.from_dict(meta["preprocessing"]))


@dataclass
class TrainedModel:
    """A trained regressor (eval mode, on the CPU), what it was trained on, and the arguments that rebuild it."""

    model: QMamba
    spec: DataSpec
    architecture: dict[str, Any]


def _architecture(checkpoint: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or "backbone" not in hparams:
        raise CheckpointError(f"{path} is not a checkpoint written by qmamba training (no model description); "
                              "use a runs/<name>/checkpoints/*.ckpt file")
    args = {k: hparams[k] for k in ARCHITECTURE_ARGS if k in hparams}
    if "head_features" in args:
        args["head_features"] = list(args["head_features"])
    return args


def read_architecture(path: str | os.PathLike[str], trusted: bool = False) -> dict[str, Any]:
    """The :data:`ARCHITECTURE_ARGS` of a qmamba checkpoint (e.g. to build a transfer run's model)."""
    return _architecture(read_checkpoint(path, trusted=trusted), path)


def load_trained(path: str | os.PathLike[str], trusted: bool = False) -> TrainedModel:
    """Rebuild the model a qmamba checkpoint describes (with its transfer prompts) and load its weights."""
    checkpoint = read_checkpoint(path, trusted=trusted)
    architecture = _architecture(checkpoint, path)
    meta = checkpoint.get("qmamba")
    if not meta:
        raise CheckpointError(f"{path} has no qmamba metadata (datasets, scales, preprocessing); it was not written "
                              "by a qmamba fit")
    model = build_architecture(**architecture)
    if meta.get("prompts"):
        attach_prompts(model, **meta["prompts"])
    state = model_state(checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit the model its hyper-parameters describe ({err})") \
            from err
    broken = [name for name, value in state.items()
              if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:  # it would score NaN for every image
        raise CheckpointError(f"{path} holds NaN or infinite weights in {len(broken)} tensors ({', '.join(broken[:4])}"
                              f"{', ...' if len(broken) > 4 else ''}): the run that wrote it diverged or the file was "
                              "altered; use an earlier checkpoint of the run")
    return TrainedModel(model.eval(), DataSpec.from_meta(meta), architecture)
