"""``pretrained: imagenet``: real HTTP downloads from a server on 127.0.0.1 laid out like VMamba's GitHub releases
(``QMAMBA_WEIGHTS_MIRROR`` points at it), the verified cache, resumed downloads, the offline message, two ranks
downloading once, and the run's record of the weights it started from."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from vmamba_fixtures import fake_official_checkpoint, official_keys

from qmamba.cli import main
from qmamba.errors import UsageError
from qmamba.files.weights import OFFICIAL_FILES, OfficialWeights, WeightsError, fetch, resolve_pretrained
from qmamba.models import build_backbone

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PAPER_RUNS = [CONFIG_DIR / "universal.yaml", *sorted(CONFIG_DIR.glob("task/*.yaml"))]
TINY_FILE = OFFICIAL_FILES["qmamba_tiny"].file


class ReleaseServer:
    """Files served like GitHub release assets: ``/<quoted tag>/<file>``, byte ranges answered with 206 when the
    ``If-Range`` validator still matches (a strong ETag from the content, and Last-Modified). Every GET is recorded
    with its Range header. Misbehaviours on demand: ``drop_after`` cuts the next responses after that many body
    bytes; ``ignore_range`` answers every request whole; ``ignore_if_range`` honours a Range whatever the file;
    ``validators`` off sends neither ETag nor Last-Modified; ``content_type`` and ``status`` replace the answer's;
    ``send_length`` off closes the connection instead of announcing the length."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: list[int] = []  # one entry per response to cut, consumed in order
        self.ignore_range = self.ignore_if_range = False
        self.validators = self.send_length = True
        self.content_type = "application/octet-stream"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = unquote(self.path).rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
                start = 0
                if_range = self.headers.get("If-Range")
                if self.headers.get("Range") and not server.ignore_range and (
                        if_range is None or if_range == etag or server.ignore_if_range):
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_error(416, "Range Not Satisfiable")
                        return
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", server.content_type)
                if server.validators:
                    self.send_header("ETag", etag)
                    self.send_header("Last-Modified", "Tue, 24 Sep 2024 10:00:00 GMT")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                if server.send_length:
                    self.send_header("Content-Length", str(len(data) - start))
                else:
                    self.close_connection = True
                self.end_headers()
                body = data[start:]
                if server.drop_after:
                    body = body[:server.drop_after.pop(0)]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def gets(self, name: str) -> int:
        return sum(1 for n, _ in self.requests if n == name)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A release server as the weights mirror, and an empty cache under tmp_path."""
    release = ReleaseServer()
    monkeypatch.setenv("QMAMBA_WEIGHTS_MIRROR", release.url)
    monkeypatch.setenv("QMAMBA_HOME", str(tmp_path / "home"))
    yield release
    release.httpd.shutdown()
    release.httpd.server_close()


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor]]:
    """VMamba-T s2l5's release file (random weights, the official names and shapes): bytes and state."""
    path = tmp_path_factory.mktemp("official") / TINY_FILE
    state = fake_official_checkpoint(path, "keys_vmamba_tiny_s2l5.txt")
    return path.read_bytes(), state


def release_bytes(tmp_path: Path, keys: str = "keys_vmamba_tiny_s2l5.txt", version: int = 0) -> bytes:
    """A small file with a release's structure (its keys; 1-D weights at their width, the rest one value, and a
    1000-class head for size): what the cache checks a download against, at ~3 MB instead of ~120."""
    state = {k: torch.full(shape if len(shape) == 1 else (1,), float(version))
             for k, shape in official_keys(keys).items()}
    state["classifier.head.weight"] = torch.full((1000, 768), float(version))
    path = tmp_path / f"release-{keys}-{version}.pth"
    torch.save({"model": state, "epoch": 262}, path)
    return path.read_bytes()


def _cache(tmp_path: Path) -> Path:
    return tmp_path / "home" / "weights"


