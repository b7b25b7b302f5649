"""Images that are not files on this machine, and what an input holds.

What an input holds (:func:`expand`):

* an image file, or a folder (recursive, sorted, symlinks followed once; image suffixes only);
* a tar shard (``.tar``, WebDataset's and img2dataset's format): each image member is one row keyed
  ``<shard>#<member name>``, so its scores join back to the shard's metadata (``__key__`` is the member name without
  its extension); other members (``.json``, ``.txt``, ``.cls``) are metadata, not rows;
* a table (``.parquet``, ``.csv``, ``.jsonl``) whose ``column`` (default ``path``, else ``url``) names an image per
  row: a local path as written, or a URI;
* any of these behind an fsspec URI (``s3://bucket/shards/000000.tar``, ``https://...``), and brace patterns
  (``shards/{000000..000999}.tar``) expanded first.

A :class:`Source` *is* its row key, a ``str`` (``shards/000001.tar#000123.jpg`` or the URI), so that scoring, resume,
de-duplication and sharding treat it like a path, and it fetches its own bytes: a tar member by its offset and size
in the shard (one range read; the shard was listed once, streamed when remote), a URI through fsspec (imported only
when used). Sources are small and picklable: DataLoader workers fetch and decode them. A shard or table that is
missing or unreadable, or a column it lacks, is an :class:`InputError` (one line) before anything is scored; an image
that cannot be read is that image's error when it is scored.

Reads are bounded (:class:`NetworkLimits`): a URI must answer and keep sending within ``timeout`` seconds (http(s)
and s3 connections are given it; other protocols keep their library's own), a whole image must arrive within it,
and an image or tar member may hold at most ``max_bytes``: reading stops there, so a URL that answers 10 GB costs
``max_bytes`` of memory and that image's error row, never the machine.

    keys, missing = expand(["shards/{000000..000003}.tar", "images.parquet"])
    scores = qmamba.load("best.ckpt").score(keys)
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import os
import re
import tarfile
import time
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import HTTPRedirectHandler, Request, build_opener

from qmamba.errors import QMambaError, UsageError
from qmamba.redaction import without_password

if TYPE_CHECKING:
    import numpy as np

__all__ = ["IMAGE_SUFFIXES", "InputError", "NetworkLimits", "RemoteFile", "RemoteReadError", "Shard", "Source",
           "TarMember", "expand", "is_uri", "open_uri", "read_image", "read_remote", "shard_images", "shard_of"]

READ_CHUNK = 1 << 20  # bytes asked for per read of a remote image: the deadline and the size bound are checked between


@dataclass(frozen=True)
class NetworkLimits:
    """How long and how much one read may take: ``timeout`` seconds to connect, between the bytes of an answer, and
    for a whole image to arrive (``--timeout``); ``max_bytes`` in one image or tar member (``--max-image-mb``: the
    default is above the largest 8-bit RGBA image Pillow's pixel limit lets decode, 358 MB)."""

    timeout: float = 60.0
    max_bytes: int = 512 * 2**20
    bound: str | None = None  # what max_bytes is, for messages: one image's bound (--max-image-mb) by default

    def storage_options(self, path: str) -> dict[str, Any]:
        """fsspec options that give ``path``'s connection the timeout."""
        scheme = path.partition("://")[0].lower()
        if scheme in ("http", "https"):
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
            return {"client_kwargs": {"timeout": timeout}}
        if scheme in ("s3", "s3a"):
            return {"config_kwargs": {"connect_timeout": self.timeout, "read_timeout": self.timeout}}
        return {}

    def too_large(self, name: str, size: int | None = None) -> str:
        held = f" ({size / 2**20:.1f} MB)" if size is not None else ""
        if self.bound:
            return f"{name} holds more than {self.bound}{held}"
        return (f"{name} holds more than {self.max_bytes / 2**20:g} MB{held}, the bound of one image "
                "(--max-image-mb)")


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (anything fsspec opens), false for a local path."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isidentifier()


def open_uri(path: str, mode: str = "rb", *, limits: NetworkLimits) -> Any:
    """``path`` opened through fsspec, with ``limits``' timeout on its connection (a missing extra is one line
    naming the install command)."""
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"reading {path} needs fsspec: pip install \"qmamba[cloud]\" (fsspec, s3fs, gcsfs)") from None
    try:
        return fsspec.open(path, mode, **limits.storage_options(path)).open()
    except ImportError as err:  # fsspec's message names the package of the URI's protocol
        raise UsageError(f"reading {path}: {err}") from None


