"""A trained model from its checkpoint: architecture, weights, prompts and what it was trained on, read one way.

Training (Lightning rebuilds :class:`~qmamba.training.QMambaIQA` from its hyper-parameters through
:func:`build_architecture`), scoring, transfer and export all go through this module, so a checkpoint means the
same thing to each of them. It imports torch and qmamba's models only: no Lightning, no data stack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qmamba.errors import UsageError
from qmamba.files.checkpoint import CheckpointError, model_state, read_checkpoint
from qmamba.files.model_folder import CONFIG_NAME, ModelFolderError, check_pinned, is_model_folder, read_model_folder
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
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained (qmamba version, scan backends)
    prompts: dict[str, Any] | None = None  # the transfer prompts attached (method, where), as recorded


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


def load_trained(path: str | os.PathLike[str], trusted: bool = False, sha256: str | None = None) -> TrainedModel:
    """Rebuild the model that a qmamba checkpoint or model folder (:mod:`qmamba.files.model_folder`) describes, with
    its transfer prompts, and load its weights. ``sha256`` pins the checkpoint file's (or the folder's weights')
    digest, checked before anything is parsed."""
    if is_model_folder(path):
        config, state = read_model_folder(path, sha256)
        architecture, meta, where = config["architecture"], config, f"{Path(path) / CONFIG_NAME}"
        if not isinstance(architecture, dict) or not set(architecture) <= set(ARCHITECTURE_ARGS) \
                or "backbone" not in architecture:
            raise ModelFolderError(f"{where}: its architecture must name a backbone and only "
                                   f"{', '.join(ARCHITECTURE_ARGS)}, got {architecture!r}")
    else:
        if sha256 is not None and Path(path).is_file():
            check_pinned(path, sha256)
        checkpoint = read_checkpoint(path, trusted=trusted)
        architecture, meta, where = _architecture(checkpoint, path), checkpoint.get("qmamba"), str(path)
        if not meta:
            raise CheckpointError(f"{path} has no qmamba metadata (datasets, scales, preprocessing); it was not "
                                  "written by a qmamba fit")
        state = model_state(checkpoint)
    try:
        spec = DataSpec.from_meta(meta)
        with torch.device("meta"):  # shapes without memory: a config of absurd sizes allocates nothing
            skeleton = _built(architecture, meta.get("prompts"))
    except (KeyError, TypeError, ValueError, UsageError) as err:
        raise CheckpointError(f"{where}: it describes no model qmamba can build ({err})") from None
    mismatch = _mismatch(skeleton.state_dict(), state)
    if mismatch:
        described = "its config describes" if is_model_folder(path) else "its hyper-parameters describe"
        raise CheckpointError(f"{path}: the weights do not fit the model {described}: {mismatch}")
    model = _built(architecture, meta.get("prompts"))
    model.load_state_dict(state)
    broken = [name for name, value in state.items()
              if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:  # it would score NaN for every image
        raise CheckpointError(f"{path} holds NaN or infinite weights in {len(broken)} tensors ({', '.join(broken[:4])}"
                              f"{', ...' if len(broken) > 4 else ''}): the run that wrote it diverged or the file was "
                              "altered; use an earlier checkpoint of the run")
    return TrainedModel(model.eval(), spec, architecture, dict(meta.get("training") or {}), meta.get("prompts"))


def _built(architecture: dict[str, Any], prompts: dict[str, Any] | None) -> QMamba:
    model = build_architecture(**architecture)
    if prompts:
        attach_prompts(model, **prompts)
    return model


def _mismatch(expected: dict[str, torch.Tensor], state: dict[str, Any]) -> str:
    """What keeps ``state`` from loading into a model with ``expected`` entries, in one line ('' when it fits)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} for {tuple(v.shape)}" for k, v in expected.items()
                if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)]
    kinds = (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in kinds if keys]
    return "; ".join(parts)