def test_first_use_downloads_with_progress_then_the_cache_serves_without_network(server, tmp_path, tiny_official,
                                                                                 capsys):
    data, state = tiny_official
    server.files[TINY_FILE] = data
    cached = fetch(OFFICIAL_FILES["qmamba_tiny"], progress=True)
    assert f"{TINY_FILE}: 100%" in capsys.readouterr().err  # the progress bar reached the end
    assert cached.path == _cache(tmp_path) / TINY_FILE and cached.path.read_bytes() == data
    assert cached.sha256 == hashlib.sha256(data).hexdigest() and cached.size == len(data)
    record = json.loads((_cache(tmp_path) / f"{TINY_FILE}.json").read_text())
    assert record["sha256"] == cached.sha256 and record["url"].endswith(f"/%23v2cls/{TINY_FILE}")
    assert not (_cache(tmp_path) / f"{TINY_FILE}.part").exists()

    server.httpd.shutdown()  # no network from here on
    backbone = build_backbone("qmamba_tiny", pretrained="imagenet")
    assert torch.equal(backbone.state_dict()["layers.2.blocks.3.op.A_logs"], state["layers.2.blocks.3.op.A_logs"])
    assert server.gets(TINY_FILE) == 1


def test_a_corrupted_cache_file_is_named_by_its_hash_check(server, tmp_path, capsys):
    server.files[TINY_FILE] = release_bytes(tmp_path)
    path = fetch(OFFICIAL_FILES["qmamba_tiny"]).path
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    with pytest.raises(WeightsError, match=f"{path} does not match its recorded SHA-256"):
        fetch(OFFICIAL_FILES["qmamba_tiny"])
    with pytest.raises(SystemExit) as exit_info:
        main(["weights", "verify"])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert f"{TINY_FILE}: FAILED" in out and f"{OFFICIAL_FILES['qmamba_small'].file}: not cached" in out
    assert err.count("\n") == 1 and "failed verification" in err
    assert server.gets(TINY_FILE) == 1  # detected, not silently downloaded again


@pytest.mark.parametrize("server_ranges", [True, False], ids=["resumed", "restarted"])
def test_a_dropped_connection_resumes_or_restarts_into_an_intact_file(server, server_ranges, tmp_path):
    data = release_bytes(tmp_path)
    server.files[TINY_FILE] = data
    server.drop_after = [300_000, 200_000]  # two broken responses, then a whole one
    server.ignore_range = not server_ranges
    cached = fetch(OFFICIAL_FILES["qmamba_tiny"], progress=False)
    assert cached.path.read_bytes() == data and cached.sha256 == hashlib.sha256(data).hexdigest()
    ranges = [r for _, r in server.requests]
    assert ranges == [None, "bytes=300000-", "bytes=500000-" if server_ranges else "bytes=200000-"]


def test_a_partial_download_left_by_a_stopped_process_is_resumed(server, tmp_path):
    data = release_bytes(tmp_path)
    server.files[TINY_FILE] = data
    server.drop_after = [40_000, 0, 0, 0]  # every attempt of the first command breaks off
    with pytest.raises(WeightsError, match=r"kept breaking off \(40000 bytes kept"):
        fetch(OFFICIAL_FILES["qmamba_tiny"])
    server.requests.clear()
    assert fetch(OFFICIAL_FILES["qmamba_tiny"]).path.read_bytes() == data
    assert server.requests == [(TINY_FILE, "bytes=40000-")]


def test_a_partial_file_without_its_validator_is_downloaded_again(server, tmp_path):
    data = release_bytes(tmp_path)
    server.files[TINY_FILE] = data
    _cache(tmp_path).mkdir(parents=True)
    (_cache(tmp_path) / f"{TINY_FILE}.part").write_bytes(b"from an unknown version" * 100)
    assert fetch(OFFICIAL_FILES["qmamba_tiny"]).path.read_bytes() == data
    assert server.requests == [(TINY_FILE, None)]  # nothing says the bytes kept belong to this file


def _nothing_recorded(tmp_path: Path) -> bool:
    return sorted(p.name for p in _cache(tmp_path).iterdir()) == [f"{TINY_FILE}.lock"]