class RemoteReadError(OSError):
    """A remote image that could not be read within its limits; the message says why in one line."""


def read_remote(path: str, limits: NetworkLimits) -> bytes:
    """A remote image's bytes, within ``limits``; a :class:`RemoteReadError` says what went wrong (no answer, too
    slow, too large, the HTTP status), a URL's password masked.

    http(s) is read with the standard library: one GET, its status kept (fsspec asks for the size first and reports
    every failure of that request, a timeout included, as not found)."""
    try:
        return _read_remote(path, limits)
    except RemoteReadError as err:
        raise RemoteReadError(without_password(str(err))) from None


def _read_remote(path: str, limits: NetworkLimits) -> bytes:
    try:
        return _read_bounded(path, limits)
    except (UsageError, RemoteReadError):
        raise
    except HTTPError as err:
        raise RemoteReadError(f"cannot read {path}: HTTP {err.code} {err.reason}") from None
    except Exception as err:  # noqa: BLE001 - each fsspec backend raises its own (botocore, gcsfs, ...)
        cause = _underlying(err)
        if isinstance(cause, TimeoutError) or "timeout" in type(cause).__name__.lower():
            raise RemoteReadError(f"no answer from {path} within {limits.timeout:g} s (--timeout)") from None
        if isinstance(err, FileNotFoundError):
            raise RemoteReadError(f"{path} was not found") from None
        raise RemoteReadError(f"cannot read {path}: {_reason(cause)}") from None


def _underlying(err: BaseException) -> BaseException:
    """The error a wrapper stands for: urllib's URLError holds it as its ``reason``, fsspec's FileNotFoundError as
    its cause; any other error stands for itself."""
    inner = err.reason if isinstance(err, URLError) else err.__cause__ if isinstance(err, FileNotFoundError) else None
    return inner if isinstance(inner, BaseException) else err


def _read_bounded(path: str, limits: NetworkLimits) -> bytes:
    deadline = time.monotonic() + limits.timeout
    chunks, held = [], 0
    with _open_stream(path, limits) as f:
        read = getattr(f, "read1", f.read)  # read1: what has arrived, so that a trickle meets the deadline
        while chunk := read(READ_CHUNK):
            held += len(chunk)
            if held > limits.max_bytes:
                raise RemoteReadError(limits.too_large(path))
            if time.monotonic() > deadline:
                raise RemoteReadError(f"{path} was still arriving after {limits.timeout:g} s ({held / 2**20:.1f} MB "
                                      "so far; --timeout)")
            chunks.append(chunk)
    return b"".join(chunks)


def _open_stream(path: str, limits: NetworkLimits) -> Any:
    """``path`` opened for one read from its start: a GET whose every socket operation has the timeout for http(s)
    (credentials in the URL sent as basic authentication), fsspec for other protocols."""
    parts = urlsplit(path)
    if parts.scheme.lower() not in ("http", "https"):
        return open_uri(path, limits=limits)
    if parts.username is None:
        return _OPENER.open(Request(path, headers={"User-Agent": "qmamba"}), timeout=limits.timeout)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    request = Request(urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))),
                      headers={"User-Agent": "qmamba"})
    token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    request.add_unredirected_header("Authorization", f"Basic {base64.b64encode(token).decode()}")
    return _OPENER.open(request, timeout=limits.timeout)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(
        parts.scheme.lower())


class _CredentialsStayHome(HTTPRedirectHandler):
    """Redirects followed as urllib follows them, but a URL's credentials (kept out of the headers that urllib copies
    to a redirect) go along only to the same scheme, host and port: curl's rule, so a server cannot hand the
    password on to another host by answering 302."""

    def redirect_request(self, req: Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
                         ) -> Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        credentials = req.unredirected_hdrs.get("Authorization")
        if new is not None and credentials and _origin(new.full_url) == _origin(req.full_url):
            new.add_unredirected_header("Authorization", credentials)
        return new


_OPENER = build_opener(_CredentialsStayHome)


class Source(str):
    """A row key that fetches its image's bytes (:meth:`read`)."""

    def read(self) -> bytes:
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, ...]:  # str subclasses pickle their value, not their fields: keep both
        return type(self), (str(self), *self._fields())

    def _fields(self) -> tuple[Any, ...]:
        return ()


