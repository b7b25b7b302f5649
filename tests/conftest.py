"""Shared test configuration: CPU by default, `gpu` tests skipped without CUDA; caches that outlive the clone and
one thread share per parallel worker; the tiny-run work folder and the services the tests share."""

from __future__ import annotations

import os
from pathlib import Path


def _test_cache() -> Path:
    """Where compiled code outlives the clone: $QMAMBA_TEST_CACHE, else $XDG_CACHE_HOME/qmamba-tests."""
    if os.environ.get("QMAMBA_TEST_CACHE"):
        return Path(os.environ["QMAMBA_TEST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qmamba-tests"


# Before torch and numba are imported (they read these once), and inherited by every process a test starts.
TEST_CACHE = _test_cache()
for _variable, _folder in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("NUMBA_CACHE_DIR", "numba"),
                           ("TRITON_CACHE_DIR", "triton")):
    os.environ.setdefault(_variable, str(TEST_CACHE / _folder))
# numba's compiled kernels filed by their source text, not their folder's path: a new clone starts warm too
os.environ.setdefault("NUMBA_CACHE_LOCATOR_CLASSES", "qmamba.ops.jit_cache.SourceKeyedCacheLocator,InTreeCacheLocator,"
                      "UserWideCacheLocator,IPythonCacheLocator,ZipCacheLocator")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    # pytest-xdist's workers share the cores: more threads or inductor compiler processes per worker would only wait
    _SHARE = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    os.environ["OMP_NUM_THREADS"] = os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = _SHARE
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import io
import secrets
from collections.abc import Callable, Iterator
from importlib import metadata

# OpenCV's import prepends its libraries to LD_LIBRARY_PATH: done here, before a test or a forking server
# (tests/forked.py) copies the environment, so that every copy holds one value (a later import made them differ)
import cv2  # noqa: F401
import pytest
import torch
from forked import PRELOAD, Zygote
from iqa_fixtures import make_kadid
from PIL import Image
from suite_timing import SuiteTiming

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"


SUITE_EXTRAS = ("test", "demo", "export")  # what `make install` installs beside qmamba's own dependencies


def unmet_requirements(extras: tuple[str, ...]) -> list[str]:
    """qmamba's requirements (its own and those of ``extras``) that the running environment does not meet."""
    from packaging.requirements import Requirement

    unmet = []
    for line in metadata.requires("qmamba") or []:
        requirement = Requirement(line)
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{requirement.name} is missing")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            unmet.append(f"{requirement.name} {version} is not {requirement.specifier}")
    return unmet


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SuiteTiming(TEST_CACHE / "durations.json"), "suite_timing")


def pytest_sessionstart(session: pytest.Session) -> None:
    """The suite needs the extras that `make install` installs, and its tests import them rather than skip: a
    missing one is one line here, never a green run that tested less."""
    try:
        unmet = unmet_requirements(SUITE_EXTRAS)
    except metadata.PackageNotFoundError:
        return  # run from the source tree (PYTHONPATH=src, as on the GPU machine): the header says so
    if unmet:
        pytest.exit(f"the tests need qmamba's {', '.join(SUITE_EXTRAS)} extras: {'; '.join(unmet)} "
                    "(make install installs them)", returncode=4)


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        metadata.version("qmamba")
    except metadata.PackageNotFoundError:
        return ["qmamba is not installed (run from the source tree): its extras are not checked"]
    return []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shard = os.environ.get("QMAMBA_TEST_SHARD")  # "i/n": every n-th test from the i-th (one of parallel processes)
    if shard:
        index, count = (int(part) for part in shard.split("/"))
        config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
        items[:] = items[index::count]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _torch_globals_kept() -> Iterator[None]:
    """Each test starts with the process-wide torch settings that inductor's cache keys hold as the test before it
    found them. Run in-process by a test, qmamba's CLI sets the float32 matmul precision ("high"), Lightning's
    ``deterministic: true`` turns on deterministic algorithms, and scoring sets the thread count: left set, each made
    the worker's later compile tests miss the previous run's cache whenever another order of tests had put such a
    run before them (LQMamba's compile: 224 s cold, 10 s on a hit, 256 s on such a miss)."""
    precision = torch.get_float32_matmul_precision()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill_memory = torch.utils.deterministic.fill_uninitialized_memory
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    yield
    torch.set_float32_matmul_precision(precision)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill_memory
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A KADID-format fixture and the tiny run config pointing at it; cwd = tmp_path (runs/ lands there)."""
    make_kadid(tmp_path / "kadid")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG.read_text().replace("KADID_ROOT", str(tmp_path / "kadid")))
    monkeypatch.chdir(tmp_path)
    return tmp_path, config


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained one epoch through the CLI on a KADID-format fixture: (fixture root, run folder)."""
    from qmamba.cli import main

    root = tmp_path_factory.mktemp("score")
    make_kadid(root / "kadid")
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG.read_text().replace("KADID_ROOT", str(root / "kadid")).replace(
        "save_dir: runs", f"save_dir: {root / 'runs'}"))
    main(["fit", "--config", str(config)])
    return root, root / "runs" / "tiny"


