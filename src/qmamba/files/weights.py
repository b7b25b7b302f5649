"""ImageNet-pretrained VMamba weights by name: which official file each preset starts from, and a verified cache.

``pretrained: imagenet`` resolves a backbone preset to its checkpoint in the GitHub releases of MzeroMiko/VMamba
(the paper's initialisation), downloads it once into ``$QMAMBA_HOME/weights`` (default ``~/.cache/qmamba``) and
checks it on every later use. VMamba publishes no checksums, so the SHA-256 and size of the first download are
recorded next to the file (``<file>.json``) and every later use re-hashes the file against that record.

A mirror is not trusted to behave. A download streams into ``<file>.part`` and becomes ``<file>`` only once it is
whole (the server's total size), a PyTorch checkpoint with the release's structure (blocks per stage and width), and,
when the file was recorded before, the recorded file: a record outlives its deleted file, so a changed upstream file
is an error naming both hashes until accepted (``qmamba weights fetch --accept-changed``). A dropped connection is
resumed only against a validator (ETag or Last-Modified, sent as ``If-Range``), so a file that changed meanwhile
restarts instead of being spliced from two versions; an HTML page is refused, whatever its status. An exclusive lock
per file lets one process download while the others (DDP ranks, parallel jobs) wait and then read the cached file.
``QMAMBA_WEIGHTS_MIRROR`` replaces the GitHub base URL (a mirror or an intranet copy laid out like the releases).
No torch at import (only to check a download): ``qmamba weights list`` starts instantly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import Request, urlopen

from qmamba.errors import QMambaError, UsageError
from qmamba.files.atomic import write_text_atomic

__all__ = [
    "IMAGENET",
    "OFFICIAL_FILES",
    "CachedWeights",
    "OfficialWeights",
    "WeightsError",
    "cache_state",
    "ensure_pretrained",
    "fetch",
    "file_lock",
    "file_sha256",
    "official_weights",
    "qmamba_home",
    "resolve_pretrained",
    "verify",
    "weights_dir",
]

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download"
MIRROR_ENV, HOME_ENV = "QMAMBA_WEIGHTS_MIRROR", "QMAMBA_HOME"
ATTEMPTS = 4  # a dropped connection is resumed this many times before giving up (the partial file stays)
CHUNK = 1 << 20


class WeightsError(QMambaError):
    """Pretrained weights that cannot be downloaded, are missing from an offline cache, or fail their hash."""


@dataclass(frozen=True)
class OfficialWeights:
    """One checkpoint file of VMamba's GitHub releases, and the structure a download of it must have."""

    file: str
    tag: str  # the release tag, '#v2cls' or '#v0cls'
    model: str  # VMamba's own name for the network it holds
    depths: tuple[int, ...]  # blocks per stage (``layers.<stage>.blocks.<block>.*``)
    width: int  # channels of the first stage

    @property
    def url(self) -> str:
        base = os.environ.get(MIRROR_ENV) or RELEASES
        return f"{base.rstrip('/')}/{quote(self.tag, safe='')}/{self.file}"


_T_S2L5 = OfficialWeights("vssm_tiny_0230_ckpt_epoch_262.pth", "#v2cls", "VMamba-T [s2l5]", (2, 2, 5, 2), 96)
_T_S1L8 = OfficialWeights("vssm1_tiny_0230s_ckpt_epoch_264.pth", "#v2cls", "VMamba-T [s1l8]", (2, 2, 8, 2), 96)
_S = OfficialWeights("vssm_small_0229_ckpt_epoch_222.pth", "#v2cls", "VMamba-S [s2l15]", (2, 2, 15, 2), 96)
_B = OfficialWeights("vssm_base_0229_ckpt_epoch_237.pth", "#v2cls", "VMamba-B [s2l15]", (2, 2, 15, 2), 128)
_V0_T = OfficialWeights("vssmtiny_dp01_ckpt_epoch_292.pth", "#v0cls", "Vanilla-VMamba-T", (2, 2, 9, 2), 96)