def read_image(image: str | os.PathLike[str], max_side: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a local image file or of a :class:`Source`'s bytes, named by its key in messages (see
    :func:`~qmamba.inference.images.read_rgb`)."""
    from .images import NamedBytes, read_rgb  # numpy and PIL: not for listing inputs

    if isinstance(image, Source):
        return read_rgb(NamedBytes(image.read(), str(image)), max_side)
    return read_rgb(image, max_side)


class TarMember(Source):
    """``<shard>#<member name>``: ``size`` bytes at ``offset`` of a tar shard (a local path or a URI)."""

    shard: str
    offset: int
    size: int
    limits: NetworkLimits

    def __new__(cls, key: str, shard: str, offset: int, size: int, limits: NetworkLimits = NetworkLimits()
                ) -> TarMember:
        member = super().__new__(cls, key)
        member.shard, member.offset, member.size, member.limits = shard, offset, size, limits
        return member

    def _fields(self) -> tuple[Any, ...]:
        return self.shard, self.offset, self.size, self.limits

    def read(self) -> bytes:
        if self.size > self.limits.max_bytes:  # its header says so: nothing is read
            raise OSError(self.limits.too_large(str(self), self.size))
        with (open_uri(self.shard, limits=self.limits) if is_uri(self.shard) else open(self.shard, "rb")) as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.shard} ends before its member {self} does (the shard changed or is truncated)")
        return data


class RemoteFile(Source):
    """An image file behind an fsspec URI, read within ``limits``. Its key is the URI with its credentials masked
    (:func:`~qmamba.errors.without_password`), so that no output, record or message holds them; ``url`` keeps them
    for the read."""

    url: str
    limits: NetworkLimits

    def __new__(cls, url: str, limits: NetworkLimits = NetworkLimits()) -> RemoteFile:
        remote = super().__new__(cls, without_password(url))
        remote.url, remote.limits = url, limits
        return remote

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.url, self.limits)

    def read(self) -> bytes:
        return read_remote(self.url, self.limits)


class Shard(str):
    """A tar shard named whole, its members not listed: an engine that reads each shard in one task streams it once
    (:func:`shard_images`) instead of listing it here and range-reading every member."""


def shard_of(key: str, shards: Container[str]) -> str | None:
    """The shard among ``shards`` that the member key ``<shard>#<member name>`` belongs to, if any (a shard's name
    may hold a ``#`` of its own, so each ``#`` is tried in turn)."""
    cut = key.find("#")
    while cut != -1:
        if key[:cut] in shards:
            return key[:cut]
        cut = key.find("#", cut + 1)
    return None


# ------------------------------------------------------------------------------------------------------------ inputs
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm"}
SHARD_SUFFIXES = {".tar"}
TABLE_SUFFIXES = {".parquet", ".csv", ".jsonl"}
COLUMNS = ("path", "url")  # tried in order when --column is not given


class InputError(QMambaError):
    """A shard or table that cannot be read, or a column it lacks: the run cannot score what was asked."""


def expand(inputs: list[str], column: str | None = None, list_shards: bool = True,
           limits: NetworkLimits = NetworkLimits()) -> tuple[list[str], list[tuple[str, str]]]:
    """The images of every input as row keys (paths and :class:`Source` objects, which read within ``limits``), in
    order; inputs that lead nowhere are returned as ``(path, reason)``. With ``list_shards`` false a shard is one
    :class:`Shard`, checked to be a readable tar file but not listed."""
    files: list[str] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        for name in _braces(item):
            suffix = PurePosixPath(name.split("?", 1)[0]).suffix.lower()
            if suffix in SHARD_SUFFIXES:
                files += _shard_members(name, limits) if list_shards else [_checked_shard(name, limits)]
            elif suffix in TABLE_SUFFIXES:
                files += _table_images(name, suffix, column, limits)
            elif is_uri(name):
                files.append(RemoteFile(name, limits))
            else:
                _local(Path(name), files, errors)
    return files, errors


MAX_PATTERN_NAMES = 1_000_000  # names one brace pattern may stand for (a typo of two digits makes 100 million)
_GROUP = re.compile(r"\{([^{}\\]*)\}")  # a brace group without nested groups or escapes
_RANGE = re.compile(r"(-?\d+|[A-Za-z])\.\.(-?\d+|[A-Za-z])(?:\.\.(-?\d+))?")