@pytest.fixture(scope="session")
def forked_qmamba() -> Iterator[Callable[[str], Zygote]]:
    """``forked_qmamba(command)``: a server that has imported what `qmamba COMMAND` imports (or, for "benchmarks",
    the benchmark scripts) and forks `python -m qmamba ...` and `python SCRIPT ...` processes from it
    (tests/forked.py), started on first use, one per command and test process."""
    zygotes: dict[str, Zygote] = {}

    def zygote(command: str) -> Zygote:
        if command not in zygotes:
            zygotes[command] = Zygote(PRELOAD[command])
        return zygotes[command]

    yield zygote
    for started in zygotes.values():
        started.close()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A folder on a tmpfs that holds 32 KiB (mounted for the test, as root; skipped where mounting is not
    allowed): a disk that fills up, for real."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()}): needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt != "PNG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="session")
def collection(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """4 shards written by webdataset, of 3 images each (jpg, png, webp) with a .json metadata member per key, a
    corrupt jpg member and a text file named .png, and the same images as loose files: (shards folder, {member name:
    loose file})."""
    import webdataset

    root, _ = trained
    sources = sorted((root / "kadid" / "images").glob("I0*.png"))
    base = tmp_path_factory.mktemp("collection")
    shards, loose = base / "shards", base / "loose"
    shards.mkdir()
    loose.mkdir()
    files = {}
    for s in range(4):
        with webdataset.TarWriter(str(shards / f"{s:06d}.tar")) as sink:
            for i, fmt in enumerate(("JPEG", "PNG", "WEBP")):
                key = f"{s:06d}{i:03d}"
                ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
                data = _encode(Image.open(sources[(3 * s + i) % len(sources)]).convert("RGB"), fmt)
                sink.write({"__key__": key, ext: data, "json": {"key": key, "caption": "a test image"}})
                files[f"{key}.{ext}"] = loose / f"{key}.{ext}"
                files[f"{key}.{ext}"].write_bytes(data)
            if s == 2:
                sink.write({"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 not a jpeg"})
                sink.write({"__key__": "text", "png": b"a text file under an image name"})
    return shards, files


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 API on 127.0.0.1 (moto's server), one per test process: its URL."""
    import moto.server as moto_server

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """The S3 API emptied, with an empty bucket ``iqa``, and this process's credentials for it: (boto3 client, the
    environment that reaches it)."""
    import urllib.request

    import boto3
    import s3fs

    # moto accepts any credentials; a secret of its own lets the tests look for it where it must not be
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": f"qmamba-test-secret-{secrets.token_hex(8)}",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # moto keeps its buckets per process, not per server: start from none
    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST")).close()
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="iqa")
    s3fs.S3FileSystem.clear_instance_cache()  # s3fs keeps its file systems, endpoint included: none from another test
    yield client, env
    s3fs.S3FileSystem.clear_instance_cache()
