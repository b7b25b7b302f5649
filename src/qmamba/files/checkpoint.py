"""Reading and writing checkpoint files safely.

Reading defaults to ``torch.load(weights_only=True)``: a checkpoint from the internet can run arbitrary code when
unpickled, so full unpickling is opt-in (``trusted=True``) and the refusal says how to opt in. Writing is atomic
(temporary file + rename) so an interrupted save never leaves a truncated file behind.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from qmamba.errors import QMambaError
from qmamba.files.atomic import write_bytes_atomic

__all__ = ["CheckpointError", "extract_state_dict", "read_checkpoint", "save_atomic"]


class CheckpointError(QMambaError):
    """A checkpoint file is missing, unreadable, untrusted or does not fit the model."""


def read_checkpoint(path: str | os.PathLike[str], trusted: bool = False, lazy: bool = False) -> Any:
    """Load a checkpoint file onto the CPU; only tensors and plain containers unless ``trusted``. ``lazy`` maps the
    tensors of a zip checkpoint instead of reading them (cheap, for checking a file that something else loads)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or download? Copy it again")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with {head!r}); pass a .ckpt/.pth "
                              "file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=lazy and head.startswith(b"PK"))
    except pickle.UnpicklingError as err:
        if trusted or "weights_only" not in str(err):
            raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from err
        raise CheckpointError(
            f"{path} contains pickled Python objects beyond tensors and plain containers, which safe loading "
            "refuses (they can execute code). If you trust where the file comes from, opt in: trusted=True in "
            "Python, --trust-checkpoint for qmamba score/export, trust_checkpoint: true for a pretrained or "
            "transfer-source file in a config") from err
    except (RuntimeError, EOFError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({reason}); copy it again") from err


def extract_state_dict(obj: Any, keys: tuple[str, ...] = ("model", "state_dict", "model_ema")) -> dict[str, Any]:
    """The state dict inside a checkpoint container (VMamba's ``model`` entry, Lightning's ``state_dict``, ...)."""
    if isinstance(obj, dict):
        for key in keys:
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(
        f"no state dict found in checkpoint: expected a dict of tensors or one under any of {keys}; "
        f"got {type(obj).__name__} with keys {list(obj)[:8] if isinstance(obj, dict) else '-'}"
    )


def model_state(checkpoint: Any) -> dict[str, Any]:
    """The QMamba weights in a loaded checkpoint: a qmamba (Lightning) checkpoint's ``model.*`` entries without the
    prefix, or a plain model state dict as it is."""
    state = extract_state_dict(checkpoint)
    if any(k.startswith("model.") for k in state):
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that replaces ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())