def _braces(item: str) -> list[str]:
    """The names a brace pattern stands for; one of more than :data:`MAX_PATTERN_NAMES` is refused before it is
    expanded (counted from its groups) or, for patterns too intricate to count, as soon as the lazy expansion passes
    the bound."""
    if "{" not in item:
        return [item]
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise UsageError(f"the brace pattern {item} needs braceexpand: pip install \"qmamba[cloud]\"") from None
    count = _pattern_count(item)
    if count is None or count <= MAX_PATTERN_NAMES:
        names = list(itertools.islice(braceexpand(item), MAX_PATTERN_NAMES + 1))
        if len(names) <= MAX_PATTERN_NAMES:
            return names
    raise InputError(f"the brace pattern {item} stands for more than {MAX_PATTERN_NAMES:,} names (a typo in a "
                     "range?); split it into several patterns")


def _pattern_count(item: str) -> int | None:
    """How many names a pattern of plain groups (``{a..b}``, ``{a..b..step}``, ``{x,y,z}``) stands for; None for
    nested groups and escapes, which only braceexpand itself reads right."""
    if "\\" in item or _GROUP.sub("", item).count("{"):
        return None
    count = 1
    for group in _GROUP.findall(item):
        span = _RANGE.fullmatch(group)
        if span:
            first, last, step = span.groups()
            low, high = (int(first), int(last)) if first.lstrip("-").isdigit() and last.lstrip("-").isdigit() else (
                ord(first), ord(last))
            count *= abs(high - low) // max(1, abs(int(step or 1))) + 1
        else:
            count *= len(group.split(",")) if "," in group else 1
    return count


def _local(path: Path, files: list[str], errors: list[tuple[str, str]]) -> None:
    if path.is_dir():
        _walk(path, files, errors, set())
    elif path.is_file():
        files.append(str(path))
    elif path.is_symlink():
        errors.append((str(path), "broken symbolic link"))
    else:
        errors.append((str(path), "no such file or folder"))


def _walk(folder: Path, files: list[str], errors: list[tuple[str, str]], seen: set[tuple[int, int]]) -> None:
    stat = folder.stat()
    if (stat.st_dev, stat.st_ino) in seen:
        errors.append((str(folder), "symbolic link loop (folder already visited)"))
        return
    seen = seen | {(stat.st_dev, stat.st_ino)}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        try:
            if entry.is_dir():  # follows links
                _walk(path, files, errors, seen)
            elif entry.is_file():
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(str(path))
            elif entry.is_symlink():
                errors.append((str(path), "broken symbolic link"))
        except OSError as err:  # e.g. a link loop the OS itself refuses (ELOOP) or a folder we may not read
            errors.append((str(path), err.strerror or str(err)))


def _open(name: str, what: str, limits: NetworkLimits) -> IO[bytes]:
    """A shard or table, local or remote; one line when it cannot be opened (missing, no credentials, ...)."""
    try:
        return open_uri(name, limits=limits) if is_uri(name) else open(name, "rb")
    except UsageError:
        raise
    except FileNotFoundError:
        raise InputError(f"{what} {name} does not exist") from None
    except Exception as err:  # noqa: BLE001 - fsspec backends raise their own types (credentials, HTTP, ...)
        raise InputError(f"cannot open {what} {name}: {_reason(err)}") from None


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _shard_members(shard: str, limits: NetworkLimits) -> list[str]:
    """Image members of a tar shard, in the shard's order, listed in one streaming pass."""
    _checked_shard(shard, limits)  # a compressed shard's offsets would be those of its decompressed stream
    try:  # a remote shard streams through once; a local one is read by seeking past each member's data
        with _open(shard, "shard", limits) as f, \
                tarfile.open(fileobj=f, mode="r|" if is_uri(shard) else "r:") as archive:
            key = without_password(shard)
            return [TarMember(f"{key}#{member.name}", shard, member.offset_data, member.size, limits)
                    for member in _image_members(archive, unique=False)]
    except (tarfile.TarError, OSError, EOFError) as err:
        raise InputError(_unreadable_shard(shard, err)) from None


def _unreadable_shard(shard: str, err: BaseException) -> str:
    return f"cannot read the shard {shard}: {_reason(err)} (not a tar file, or truncated)"


def _image_members(archive: tarfile.TarFile, unique: bool = True) -> Iterator[tarfile.TarInfo]:
    """The image members of a shard; other members are the samples' metadata. A tar file may repeat a name: with
    ``unique`` the first counts, as in ``qmamba score``'s de-duplication of its inputs, which sees (and says) the
    repeats when a listing keeps them."""
    seen: set[str] = set()
    for member in archive:
        if member.isfile() and PurePosixPath(member.name).suffix.lower() in IMAGE_SUFFIXES and not (
                unique and member.name in seen):
            seen.add(member.name)
            yield member


