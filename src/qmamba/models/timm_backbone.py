"""Any timm model as a backbone under qmamba's quality head: the paper's Swin, ViT and CNN baselines (and timm's tiny
``test_*`` models for CPU tests) through the same data, losses, protocol, checkpoints and commands as QMamba.

Named ``timm:<model>`` everywhere a backbone is named (``build_model("timm:swin_tiny_patch4_window7_224")``,
``backbone: timm:resnet50`` in a config). timm is an optional extra (``pip install "qmamba[timm]"``), imported only
when such a name is built. Pretrained weights come through timm's own mechanism: ``imagenet`` is the model's default
pretrained tag from the Hugging Face Hub (or its cache, offline), and a local file of the model's weights works too.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from qmamba.errors import UsageError
from qmamba.files.checkpoint import extract_state_dict, read_checkpoint
from qmamba.files.weights import IMAGENET, file_sha256

__all__ = ["TIMM_PREFIX", "TimmBackbone", "ensure_timm_pretrained", "is_timm_name", "load_timm_pretrained",
           "timm_model_name"]

TIMM_PREFIX = "timm:"


def is_timm_name(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def timm_model_name(name: str) -> str:
    """``timm:resnet50`` -> ``resnet50``, the model checked against timm's registry (one line when it is not there)."""
    timm = _import_timm(name)
    model = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else (
            "; `python -c 'import timm; print(timm.list_models(\"*swin*\"))'` lists timm's models")
        raise UsageError(f"unknown timm model {model!r} in {name!r}{hint}")
    return model


def _import_timm(name: str) -> Any:
    try:
        import timm
    except ImportError:
        raise UsageError(f"{name} needs timm: pip install \"qmamba[timm]\"") from None
    return timm


class TimmBackbone(nn.Module):
    """A timm model without its classifier; ``forward_features`` gives its pooled features as ``{"pooled": ...}``,
    the form qmamba's :class:`~qmamba.models.qmamba.QualityHead` reads.

    Args:
        name: ``timm:<model>``.
        drop_path_rate: stochastic depth, as for the VMamba presets (models without it ignore it, as timm does).
        **kwargs: passed to ``timm.create_model`` (e.g. ``img_size=384`` for a ViT at another input size).
    """

    stage_dims: tuple[int, ...] = ()  # the head pools the final features only

    def __init__(self, name: str, drop_path_rate: float | None = None, **kwargs: Any) -> None:
        super().__init__()
        timm = _import_timm(name)
        self.name = name
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        self.model = timm.create_model(timm_model_name(name), pretrained=False, num_classes=0, **kwargs)
        self.num_features: int = self.model.num_features

    def forward_features(self, images: Tensor) -> dict[str, Tensor]:
        return {"pooled": self.model(images)}  # num_classes=0: timm's pooled (pre-logits) features


def ensure_timm_pretrained(name: str, pretrained: str | os.PathLike[str]) -> None:
    """``pretrained`` made available before a fit reads any data: ``imagenet`` downloaded into the Hugging Face cache
    when not there (one line naming what to fetch where, offline), a path checked to be a file."""
    if str(pretrained) != IMAGENET:
        _weights_file(name, pretrained)
        return
    from huggingface_hub import hf_hub_download

    hub_id, filename = _hub_file(name)
    with _missing_download_explained(name, hub_id, filename):
        hf_hub_download(hub_id, filename)


def load_timm_pretrained(backbone: TimmBackbone, pretrained: str | os.PathLike[str], trusted: bool = False
                         ) -> dict[str, Any]:
    """Load ``imagenet`` (timm's default pretrained tag, from the Hugging Face Hub or its cache) or a weights file
    (.safetensors, or a torch checkpoint read as :mod:`qmamba.files.checkpoint` reads them) into ``backbone``,
    adapted as ``timm.create_model(pretrained=True)`` adapts them (the model's checkpoint filter, no classifier);
    returns the record of where they came from."""
    import timm.models

    model = backbone.model
    config = dict(model.pretrained_cfg)
    if str(pretrained) == IMAGENET:
        hub_id, filename = _hub_file(backbone.name)
        with _missing_download_explained(backbone.name, hub_id, filename):
            timm.models.load_pretrained(model, pretrained_cfg={**config, "source": "hf-hub"}, num_classes=0,
                                        filter_fn=_checkpoint_filter(model))
        return {"name": IMAGENET, "url": f"hf-hub:{hub_id}", "file": filename}
    path = _weights_file(backbone.name, pretrained)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = extract_state_dict(read_checkpoint(path, trusted))
    timm.models.load_pretrained(model, pretrained_cfg={**config, "state_dict": state, "source": ""}, num_classes=0,
                                filter_fn=_checkpoint_filter(model))
    return {"name": str(path), "url": str(path), "sha256": file_sha256(path)}


def _hub_file(name: str) -> tuple[str, str]:
    """Where timm keeps ``name``'s default pretrained weights: (Hugging Face repo, file)."""
    import timm.models

    config = timm.models.get_pretrained_cfg(timm_model_name(name))
    hub_id = getattr(config, "hf_hub_id", None) if config is not None else None
    if not hub_id:
        raise UsageError(f"{name} has no pretrained weights on the Hugging Face Hub in timm; set pretrained to a file "
                         "of its weights")
    return hub_id, getattr(config, "hf_hub_filename", None) or "model.safetensors"


@contextmanager
def _missing_download_explained(name: str, hub_id: str, filename: str) -> Iterator[None]:
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # not in the cache, and the Hub out of reach
        folder = "models--" + hub_id.replace("/", "--")
        raise UsageError(
            f"{name}'s pretrained weights ({filename} of the Hugging Face repo {hub_id}) are not in the Hugging Face "
            f"cache ({HF_HUB_CACHE}) and cannot be downloaded here: run `hf download {hub_id} {filename}` on a machine "
            f"with network and copy its {folder} folder into {HF_HUB_CACHE}, or set pretrained to a file of the "
            "weights") from None


def _weights_file(name: str, pretrained: str | os.PathLike[str]) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise UsageError(f"pretrained: {path} is not a file; give {IMAGENET} (timm's default weights for {name}) or "
                         "the path of a file of its weights")
    return path


def _checkpoint_filter(model: nn.Module) -> Any:
    """The model family's own ``checkpoint_filter_fn`` (original-format weights, resized position embeddings), as
    ``timm.create_model(pretrained=True)`` applies it."""
    return getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)

