"""Where a trained model comes from: a local checkpoint or model folder, the Hugging Face Hub, or a folder at a URL.

* a ``.ckpt`` file or a model folder (``qmamba publish``) on this machine, used where it is;
* ``hf://org/name[@revision]``: a model folder on the Hub, fetched by ``huggingface_hub`` into its cache (``HF_HOME``,
  ``HF_HUB_OFFLINE`` honoured); the revision it resolved to (a commit) is recorded;
* any fsspec URL of a model folder (``s3://bucket/models/name/``, ``https://host/models/name/``, ``gs://``): its
  ``config.json`` and ``model.safetensors`` are fetched once into ``$QMAMBA_HOME/models`` and used from there on,
  offline included. The weights must match the SHA-256 and size that the folder's config records (a truncated or
  swapped file is refused and nothing is cached), and the first download's SHA-256 is recorded next to the cache: a
  record outlives its deleted files, so a file that changed upstream is an error naming both hashes, as for the
  backbone weights (``qmamba weights``).

Reads are bounded in time and size (:class:`~qmamba.inference.sources.NetworkLimits`), and a URL's password never
appears in a message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmamba.errors import QMambaError, UsageError
from qmamba.files.atomic import atomic_folder, write_text_atomic
from qmamba.files.model_folder import CARD_NAME, CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAME, ModelFolderError
from qmamba.files.untrusted_json import loads_untrusted
from qmamba.files.weights import file_lock, file_sha256, qmamba_home
from qmamba.redaction import without_password

from .sources import NetworkLimits, RemoteReadError, is_uri, read_remote

__all__ = ["HUB_PREFIX", "ModelSourceError", "ResolvedModel", "add_model_arguments", "resolve_model"]

HUB_PREFIX = "hf://"
MAX_WEIGHTS_BYTES = 4 * 2**30  # the largest QMamba's weights are 0.4 GB
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)


class ModelSourceError(QMambaError):
    """A model that cannot be fetched, or whose fetched files are not the ones recorded."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local: ``path`` (a checkpoint file or a model folder) and where it came from."""

    path: Path
    source: dict[str, Any] = field(default_factory=dict)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every command that uses a trained model: which one (``--model``; ``--ckpt_path`` keeps
    working), its pinned digest, and whether a pickled checkpoint may be unpickled."""
    parser.add_argument("--model", "--ckpt_path", "--ckpt-path", dest="ckpt_path", metavar="MODEL", required=True,
                        help="a qmamba checkpoint (runs/<name>/checkpoints/best.ckpt), a model folder (qmamba "
                        "publish), hf://org/name[@revision] or a model folder's URL (s3://, https://, gs://)")
    parser.add_argument("--sha256", help="the SHA-256 the checkpoint file (or a model folder's weights) must have, "
                        "checked before loading")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint with pickled Python objects (they can run code: trusted files only)")


def resolve_model(reference: str | os.PathLike[str], limits: NetworkLimits = NetworkLimits()) -> ResolvedModel:
    """The local checkpoint or model folder that ``reference`` names, fetched first when it is remote."""
    text = str(reference)
    if text.startswith(HUB_PREFIX):
        return _from_hub(text)
    if is_uri(text):
        return _from_url(text, limits)
    path = Path(text)
    if not path.exists():
        raise ModelSourceError(f"checkpoint {path} does not exist (a .ckpt file, a model folder, hf://org/name or a "
                               "folder's URL)")
    return ResolvedModel(path, {"path": str(path)})


def _from_hub(reference: str) -> ResolvedModel:
    repo, at, revision = reference[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(_HUB_NAME.fullmatch(part) for part in repo.split("/")):
        raise UsageError(f"{without_password(reference)} is not hf://ORG/NAME or hf://ORG/NAME@REVISION")
    if at and not _is_revision(revision):
        raise UsageError(f"{reference!r}: {revision!r} is not a revision (a branch, a tag or a commit: letters, "
                         "digits, '.', '_', '-' and '/' between names, no '..')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise UsageError(f"{reference} needs huggingface_hub: pip install \"qmamba[hub]\"") from None
    try:
        folder = Path(snapshot_download(repo_id=repo, revision=revision or None, allow_patterns=list(MODEL_FILES)))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise ModelSourceError(f"{reference} is not in the Hugging Face cache ({_hub_cache()})"
                               + (" and HF_HUB_OFFLINE is set: fetch it once online" if offline else
                                  " and the Hub could not be reached")) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise ModelSourceError(f"cannot fetch {reference} from the Hugging Face Hub: "
                               f"{str(err).strip().splitlines()[0]}") from None
    return ResolvedModel(folder, {"hub": repo, "revision": revision or "main", "commit": folder.name})


_HUB_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")  # the Hub's rule for org and repo names
_REF_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _is_revision(revision: str) -> bool:
    """A branch, tag or commit name that stays a name: the Hub's cache keeps a ref as the file
    ``refs/<revision>``, so ``..``, an absolute path or a control character would lead to another file."""
    parts = revision.split("/")
    return 0 < len(revision) <= 255 and all(_REF_PART.fullmatch(p) and ".." not in p and not p.endswith(".lock")
                                            for p in parts)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _from_url(url: str, limits: NetworkLimits) -> ResolvedModel:
    """A model folder at ``url``, fetched once into the cache and checked against its own config and the record."""
    base = url.rstrip("/")
    key = hashlib.sha256(base.encode()).hexdigest()[:16]
    root = qmamba_home() / "models"
    folder, record_path = root / key, root / f"{key}.json"
    shown = without_password(base)
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(record_path):  # one process fetches, the others wait and use the cache
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if record and all((folder / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME)) \
                and file_sha256(folder / WEIGHTS_NAME) == record["weights_sha256"]:
            return ResolvedModel(folder, {"url": shown, "weights_sha256": record["weights_sha256"]})
        shutil.rmtree(folder, ignore_errors=True)  # a cache that is incomplete or altered is fetched again
        config_bytes = _fetch(f"{base}/{CONFIG_NAME}", NetworkLimits(
            limits.timeout, MAX_CONFIG_BYTES, f"{MAX_CONFIG_BYTES >> 20} MB, the bound of a model config"))
        expected = _recorded_weights(config_bytes, shown)
        # reading stops at the recorded size: a server that answers more is cut off there, not read into memory
        weights = _fetch(f"{base}/{WEIGHTS_NAME}", NetworkLimits(
            limits.timeout, expected["bytes"], f"the {expected['bytes']} bytes its {CONFIG_NAME} records"))
        digest = hashlib.sha256(weights).hexdigest()
        if (len(weights), digest) != (expected["bytes"], expected["sha256"]):
            raise ModelSourceError(f"{shown}/{WEIGHTS_NAME} arrived as {len(weights)} bytes with SHA-256 {digest}; its "
                                   f"{CONFIG_NAME} records {expected['bytes']} bytes and {expected['sha256']}: "
                                   "truncated or replaced, so it was not cached")
        if record and record["weights_sha256"] != digest:
            raise ModelSourceError(f"{shown} changed upstream: its weights were recorded with SHA-256 "
                                   f"{record['weights_sha256']} when first fetched and are now {digest}; if the new "
                                   f"version is intended, delete {record_path} and load it again")
        with atomic_folder(folder) as staging:
            (staging / CONFIG_NAME).write_bytes(config_bytes)
            (staging / WEIGHTS_NAME).write_bytes(weights)
        if not record:
            write_text_atomic(record_path, json.dumps({"url": shown, "weights_sha256": digest}, indent=2) + "\n")
    return ResolvedModel(folder, {"url": shown, "weights_sha256": digest})


def _fetch(url: str, limits: NetworkLimits) -> bytes:
    try:
        return read_remote(url, limits)
    except RemoteReadError as err:
        raise ModelSourceError(f"cannot fetch the model: {err}") from None


def _recorded_weights(config_bytes: bytes, shown: str) -> dict[str, Any]:
    """The weights' ``{"sha256", "bytes"}`` that a fetched ``config.json`` records."""
    try:
        weights = loads_untrusted(config_bytes).get("weights")
        if isinstance(weights, dict) and isinstance(weights.get("sha256"), str) and isinstance(weights.get("bytes"),
                                                                                               int):
            if not 0 < weights["bytes"] <= MAX_WEIGHTS_BYTES:
                raise ModelFolderError(f"{shown}/{CONFIG_NAME} records weights of {weights['bytes']} bytes; a qmamba "
                                       f"model's are at most {MAX_WEIGHTS_BYTES >> 30} GB: nothing was fetched")
            return weights
    except (ValueError, AttributeError):  # not JSON, nested too deep, not an object
        pass
    raise ModelFolderError(f"{shown}/{CONFIG_NAME} is not a model config written by qmamba publish (no weights "
                           "record); nothing was cached")