@pytest.mark.parametrize("cut", ["on the mirror", "without a length"])
def test_a_truncated_file_is_refused_and_nothing_is_recorded(server, tmp_path, capsys, cut):
    data = release_bytes(tmp_path)
    server.files[TINY_FILE] = data[:len(data) // 2]
    if cut == "without a length":  # the whole file announced by nothing: the connection closes half-way
        server.files[TINY_FILE], server.send_length, server.drop_after = data, False, [len(data) // 2]
    with pytest.raises(SystemExit) as exit_info:
        main(["weights", "fetch", "qmamba_tiny"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"sent {len(data) // 2} bytes that are not VMamba-T [s2l5]'s checkpoint" in err
    assert "damaged or truncated" in err and _nothing_recorded(tmp_path)
    main(["weights", "verify", "qmamba_tiny"])
    assert f"{TINY_FILE}: not cached" in capsys.readouterr().out


def test_an_html_page_served_with_status_200_is_not_the_weights(server, tmp_path, capsys):
    server.files[TINY_FILE] = b"<!doctype html><title>Sign in</title><p>Please log in to download." * 20
    server.content_type = "text/html; charset=utf-8"
    with pytest.raises(SystemExit) as exit_info:
        main(["weights", "fetch", "qmamba_tiny"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "answered with an HTML page (HTTP 200) instead of the weights file" in err
    assert _nothing_recorded(tmp_path)
    server.content_type = "application/octet-stream"  # the same page as a binary: not a checkpoint either
    with pytest.raises(WeightsError, match=r"is not a PyTorch checkpoint \(it starts with b'<!do'\)"):
        fetch(OFFICIAL_FILES["qmamba_tiny"])
    assert _nothing_recorded(tmp_path)


def test_another_network_under_the_release_name_is_refused(server, tmp_path):
    server.files[TINY_FILE] = release_bytes(tmp_path, "keys_vanilla_tiny_legacy.txt")
    with pytest.raises(WeightsError, match=r"blocks per stage \(2, 2, 9, 2\) and width 96, VMamba-T \[s2l5\] has"):
        fetch(OFFICIAL_FILES["qmamba_tiny"])
    assert _nothing_recorded(tmp_path)


def test_a_release_saved_with_python_objects_is_checked_as_an_archive(server, tmp_path, caplog):
    state = torch.load(io.BytesIO(release_bytes(tmp_path)), weights_only=True)
    state["config"] = argparse.Namespace(MODEL="vssm")  # as a training script saves its config object
    buffer = io.BytesIO()
    torch.save(state, buffer)
    server.files[TINY_FILE] = buffer.getvalue()[:len(buffer.getvalue()) - 100]  # cut: never recorded
    with pytest.raises(WeightsError, match="not VMamba-T \\[s2l5\\]'s checkpoint"):
        fetch(OFFICIAL_FILES["qmamba_tiny"])
    server.files[TINY_FILE] = buffer.getvalue()
    assert fetch(OFFICIAL_FILES["qmamba_tiny"]).path.read_bytes() == buffer.getvalue()
    assert "holds pickled Python objects besides its tensors: checked as an intact archive only" in caplog.text


def test_a_changed_upstream_file_after_the_cache_was_deleted_is_an_error_until_accepted(server, tmp_path, capsys):
    first, changed = release_bytes(tmp_path, version=0), release_bytes(tmp_path, version=1)
    server.files[TINY_FILE] = first
    cached = fetch(OFFICIAL_FILES["qmamba_tiny"])
    cached.path.unlink()  # the record stays: it is what the next download must match
    server.files[TINY_FILE] = changed
    with pytest.raises(SystemExit) as exit_info:
        main(["weights", "fetch", "qmamba_tiny"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    old, new = hashlib.sha256(first).hexdigest(), hashlib.sha256(changed).hexdigest()
    assert "\n" not in err and f"with SHA-256 {new}" in err and f"recorded as {old}" in err
    assert f"qmamba weights fetch --accept-changed {TINY_FILE}" in err
    assert not cached.path.exists() and not (_cache(tmp_path) / f"{TINY_FILE}.part").exists()

    server.files[TINY_FILE] = first  # upstream back as recorded: fetched without a word
    assert fetch(OFFICIAL_FILES["qmamba_tiny"]).sha256 == old
    cached.path.unlink()
    server.files[TINY_FILE] = changed
    main(["weights", "fetch", "--accept-changed", "qmamba_tiny"])
    assert cached.path.read_bytes() == changed
    assert json.loads((_cache(tmp_path) / f"{TINY_FILE}.json").read_text())["sha256"] == new


@pytest.mark.parametrize("server_kind", ["honours If-Range", "ignores If-Range", "no validators"])
def test_a_download_resumed_after_the_file_changed_is_never_spliced(server, tmp_path, server_kind):
    first, changed = release_bytes(tmp_path, version=0), release_bytes(tmp_path, version=1)
    assert len(first) == len(changed)  # a splice would have the right size
    server.files[TINY_FILE] = first
    server.ignore_if_range = server_kind == "ignores If-Range"
    server.validators = server_kind != "no validators"
    server.drop_after = [len(first) // 2, 0, 0, 0]
    with pytest.raises(WeightsError, match="kept breaking off"):
        fetch(OFFICIAL_FILES["qmamba_tiny"])
    server.files[TINY_FILE] = changed
    server.requests.clear()
    assert fetch(OFFICIAL_FILES["qmamba_tiny"]).path.read_bytes() == changed
    ranges = [r for _, r in server.requests]
    expected = {"honours If-Range": [f"bytes={len(first) // 2}-"],  # answered whole (200): the new file
                "ignores If-Range": [f"bytes={len(first) // 2}-", None],  # a 206 of another ETag: start again
                "no validators": [None]}[server_kind]  # nothing to check a resume against: never resumed
    assert ranges == expected


def test_weights_list_shows_every_preset_with_its_file_and_cache_state(server, tmp_path, capsys):
    server.files[TINY_FILE] = release_bytes(tmp_path)
    fetch(OFFICIAL_FILES["qmamba_tiny"])
    (_cache(tmp_path) / f"{OFFICIAL_FILES['qmamba_small'].file}.part").write_bytes(b"y" * 10)
    main(["weights", "list"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:-1]}
    assert set(rows) == set(OFFICIAL_FILES)
    assert rows["qmamba_tiny"][:3] == [TINY_FILE, "#v2cls", "cached"]
    assert rows["lqmamba_tiny"][2] == "cached" and rows["qmamba_small"][2] == "partial"
    assert rows["qmamba_base"][2] == "missing" and rows["vmamba_vanilla_tiny"][1] == "#v0cls"


def test_a_file_placed_by_hand_is_recorded_without_network(server, tmp_path):
    _cache(tmp_path).mkdir(parents=True)
    (_cache(tmp_path) / TINY_FILE).write_bytes(release_bytes(tmp_path))
    cached = fetch(OFFICIAL_FILES["qmamba_tiny"])
    assert cached.sha256 == hashlib.sha256(release_bytes(tmp_path)).hexdigest()
    assert server.requests == [] and (_cache(tmp_path) / f"{TINY_FILE}.json").is_file()


def test_a_file_placed_by_hand_that_is_not_the_release_is_refused_and_not_recorded(server, tmp_path):
    _cache(tmp_path).mkdir(parents=True)
    (_cache(tmp_path) / TINY_FILE).write_bytes(release_bytes(tmp_path, "keys_vmamba_tiny_s1l8.txt"))
    with pytest.raises(WeightsError, match=r"placed in the cache by hand\) is not the release file: its state dict "
                                           r"has blocks per stage \(2, 2, 8, 2\) and width 96, VMamba-T \[s2l5\] has "
                                           r"\(2, 2, 5, 2\) and 96"):
        fetch(OFFICIAL_FILES["qmamba_tiny"])
    assert not (_cache(tmp_path) / f"{TINY_FILE}.json").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_fetch_is_one_line_with_the_url_and_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QMAMBA_WEIGHTS_MIRROR", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("QMAMBA_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as exit_info:
        main(["weights", "fetch", "qmamba_tiny"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot reach the server" in err
    assert f"/%23v2cls/{TINY_FILE}" in err and str(_cache(tmp_path) / TINY_FILE) in err and "pretrained: /" in err
    assert [p.name for p in _cache(tmp_path).iterdir()] == [f"{TINY_FILE}.lock"]  # nothing half-written


def test_a_missing_release_file_and_an_unknown_name_are_one_line_errors(server, capsys):
    with pytest.raises(WeightsError, match="HTTP 404"):
        fetch(OFFICIAL_FILES["qmamba_tiny"])
    with pytest.raises(SystemExit) as exit_info:
        main(["weights", "fetch", "qmamba_huge"])
    assert exit_info.value.code == 2 and "unknown weights qmamba_huge" in capsys.readouterr().err
    with pytest.raises(UsageError, match="no official weights for 'qmamba_test'"):
        resolve_pretrained("qmamba_test", "imagenet")


def _fetch_as_rank(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cached = fetch(OFFICIAL_FILES["qmamba_tiny"], progress=False)
        Path(results, str(rank)).write_text(cached.sha256)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_download_once_and_read_the_same_file(server, tmp_path):
    data = release_bytes(tmp_path)
    server.files[TINY_FILE] = data
    (tmp_path / "results").mkdir()
    mp.spawn(_fetch_as_rank, args=(str(tmp_path / "init"), str(tmp_path / "results")), nprocs=2)
    digests = {p.name: p.read_text() for p in (tmp_path / "results").iterdir()}
    assert digests == {"0": hashlib.sha256(data).hexdigest(), "1": hashlib.sha256(data).hexdigest()}
    assert server.gets(TINY_FILE) == 1


@pytest.mark.parametrize("data_file", PAPER_RUNS, ids=lambda p: p.stem)
def test_paper_configs_start_from_imagenet_and_fail_fast_offline(data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QMAMBA_WEIGHTS_MIRROR", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("QMAMBA_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    configs = ["--config", str(CONFIG_DIR / "recipe.yaml"), "--config", str(data_file)]
    with pytest.raises(SystemExit):
        main(["fit", *configs, "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["pretrained"] == "imagenet"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, "--trainer.accelerator", "cpu"])  # the data folders do not exist either
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qmamba: error: no ImageNet weights for VMamba-T [s2l5]: cannot reach the server")
    assert not (tmp_path / "runs").exists()  # refused before the run folder or the data were touched


def test_a_run_records_the_weights_it_started_from_and_resumes_without_them(server, workdir, monkeypatch):
    tmp_path, config = workdir
    source = build_backbone("qmamba_test").state_dict()
    source = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.items()}
    torch.save({"model": source, "epoch": 1}, tmp_path / "official.pth")
    server.files["qmamba_test_in1k.pth"] = (tmp_path / "official.pth").read_bytes()
    monkeypatch.setitem(OFFICIAL_FILES, "qmamba_test",
                        OfficialWeights("qmamba_test_in1k.pth", "#v2cls", "test", (1, 1, 1, 1), 16))
    digest = hashlib.sha256(server.files["qmamba_test_in1k.pth"]).hexdigest()

    main(["fit", "--config", str(config), "--model.init_args.pretrained", "imagenet",
          "--model.init_args.optimizer.init_args.lr", "0"])  # lr 0: the trained weights are the ImageNet ones
    run = tmp_path / "runs" / "tiny"
    trained = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(trained["state_dict"]["model.backbone.patch_embed.0.weight"], source["patch_embed.0.weight"])
    recorded = {"name": "imagenet", "file": "qmamba_test_in1k.pth", "sha256": digest,
                "size": len(server.files["qmamba_test_in1k.pth"]),
                "url": f"{server.url}/%23v2cls/qmamba_test_in1k.pth"}
    assert trained["qmamba"]["pretrained"] == recorded
    assert yaml.safe_load((run / "hparams.yaml").read_text())["pretrained_weights"] == recorded
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["pretrained"] == "imagenet"

    server.httpd.shutdown()  # resuming needs no weights: the checkpoint holds them and their record
    main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "last"])
    assert json.loads((run / "test_results.json").read_text())["pretrained"] == recorded
    assert server.gets("qmamba_test_in1k.pth") == 1


def test_a_fit_reads_its_pretrained_file_once_to_hash_it(workdir, monkeypatch):
    """The early check before the data is read only looks for the file; training hashes it once."""
    import qmamba.files.weights as weights

    tmp_path, config = workdir
    source = build_backbone("qmamba_test").state_dict()
    torch.save({"model": source}, tmp_path / "official.pth")
    hashed = []
    original = weights.file_sha256
    monkeypatch.setattr(weights, "file_sha256", lambda path: hashed.append(path) or original(path))
    main(["fit", "--config", str(config), "--model.init_args.pretrained", str(tmp_path / "official.pth")])
    assert hashed == [tmp_path / "official.pth"]