# what a compressed shard starts with, and the tool that decompresses it
COMPRESSED = {b"\x1f\x8b": ("gzip", "gzip"), b"BZh": ("bzip2", "bzip2"), b"\xfd7zXZ\x00": ("xz", "xz"),
              b"\x28\xb5\x2f\xfd": ("zstd", "zstd")}


def _checked_shard(shard: str, limits: NetworkLimits) -> Shard:
    """``shard`` after reading its first header (one small read): a missing, unreachable, compressed or non-tar
    shard is an :class:`InputError` before any work starts, whichever engine reads it.

    Compressed shards are refused: a member is read where it lies in the shard (by offset, or streamed once by the
    Ray engine's reading task), which a compressed stream does not allow without decompressing everything before
    it; WebDataset's tools write uncompressed shards."""
    with _open(shard, "shard", limits) as f:
        head = f.read(tarfile.BLOCKSIZE)
    for magic, (kind, tool) in COMPRESSED.items():
        if head.startswith(magic):
            raise InputError(f"the shard {shard} is {kind}-compressed; qmamba reads uncompressed tar shards: "
                             f"decompress it first ({tool} -dc < {PurePosixPath(shard).name} > NAME.tar)")
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.EOFHeaderError:  # a zero block: an archive without members
        pass
    except tarfile.HeaderError as err:
        raise InputError(_unreadable_shard(shard, err)) from None
    return Shard(shard)


def shard_images(shard: str, skip: frozenset[str] = frozenset(), limits: NetworkLimits = NetworkLimits()
                 ) -> Iterator[tuple[str, bytes | None, str | None]]:
    """``(key, bytes, None)`` for each image member of a shard not in ``skip`` (keys), streaming it once; a member
    above ``limits.max_bytes`` is ``(key, None, reason)``, unread; a shard that breaks off (truncated, unreadable)
    ends with ``(shard, None, reason)`` after the members before the break."""
    try:
        with _open(shard, "shard", limits) as f, tarfile.open(fileobj=f, mode="r|") as archive:
            for member in _image_members(archive):
                key = f"{without_password(shard)}#{member.name}"
                if key in skip:
                    continue
                if member.size > limits.max_bytes:
                    yield key, None, limits.too_large(key, member.size)
                    continue
                data = archive.extractfile(member).read()  # type: ignore[union-attr]  (a file member)
                yield key, data, None
    except (tarfile.TarError, OSError, EOFError, InputError) as err:
        yield without_password(shard), None, without_password(
            str(err) if isinstance(err, InputError) else _unreadable_shard(shard, err))


def _table_images(table: str, suffix: str, column: str | None, limits: NetworkLimits) -> list[str]:
    """The images a table names, one per row with a value in its path column."""
    with _open(table, "table", limits) as f:
        data = f.read()
    try:
        columns = _read_table(data, suffix)
    except Exception as err:  # noqa: BLE001 - pyarrow, csv and json each raise their own
        raise InputError(f"cannot read the table {table}: {_reason(err)}") from None
    if not any(columns.values()):  # an empty file, a header alone, a table of no rows: the same in every format
        raise InputError(f"the table {table} has no rows")
    wanted = [column] if column else [c for c in COLUMNS if c in columns]
    if not wanted or wanted[0] not in columns:
        raise InputError(f"the table {table} has no column {column or ' or '.join(COLUMNS)} (its columns: "
                         f"{', '.join(columns) or 'none'}); name the one with the images with --column")
    values = [str(v) for v in columns[wanted[0]] if v not in (None, "")]
    return [RemoteFile(v, limits) if is_uri(v) else v for v in values]


def _read_table(data: bytes, suffix: str) -> dict[str, list[object]]:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pydict()
    if suffix == ".csv":  # a spreadsheet's UTF-8 byte order mark is no part of the first column's name
        reader = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape").removeprefix("\ufeff"), newline=""))
        names, rows = next(reader, []), list(reader)
        return {name: [row[i] if i < len(row) else None for row in rows] for i, name in enumerate(names)}
    entries = [json.loads(line) for line in data.decode("utf-8", "surrogateescape").split("\n") if line.strip()]
    names = list(dict.fromkeys(k for e in entries for k in e))
    return {name: [e.get(name) for e in entries] for name in names}