# Each preset's ImageNet start (docs/method.md, "checkpoint mapping"): QMamba-T and LQMamba-T take the [2,2,5,2]
# s2l5 tiny file (its fifth stage-3 block is dropped for QMamba-T's four), S and B their s2l15 files.
OFFICIAL_FILES: dict[str, OfficialWeights] = {
    "qmamba_tiny": _T_S2L5, "qmamba_tiny5": _T_S2L5, "lqmamba_tiny": _T_S2L5, "vmamba_tiny_s2l5": _T_S2L5,
    "vmamba_tiny_s1l8": _T_S1L8,
    "qmamba_small": _S, "lqmamba_small": _S, "vmamba_small": _S,
    "qmamba_base": _B, "lqmamba_base": _B, "vmamba_base": _B,
    "vmamba_vanilla_tiny": _V0_T,
}


@dataclass(frozen=True)
class CachedWeights:
    """A verified weights file and where it came from (recorded with every run that starts from it)."""

    path: Path
    url: str | None
    sha256: str
    size: int

    def provenance(self, name: str) -> dict[str, Any]:
        return {"name": name, "file": self.path.name, "url": self.url, "sha256": self.sha256, "size": self.size}


def qmamba_home() -> Path:
    """``$QMAMBA_HOME``, by default ``~/.cache/qmamba``: the weights and models caches."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "qmamba"


def weights_dir() -> Path:
    """``$QMAMBA_HOME/weights``, by default ``~/.cache/qmamba/weights``."""
    return qmamba_home() / "weights"


def official_weights(backbone: str) -> OfficialWeights:
    """The official ImageNet checkpoint a preset starts from; a clear error for presets that have none."""
    if backbone not in OFFICIAL_FILES:
        raise UsageError(f"pretrained: {IMAGENET} has no official weights for {backbone!r} (presets with ImageNet "
                         f"weights: {', '.join(sorted(OFFICIAL_FILES))}); use pretrained: null or a checkpoint file")
    return OFFICIAL_FILES[backbone]


def resolve_pretrained(backbone: str, pretrained: str | os.PathLike[str] | None) -> tuple[Path, dict[str, Any]] | None:
    """``pretrained`` as a verified local file and its provenance: ``imagenet`` (downloaded and cached on first
    use) or a path; ``None`` for a run from scratch."""
    if pretrained is None:
        return None
    if str(pretrained) == IMAGENET:
        cached = fetch(official_weights(backbone))
        return cached.path, cached.provenance(IMAGENET)
    path = _existing(pretrained)
    return path, CachedWeights(path, None, file_sha256(path), path.stat().st_size).provenance(str(path))


def ensure_pretrained(backbone: str, pretrained: str | os.PathLike[str] | None) -> None:
    """``pretrained`` made available without reading it: ``imagenet`` weights downloaded when not cached, a path
    checked to exist. A fit calls this before it reads any data and hashes the file once, when training starts
    (:func:`resolve_pretrained`)."""
    if pretrained is None:
        return
    if str(pretrained) != IMAGENET:
        _existing(pretrained)
    elif not (weights_dir() / official_weights(backbone).file).is_file():
        fetch(official_weights(backbone))


def _existing(pretrained: str | os.PathLike[str]) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsError(f"pretrained: {path} does not exist; give the path of an official VMamba .pth file, or "
                           f"pretrained: {IMAGENET} to download the preset's own")
    return path


# ------------------------------------------------------------------------------------------------------ the cache
def cache_state(weights: OfficialWeights) -> tuple[str, int | None]:
    """(state, bytes) of a file in the cache without hashing it: 'cached', 'partial', 'unrecorded' or 'missing'."""
    path = weights_dir() / weights.file
    if path.is_file():
        return ("cached" if _record_path(path).is_file() else "unrecorded"), path.stat().st_size
    part = _part_path(path)
    if part.is_file():
        return "partial", part.stat().st_size
    return "missing", None


def fetch(weights: OfficialWeights, download: bool = True, progress: bool | None = None,
          accept_changed: bool = False) -> CachedWeights:
    """The verified cached file, downloaded first when absent (``download=False``: an error instead).

    ``accept_changed`` records a download whose SHA-256 differs from the one recorded for this file before (the
    upstream file was replaced); without it that is an error. Under ``torch.distributed`` the first process of each
    node fetches while the others wait at a barrier and then read the cache; without a process group, the file lock
    alone makes parallel jobs download once.
    """
    distributed = _process_group()
    if distributed is not None and _local_rank(distributed) != 0:
        distributed.barrier()  # the node's first rank downloads (and reports its own failure)
        return _fetch(weights, download=False, progress=False, accept_changed=False)
    try:
        return _fetch(weights, download, progress, accept_changed)
    finally:
        if distributed is not None:
            distributed.barrier()


def verify(weights: OfficialWeights) -> CachedWeights | None:
    """Re-hash a cached file against its record; ``None`` when it is not cached."""
    path = weights_dir() / weights.file
    if not path.is_file():
        return None
    with file_lock(path):
        return _verified(weights, path)


def _fetch(weights: OfficialWeights, download: bool, progress: bool | None, accept_changed: bool) -> CachedWeights:
    path = weights_dir() / weights.file
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        if path.is_file():
            return _verified(weights, path)
        if not download:
            raise WeightsError(_offline_message(weights, path, "it is not in the cache"))
        return _download(weights, path, sys.stderr.isatty() if progress is None else progress, accept_changed)


def _verified(weights: OfficialWeights, path: Path) -> CachedWeights:
    """The file checked against its record; a file placed by hand (no record yet) is checked and recorded."""
    digest, size = file_sha256(path), path.stat().st_size
    recorded = _read_record(path)
    if recorded is None:
        _check_release_file(weights, path, f"{path} (placed in the cache by hand) is not the release file")
        log.info("recording %s placed in the cache by hand: sha256 %s, %d bytes", path.name, digest, size)
        _write_record(path, weights.url, digest, size)
        return CachedWeights(path, weights.url, digest, size)
    if digest != recorded["sha256"] or size != recorded["size"]:
        raise WeightsError(f"{path} does not match its recorded SHA-256 {recorded['sha256']} ({size} bytes against "
                           f"{recorded['size']}): the file is corrupt or was replaced; delete it and run "
                           f"`qmamba weights fetch {path.name}` again")
    return CachedWeights(path, recorded.get("url", weights.url), digest, size)


def _read_record(path: Path) -> dict[str, Any] | None:
    """The record of ``path`` (kept when the file itself is deleted), or ``None``."""
    record = _record_path(path)
    if not record.is_file():
        return None
    try:
        recorded = json.loads(record.read_text())
        return {**recorded, "sha256": str(recorded["sha256"]), "size": int(recorded["size"])}
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{record} is not a weights record ({err}); delete it to re-record {path.name}") from None


def _write_record(path: Path, url: str, digest: str, size: int) -> None:
    record = {"file": path.name, "url": url, "sha256": digest, "size": size,
              "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text_atomic(_record_path(path), json.dumps(record, indent=2) + "\n")


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<file>.lock``: released by the kernel if the process dies."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


_BLOCK_KEY = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")


def _check_release_file(weights: OfficialWeights, path: Path, what: str) -> None:
    """Raise unless ``path`` is a PyTorch checkpoint (read safely, tensors mapped) whose state dict has the release's
    blocks per stage and first-stage width: a truncated file, an error page or another network is caught here."""
    from qmamba.files.checkpoint import (  # torch: only when checking
        CheckpointError,
        extract_state_dict,
        read_checkpoint,
    )

    try:
        state = extract_state_dict(read_checkpoint(path, lazy=True))
    except CheckpointError as err:
        if "weights_only" not in str(err.__cause__) or not _intact_archive(path):
            raise WeightsError(f"{what}: {err}") from None
        # a release saved with its training config object: safe loading cannot read it, so the archive's checksums
        # are what can be checked now; its keys are checked when it loads (which needs trust_checkpoint: true)
        log.warning("%s holds pickled Python objects besides its tensors: checked as an intact archive only",
                    path.name)
        return
    blocks = {(int(m[1]), int(m[2])) for key in state if (m := _BLOCK_KEY.match(key))}
    expected = {(stage, block) for stage, depth in enumerate(weights.depths) for block in range(depth)}
    stages = max((stage for stage, _ in blocks), default=-1) + 1
    found = tuple(sum(1 for s, _ in blocks if s == stage) for stage in range(stages))
    width = next((v.shape[0] for k, v in state.items() if k.startswith("layers.0.blocks.0.") and v.dim() == 1), None)
    if blocks != expected or width != weights.width:
        raise WeightsError(f"{what}: its state dict has blocks per stage {found} and width {width}, {weights.model} "
                           f"has {weights.depths} and {weights.width}")


def _intact_archive(path: Path) -> bool:
    """True for a zip archive (torch.save's format) whose every member matches its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


# ------------------------------------------------------------------------------------------------- the download
def _download(weights: OfficialWeights, path: Path, progress: bool, accept_changed: bool) -> CachedWeights:
    """Stream the URL into ``<file>.part`` (resuming what an earlier attempt left), check it, then rename it to
    ``path`` and record it."""
    part, url = _part_path(path), weights.url
    log.info("downloading %s (%s) from %s into %s", weights.file, weights.model, url, path.parent)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            complete = _transfer(url, part, progress)
        except HTTPError as err:
            if err.code == 416 and part.is_file():  # the range starts at or past the end: the partial file is stale
                _discard(part)
                continue
            raise WeightsError(_offline_message(weights, path, f"the server answered HTTP {err.code} {err.reason}"))
        except URLError as err:  # no connection at all: no network, a firewall or a wrong mirror
            raise WeightsError(_offline_message(weights, path, f"cannot reach the server ({_reason(err)})")) from None
        except (ConnectionError, TimeoutError, http.client.HTTPException):  # the connection broke mid-body
            complete = False
        except OSError as err:  # writing the file: a full disk, no permission
            raise WeightsError(f"cannot write {part}: {err.strerror or err}; free space or set {HOME_ENV} to "
                               "another folder") from None
        if complete:
            return _keep(weights, path, accept_changed)
        log.warning("download of %s interrupted (attempt %d of %d): resuming", weights.file, attempt, ATTEMPTS)
    got = part.stat().st_size if part.is_file() else 0
    raise WeightsError(f"the download of {weights.file} from {url} kept breaking off ({got} bytes kept in {part}); "
                       "rerun the same command to resume it")


def _keep(weights: OfficialWeights, path: Path, accept_changed: bool) -> CachedWeights:
    """Check a whole ``<file>.part`` and make it the cached, recorded ``path``; a file that fails is deleted."""
    part = _part_path(path)
    digest, size = file_sha256(part), part.stat().st_size
    try:
        _check_release_file(weights, part, f"{weights.url} sent {size} bytes that are not {weights.model}'s "
                                           f"checkpoint (check {MIRROR_ENV} or the proxy)")
        recorded = _read_record(path)
        if recorded is not None and digest != recorded["sha256"] and not accept_changed:
            raise WeightsError(
                f"{weights.url} now serves {weights.file} with SHA-256 {digest} ({size} bytes), but it was recorded "
                f"as {recorded['sha256']} ({recorded['size']} bytes) on {recorded.get('recorded', '?')}: the file "
                f"changed upstream or the mirror serves another one. If you trust it, accept it with `qmamba weights "
                f"fetch --accept-changed {weights.file}` (runs that recorded the old hash no longer match it)")
    except WeightsError:
        _discard(part)
        raise
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, path)
    _validator_path(part).unlink(missing_ok=True)
    _write_record(path, weights.url, digest, size)
    log.info("saved %s (%d bytes, sha256 recorded)", path, size)
    return CachedWeights(path, weights.url, digest, size)


