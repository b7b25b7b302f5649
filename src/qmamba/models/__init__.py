"""Pure ``nn.Module`` code (backbones, the quality head, prompts, ``torch.compile`` in place) and the registry:
``build_backbone(name)`` and ``build_model(name)`` for every preset. Imports ``ops`` and ``files``, never Lightning.

Names: ``qmamba_tiny``, ``qmamba_tiny5``, ``qmamba_small``, ``qmamba_base``, ``lqmamba_tiny``, ``lqmamba_small``,
``lqmamba_base``, ``vmamba_tiny_s1l8``, ``vmamba_tiny_s2l5``, ``vmamba_small``, ``vmamba_base``,
``vmamba_vanilla_tiny`` (v0), ``vim_tiny``, ``vim_small``, and the CPU test presets ``qmamba_test``,
``lqmamba_test``, ``vim_test``; and any timm model as ``timm:<name>`` (:mod:`qmamba.models.timm_backbone`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from qmamba.errors import UsageError
from qmamba.files.weights import resolve_pretrained
from qmamba.ops.selective_scan import ScanBackend, validate_backend

from .qmamba import QMamba, QualityHead
from .timm_backbone import TimmBackbone, is_timm_name, load_timm_pretrained, timm_model_name
from .vim import VIM_PRESETS, Vim
from .vmamba import VMAMBA_PRESETS, LoadReport, VMamba, load_official_checkpoint

__all__ = [
    "QMamba",
    "QualityHead",
    "TimmBackbone",
    "LoadReport",
    "VMamba",
    "Vim",
    "build_backbone",
    "build_model",
    "check_model_name",
    "list_models",
    "load_official_checkpoint",
    "load_pretrained",
    "set_scan_backend",
]


def list_models() -> list[str]:
    """All registered backbone / model names."""
    return sorted([*VMAMBA_PRESETS, *VIM_PRESETS])


def check_model_name(name: str) -> None:
    """One line when ``name`` is neither a registered preset nor a model timm knows (``timm:<name>``)."""
    if is_timm_name(name):
        timm_model_name(name)
    elif name not in VMAMBA_PRESETS and name not in VIM_PRESETS:
        raise UsageError(f"unknown model {name!r}; available: {', '.join(list_models())}, or any timm model as "
                         "timm:<name>")


def build_backbone(name: str, pretrained: str | os.PathLike[str] | None = None, trusted: bool = False,
                   **overrides: Any) -> VMamba | Vim | TimmBackbone:
    """Build a registered backbone, or a timm model named ``timm:<model>``; ``pretrained`` is ``"imagenet"`` (the
    preset's official VMamba checkpoint, downloaded and cached on first use: :mod:`qmamba.files.weights`; for a timm
    model, timm's default pretrained weights) or a checkpoint file of the backbone's weights.

    ``overrides`` replace preset arguments (e.g. ``drop_path_rate=0.1``, ``scan_backend="torch"``); for a timm
    model they go to ``timm.create_model`` (e.g. ``img_size=384``).
    ``trusted`` allows full unpickling of the checkpoint file (only for files from a source you trust).
    """
    if is_timm_name(name):
        try:
            timm_backbone = TimmBackbone(name, **overrides)
        except TypeError as err:
            raise UsageError(f"{name}: {err} (backbone_args of a timm model are timm.create_model's arguments)"
                             ) from None
        if pretrained is not None:
            load_pretrained(timm_backbone, name, pretrained, trusted=trusted)
        return timm_backbone
    check_model_name(name)
    if name in VMAMBA_PRESETS:
        backbone: VMamba | Vim = VMamba(**{**VMAMBA_PRESETS[name], **overrides})
    else:
        backbone = Vim(**{**VIM_PRESETS[name], **overrides})  # type: ignore[arg-type]
    if pretrained is not None:
        if not isinstance(backbone, VMamba):
            raise ValueError(f"{name}: only VMamba-family backbones load official VMamba checkpoints")
        load_pretrained(backbone, name, pretrained, trusted=trusted)
    return backbone


def load_pretrained(backbone: VMamba | Vim | TimmBackbone, name: str, pretrained: str | os.PathLike[str],
                    trusted: bool = False) -> tuple[dict[str, Any], str]:
    """Load ``pretrained`` into the built backbone ``name``: a timm model's through timm, a VMamba's from its official
    checkpoint (``imagenet``, cached) or a file. Returns where the weights came from (the run's record) and a line
    saying what was loaded."""
    if isinstance(backbone, TimmBackbone):
        source = load_timm_pretrained(backbone, pretrained, trusted=trusted)
        return source, source["url"]
    path, source = resolve_pretrained(name, pretrained)
    report = load_official_checkpoint(backbone, path, trusted=trusted)
    return source, f"{path} (sha256 {source['sha256']}; {report})"


def build_model(
    name: str,
    pretrained: str | os.PathLike[str] | None = None,
    trusted: bool = False,
    head_features: tuple[str, ...] = ("pooled",),
    head_hidden: int | None = None,
    head_dropout: float = 0.0,
    **overrides: Any,
) -> QMamba:
    """The IQA regressor: ``build_backbone(name, pretrained, **overrides)`` plus a :class:`QualityHead`."""
    backbone = build_backbone(name, pretrained, trusted=trusted, **overrides)
    dims = {"pooled": backbone.num_features, **{f"stage{i}": d for i, d in enumerate(backbone.stage_dims)}}
    unknown = [f for f in head_features if f not in dims]
    if unknown:
        raise ValueError(f"head_features {unknown} not produced by {name}; choose from {sorted(dims)}")
    head = QualityHead([dims[f] for f in head_features], head_features, head_hidden, head_dropout)
    return QMamba(backbone, head)


def set_scan_backend(model: torch.nn.Module, backend: ScanBackend) -> None:
    """Switch every selective scan (and Vim's causal conv) in ``model`` to ``backend``, e.g. a loaded checkpoint."""
    validate_backend(backend)
    for module in model.modules():
        if hasattr(module, "scan_backend"):
            module.scan_backend = backend
