"""ImageNet-pretrained VMamba weights by name: which official file each preset starts from, and a verified cache.

``pretrained: imagenet`` resolves a backbone preset to its checkpoint in the GitHub releases of MzeroMiko/VMamba
(the paper's initialisation), downloads it once into ``$QMAMBA_HOME/weights`` (default ``~/.cache/qmamba``) and
checks it on every later use. VMamba publishes no checksums, so the SHA-256 and size of the first download are
recorded next to the file (``<file>.json``) and every later use re-hashes the file against that record.

A download streams into ``<file>.part``, resumes it after a dropped connection, and becomes ``<file>`` only once
complete; an exclusive lock per file lets one process download while the others (DDP ranks, parallel jobs) wait
and then read the cached file. ``QMAMBA_WEIGHTS_MIRROR`` replaces the GitHub base URL (a mirror or an intranet
copy laid out like the releases). No torch here: ``qmamba weights list`` starts instantly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import Request, urlopen

from qmamba.atomic import write_text_atomic
from qmamba.errors import QMambaError, UsageError

__all__ = [
    "IMAGENET",
    "OFFICIAL_FILES",
    "CachedWeights",
    "OfficialWeights",
    "WeightsError",
    "cache_state",
    "fetch",
    "official_weights",
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
    """One checkpoint file of VMamba's GitHub releases."""

    file: str
    tag: str  # the release tag, '#v2cls' or '#v0cls'
    model: str  # VMamba's own name for the network it holds

    @property
    def url(self) -> str:
        base = os.environ.get(MIRROR_ENV) or RELEASES
        return f"{base.rstrip('/')}/{quote(self.tag, safe='')}/{self.file}"


_T_S2L5 = OfficialWeights("vssm_tiny_0230_ckpt_epoch_262.pth", "#v2cls", "VMamba-T [s2l5]")
_T_S1L8 = OfficialWeights("vssm1_tiny_0230s_ckpt_epoch_264.pth", "#v2cls", "VMamba-T [s1l8]")
_S = OfficialWeights("vssm_small_0229_ckpt_epoch_222.pth", "#v2cls", "VMamba-S [s2l15]")
_B = OfficialWeights("vssm_base_0229_ckpt_epoch_237.pth", "#v2cls", "VMamba-B [s2l15]")
_V0_T = OfficialWeights("vssmtiny_dp01_ckpt_epoch_292.pth", "#v0cls", "Vanilla-VMamba-T")

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


def weights_dir() -> Path:
    """``$QMAMBA_HOME/weights``, by default ``~/.cache/qmamba/weights``."""
    home = os.environ.get(HOME_ENV)
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "qmamba") / "weights"


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
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsError(f"pretrained: {path} does not exist; give the path of an official VMamba .pth file, or "
                           f"pretrained: {IMAGENET} to download the preset's own")
    return path, CachedWeights(path, None, _sha256(path), path.stat().st_size).provenance(str(path))


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


def fetch(weights: OfficialWeights, download: bool = True, progress: bool | None = None) -> CachedWeights:
    """The verified cached file, downloaded first when absent (``download=False``: an error instead).

    Under ``torch.distributed`` the first process of each node fetches while the others wait at a barrier and then
    read the cache; without a process group, the file lock alone makes parallel jobs download once.
    """
    distributed = _process_group()
    if distributed is not None and _local_rank(distributed) != 0:
        distributed.barrier()  # the node's first rank downloads (and reports its own failure)
        return _fetch(weights, download=False, progress=False)
    try:
        return _fetch(weights, download, progress)
    finally:
        if distributed is not None:
            distributed.barrier()


def verify(weights: OfficialWeights) -> CachedWeights | None:
    """Re-hash a cached file against its record; ``None`` when it is not cached."""
    path = weights_dir() / weights.file
    if not path.is_file():
        return None
    with _lock(path):
        return _verified(path, weights.url)


def _fetch(weights: OfficialWeights, download: bool, progress: bool | None) -> CachedWeights:
    path = weights_dir() / weights.file
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        if path.is_file():
            return _verified(path, weights.url)
        if not download:
            raise WeightsError(_offline_message(weights, path, "it is not in the cache"))
        _download(weights, path, sys.stderr.isatty() if progress is None else progress)
        return _verified(path, weights.url)


def _verified(path: Path, url: str) -> CachedWeights:
    """The file checked against its record; a file placed by hand (no record yet) is hashed and recorded."""
    digest, size = _sha256(path), path.stat().st_size
    record = _record_path(path)
    if not record.is_file():
        log.info("recording %s placed in the cache by hand: sha256 %s, %d bytes", path.name, digest, size)
        _write_record(path, url, digest, size)
        return CachedWeights(path, url, digest, size)
    try:
        recorded = json.loads(record.read_text())
        expected, expected_size = recorded["sha256"], int(recorded["size"])
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{record} is not a weights record ({err}); delete it to re-record {path.name}") from None
    if digest != expected or size != expected_size:
        raise WeightsError(f"{path} does not match its recorded SHA-256 {expected} ({size} bytes against "
                           f"{expected_size}): the file is corrupt or was replaced; delete it and run "
                           f"`qmamba weights fetch {path.name}` again")
    return CachedWeights(path, recorded.get("url", url), digest, size)


def _write_record(path: Path, url: str, digest: str, size: int) -> None:
    record = {"file": path.name, "url": url, "sha256": digest, "size": size,
              "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text_atomic(_record_path(path), json.dumps(record, indent=2) + "\n")


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<file>.lock``: released by the kernel if the process dies."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- the download
def _download(weights: OfficialWeights, path: Path, progress: bool) -> None:
    """Stream the URL into ``<file>.part`` (resuming what an earlier attempt left), then rename it to ``path``."""
    part, url = _part_path(path), weights.url
    log.info("downloading %s (%s) from %s into %s", weights.file, weights.model, url, path.parent)
    for attempt in range(1, ATTEMPTS + 1):
        have = part.stat().st_size if part.is_file() else 0
        try:
            complete = _transfer(url, part, have, progress)
        except HTTPError as err:
            if err.code == 416 and have:  # the range starts at or past the end: the partial file is stale
                part.unlink()
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
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(part, path)
            _write_record(path, url, _sha256(path), path.stat().st_size)
            log.info("saved %s (%d bytes, sha256 recorded)", path, path.stat().st_size)
            return
        log.warning("download of %s interrupted (attempt %d of %d): resuming", weights.file, attempt, ATTEMPTS)
    got = part.stat().st_size if part.is_file() else 0
    raise WeightsError(f"the download of {weights.file} from {url} kept breaking off ({got} bytes kept in {part}); "
                       "rerun the same command to resume it")


def _transfer(url: str, part: Path, have: int, progress: bool) -> bool:
    """One request: append to ``part`` from byte ``have`` (or restart when the server ignores the range).
    True when the body arrived whole."""
    headers = {"User-Agent": "qmamba", **({"Range": f"bytes={have}-"} if have else {})}
    with urlopen(Request(url, headers=headers), timeout=60) as response:
        resumed = have > 0 and response.status == 206
        start = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        bar = _progress_bar(part.name.removesuffix(".part"), total, start) if progress else None
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
    return total is None or size == total


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
