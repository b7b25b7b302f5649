"""A trained model as a folder that travels: ``model.safetensors``, ``config.json`` and ``README.md`` (its card).

The weights are safetensors (a JSON header of names, dtypes, shapes and byte ranges, then the raw bytes): reading
them runs nothing, unlike a pickle-based checkpoint. ``config.json`` says how to rebuild the model and use it (the
preset and its arguments, the preprocessing, each training dataset's score scale). Nothing in the folder needs
pickle or Lightning to read.

Reading treats the folder as hostile: the config is bounded JSON checked for its keys, the safetensors header is
checked against the file's size before the weights are mapped, an optional SHA-256 pin is checked before anything
is parsed, and each problem is one line naming the file. Writing goes to a temporary folder renamed into place, so
a folder is whole or absent.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmamba.errors import QMambaError
from qmamba.files.atomic import atomic_folder
from qmamba.files.untrusted_json import loads_untrusted
from qmamba.files.weights import file_sha256

if TYPE_CHECKING:
    import torch

__all__ = ["CARD_NAME", "CONFIG_NAME", "FORMAT", "WEIGHTS_NAME", "ModelFolderError", "check_pinned", "is_model_folder",
           "read_model_folder", "write_model_folder"]

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
FORMAT = "qmamba-model/1"  # config.json's "format": what reads it, and which version of the layout
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own bound on a header
REQUIRED_KEYS = ("format", "architecture", "datasets", "scales", "preprocessing")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ModelFolderError(QMambaError):
    """A model folder that is incomplete, altered or not a qmamba model; the message names the file."""


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """A folder holding a ``config.json`` (whether it is a sound model folder is :func:`read_model_folder`'s)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def write_model_folder(folder: str | os.PathLike[str], state: dict[str, torch.Tensor], config: dict[str, Any],
                       card: str) -> None:
    """Write the three files into ``folder`` (which must not exist, or be empty): whole, or not at all."""
    from safetensors.torch import save_file

    try:
        with atomic_folder(folder) as staging:
            tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
            weights = {"file": WEIGHTS_NAME, "sha256": file_sha256(staging / WEIGHTS_NAME),
                       "bytes": (staging / WEIGHTS_NAME).stat().st_size}
            (staging / CONFIG_NAME).write_text(json.dumps({**config, "format": FORMAT, "weights": weights},
                                                          indent=2) + "\n")
            (staging / CARD_NAME).write_text(card)
    except FileExistsError as err:
        raise ModelFolderError(f"{err}; choose a new output folder (nothing was written)") from None


def read_model_folder(folder: str | os.PathLike[str], sha256: str | None = None
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, state dict)`` of a model folder, checked; ``sha256`` pins the weights file's digest."""
    folder = Path(folder)
    config = _read_config(_own_file(folder, CONFIG_NAME))
    weights = _own_file(folder, WEIGHTS_NAME)
    if not weights.is_file():
        raise ModelFolderError(f"{folder} has no {WEIGHTS_NAME}; a model folder holds {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME} (qmamba publish writes both)")
    digest = check_pinned(weights, sha256)
    recorded = config.get("weights", {}).get("sha256") if isinstance(config.get("weights"), dict) else None
    if recorded is not None and recorded != digest:
        raise ModelFolderError(f"{weights} has SHA-256 {digest}, but {CONFIG_NAME} records {recorded}: the weights "
                               "were replaced or damaged after publishing")
    return config, _read_weights(weights)


def _own_file(folder: Path, name: str) -> Path:
    """``folder / name`` if it is the folder's own file (or absent, for the caller to say so): a symbolic link, or
    anything but a regular file, is refused before it is opened, so a folder cannot make qmamba read (and print a
    hash or the first bytes of) a file elsewhere. The one exception is a Hugging Face cache snapshot
    (``models--org--name/snapshots/<commit>/``), whose files are links into its repository's ``blobs/``: there the
    link's target is read, once checked to be a regular file in that ``blobs/``."""
    path = folder / name
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return path
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISLNK(mode) and folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        blobs, target = (folder.parent.parent / "blobs").resolve(), path.resolve()
        if target.parent == blobs and target.is_file():
            return target
    what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
    raise ModelFolderError(f"{path} is {what}; a model folder's files are read only when they are regular files in "
                           "the folder (copy the file itself there); nothing was read")


def check_pinned(path: str | os.PathLike[str], sha256: str | None) -> str:
    """The file's SHA-256, which must be ``sha256`` when a digest is pinned (before anything reads the file)."""
    digest = file_sha256(path)
    if sha256 is not None and digest != sha256.lower():
        raise ModelFolderError(f"{path} has SHA-256 {digest}, not the pinned {sha256}: it is another file than the "
                               "one you pinned; nothing was loaded")
    return digest


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"{path.parent} has no {CONFIG_NAME}: not a qmamba model folder")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelFolderError(f"{path} holds more than {MAX_CONFIG_BYTES >> 20} MB: not a qmamba model config")
    try:
        config = loads_untrusted(path.read_bytes())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelFolderError(f"{path} is not JSON ({err}): not a qmamba model config") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path} holds a JSON {type(config).__name__}, not an object: not a qmamba model config")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ModelFolderError(f"{path} lacks {', '.join(missing)}: not a config written by qmamba publish")
    if config["format"] != FORMAT:
        raise ModelFolderError(f"{path} is in format {config['format']!r}; this qmamba reads {FORMAT!r} (a newer "
                               "qmamba wrote it?)")
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose header is first checked against the file itself."""
    _check_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelFolderError(f"{path} cannot be read as safetensors: {str(err).splitlines()[0]}") from None


def _check_header(path: Path) -> None:
    """Every tensor's dtype known and its byte range inside the file and as long as its shape says."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFolderError(f"{path} is {size} bytes: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ModelFolderError(f"{path} announces a header of {length} bytes in a file of {size}: not a "
                                   "safetensors file (a pickle or zip checkpoint renamed?), or truncated")
        try:
            header = loads_untrusted(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFolderError(f"{path} does not start with a safetensors header: not a safetensors file (a "
                                   "pickle or zip checkpoint renamed?)") from None
        except ValueError as err:
            raise ModelFolderError(f"{path}: its safetensors header is not one qmamba reads: {err}") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path}: its header is not a JSON object: not a safetensors file")
    body = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(entry, body)
        if problem:
            raise ModelFolderError(f"{path}: tensor {name!r} {problem}: the file is damaged or was crafted; it was "
                                   "not loaded")


def _entry_problem(entry: object, body: int) -> str | None:
    if not isinstance(entry, dict):
        return "has no description"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        return f"has the unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return f"has the shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        return f"has the byte range {offsets!r}"
    begin, end = offsets
    if not 0 <= begin <= end <= body:
        return f"claims bytes {begin}-{end} of a {body}-byte body"
    count = 1
    for dim in shape:
        count *= dim
    if (end - begin) != count * DTYPE_BYTES[dtype]:
        return f"of shape {shape} ({dtype}) claims {end - begin} bytes, not {count * DTYPE_BYTES[dtype]}"
    return None