def _transfer(url: str, part: Path, progress: bool) -> bool:
    """One request: append to ``part`` where an earlier one stopped if the server still has the same file (its
    validator, sent as ``If-Range``), else start again from byte 0. True when the body arrived whole."""
    have, validator = _resumable(part)
    headers = {"User-Agent": "qmamba"}
    if have:
        headers |= {"Range": f"bytes={have}-", "If-Range": validator["etag"] or validator["last_modified"]}
    with urlopen(Request(url, headers=headers), timeout=60) as response:
        if response.headers.get_content_type() == "text/html":
            raise WeightsError(f"{url} answered with an HTML page (HTTP {response.status}) instead of the weights "
                               f"file: check {MIRROR_ENV} or the proxy (open the URL in a browser to see the page)")
        served = _validator(response.headers)
        if response.status == 206:  # the rest of the same file, or a range we cannot use: then start again
            same = have > 0 and bool(served) and served == {k: validator[k] for k in served}
            if not same or _range(response.headers) != (have, validator["total"]):
                log.warning("%s changed since the partial download began: starting again", url)
                _discard(part)
                return False
        resumed = response.status == 206
        total = validator["total"] if resumed else _length(response.headers)
        if not resumed:
            have = 0
            write_text_atomic(_validator_path(part), json.dumps({**served, "total": total}) + "\n")
        bar = _progress_bar(part.name.removesuffix(".part"), total, have) if progress else None
        try:
            with open(part, "ab" if resumed else "wb") as out:
                while block := response.read(CHUNK):
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
                size = out.tell()
        finally:
            if bar is not None:
                bar.close()
    if total is not None and size > total:
        _discard(part)
        raise WeightsError(f"{url} sent {size} bytes where it announced {total}: the mirror is broken")
    return total is None or size == total


def _resumable(part: Path) -> tuple[int, dict[str, Any]]:
    """(bytes to keep, validator) of a partial download; (0, {}) when it cannot be resumed safely (no part file, or
    the server gave no ETag or Last-Modified to check that the rest comes from the same file)."""
    record = _validator_path(part)
    try:
        validator = json.loads(record.read_text())
        if part.is_file() and (validator.get("etag") or validator.get("last_modified")):
            return part.stat().st_size, {"etag": None, "last_modified": None, "total": None, **validator}
    except (OSError, ValueError, AttributeError):
        pass
    return 0, {}


def _validator(headers: Mapping[str, str]) -> dict[str, str]:
    """The response's validators: a strong ETag and Last-Modified (a weak ETag cannot be used with If-Range)."""
    etag, modified = headers.get("ETag"), headers.get("Last-Modified")
    return {**({"etag": etag} if etag and not etag.startswith("W/") else {}),
            **({"last_modified": modified} if modified else {})}


def _range(headers: Mapping[str, str]) -> tuple[int, int | None] | None:
    """(first byte, total) of a 206 response's ``Content-Range: bytes first-last/total``."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("Content-Range", "").strip())
    return None if match is None else (int(match[1]), None if match[2] == "*" else int(match[2]))


def _length(headers: Mapping[str, str]) -> int | None:
    length = headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validator_path(part).unlink(missing_ok=True)


def _progress_bar(name: str, total: int | None, start: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr)


def _local_rank(group: Any) -> int:
    return int(os.environ.get("LOCAL_RANK", group.get_rank()))


def _process_group() -> Any:
    """``torch.distributed`` when a process group is running (imported only if torch already is)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return torch.distributed


def _reason(err: URLError) -> str:
    reason = err.reason
    return str(reason.strerror if isinstance(reason, OSError) and reason.strerror else reason)


def _offline_message(weights: OfficialWeights, path: Path, why: str) -> str:
    return (f"no ImageNet weights for {weights.model}: {why}. Download {weights.url} and save it as {path} "
            f"(or run `qmamba weights fetch {weights.file}` where there is network), or set "
            "pretrained: /path/to/" + weights.file)
