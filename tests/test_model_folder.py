"""Trained models that travel: qmamba publish writes a model folder (safetensors, config, card) that scores as its
checkpoint, loads from a path, the Hugging Face cache, a bucket or an HTTPS server, and refuses altered files on one
line."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from iqa_fixtures import make_kadid
from score_runs import parts_of

import qmamba
from qmamba.cli import main
from qmamba.commands.serve import create_app
from qmamba.errors import QMambaError

TINY = (Path(__file__).parent / "conf" / "tiny.yaml").read_text()


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """A tiny run, trained and tested, and its published folder: (checkpoint, folder, images)."""
    root = tmp_path_factory.mktemp("publish")
    make_kadid(root / "kadid", refs=4, levels=5)
    config = root / "tiny.yaml"
    config.write_text(TINY.replace("KADID_ROOT", str(root / "kadid")).replace("save_dir: runs",
                                                                               f"save_dir: {root / 'runs'}"))
    main(["fit", "--config", str(config)])
    run = root / "runs" / "tiny"
    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "best"])
    main(["publish", str(run), "-o", str(root / "qmamba-tiny"), "--license", "cc-by-nc-4.0"])
    return run / "checkpoints" / "best.ckpt", root / "qmamba-tiny", sorted((root / "kadid" / "images").glob("*.png"))


def test_a_published_folder_scores_as_its_checkpoint_and_holds_no_pickle(published, tmp_path, capsys):
    checkpoint, folder, images = published
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for path in folder.iterdir():  # nothing a pickle or a torch.save zip could hide in
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", path
    assert sum(p.stat().st_size for p in folder.iterdir()) < checkpoint.stat().st_size
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o666 & ~umask}  # safetensors wrote 0600
    paths = [str(p) for p in images[:6]]
    expected = qmamba.load(checkpoint, device="cpu").score(paths)
    scorer = qmamba.load(folder, device="cpu")
    np.testing.assert_allclose(scorer.score(paths), expected, rtol=1e-6)
    assert scorer.info["source"] == {"path": str(folder)}

    main(["score", "--model", str(folder), "--device", "cpu", *paths, "-o", str(tmp_path / "scores.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-6)
    # a folder of Parquet parts records the weights' SHA-256: a model folder's safetensors (once IsADirectoryError)
    main(["score", "--model", str(folder), "--device", "cpu", *paths, "-o", f"{tmp_path}/parts/"])
    parts = parts_of(tmp_path / "parts")
    np.testing.assert_allclose([parts[p]["score"] for p in paths], expected, rtol=1e-6)
    with TestClient(create_app(scorer)) as client:
        response = client.post("/score", files=[("files", (Path(p).name, Path(p).read_bytes(), "image/png"))
                                                for p in paths[:2]])
    np.testing.assert_allclose([r["score"] for r in response.json()["results"]], expected[:2], rtol=1e-6)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--model MODEL, --ckpt_path MODEL" in capsys.readouterr().out.replace("--ckpt-path MODEL, ", "")


def test_the_model_card_carries_the_runs_metrics_scale_and_terms(published):
    checkpoint, folder, _ = published
    card = (folder / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    results = json.loads((checkpoint.parents[1] / "test_results.json").read_text())["results"]["tiny_kadid"]
    assert meta["library_name"] == "qmamba" and meta["license"] == "cc-by-nc-4.0"
    assert "image-quality-assessment" in meta["tags"] and meta["datasets"] == ["tiny_kadid"]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["srcc"] == round(results["srcc"], 4) and metrics["plcc"] == round(results["plcc"], 4)
    assert f"| tiny_kadid | {int(results['images'])} | {results['srcc']:.4f} | {results['plcc']:.4f} |" in body
    assert "| tiny_kadid | 1 to 5, higher is better |" in body
    assert "the `kadid10k` release, licensed by its authors" in body and 'qmamba.load("qmamba-tiny")' in body
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"]["backbone"] == "qmamba_test" and config["preprocessing"]["crop_size"] == 32
    assert config["training"]["qmamba_version"] == qmamba.__version__ and config["training"]["scan_backends"]


@pytest.mark.slow
def test_hf_models_load_from_the_hub_cache_offline_by_name_and_revision(published, tmp_path):
    _, folder, images = published
    hub = tmp_path / "hf" / "hub" / "models--iqa-lab--qmamba-tiny"
    commits = {"main": "a" * 40, "v1": "b" * 40}
    for ref, commit in commits.items():  # huggingface_hub's layout: refs name commits, snapshots link to blobs
        (hub / "refs").mkdir(parents=True, exist_ok=True)
        (hub / "blobs").mkdir(exist_ok=True)
        (hub / "refs" / ref).write_text(commit)
        snapshot = hub / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for path in folder.iterdir():
            blob = hashlib.sha256(path.read_bytes()).hexdigest()
            (hub / "blobs" / blob).write_bytes(path.read_bytes())
            (snapshot / path.name).symlink_to(f"../../blobs/{blob}")
    script = ("import sys, json, qmamba\n"
              "for ref in sys.argv[2:]:\n"
              "    s = qmamba.load(ref, device='cpu')\n"
              "    print(json.dumps([s.info['source'], s.score(sys.argv[1])]))\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(images[0]), "hf://iqa-lab/qmamba-tiny",
                             "hf://iqa-lab/qmamba-tiny@v1"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (main_source, main_score), (v1_source, v1_score) = map(json.loads, result.stdout.splitlines())
    assert main_source == {"hub": "iqa-lab/qmamba-tiny", "revision": "main", "commit": commits["main"]}
    assert v1_source["revision"] == "v1" and v1_source["commit"] == commits["v1"]
    assert main_score == pytest.approx(qmamba.load(folder, device="cpu").score(images[0]), rel=1e-6) == v1_score
    missing = subprocess.run([sys.executable, "-m", "qmamba", "score", "--model", "hf://iqa-lab/nothere",
                              str(images[0])], env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "hf://iqa-lab/nothere is not in the Hugging Face cache" in missing.stderr and "HF_HUB_OFFLINE" in \
        missing.stderr


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_a_model_folder_by_url_is_fetched_once_checked_and_cached(published, tmp_path, bucket, monkeypatch):
    _, folder, images = published
    client, _ = bucket
    monkeypatch.setenv("QMAMBA_HOME", str(tmp_path / "home"))
    for path in folder.iterdir():
        client.upload_file(str(path), "iqa", f"models/tiny/{path.name}")
    expected = qmamba.load(folder, device="cpu").score(images[0])
    scorer = qmamba.load("s3://iqa/models/tiny/", device="cpu")
    assert scorer.score(images[0]) == pytest.approx(expected, rel=1e-6)
    digest = json.loads((folder / "config.json").read_text())["weights"]["sha256"]
    assert scorer.info["source"] == {"url": "s3://iqa/models/tiny", "weights_sha256": digest}
    client.delete_object(Bucket="iqa", Key="models/tiny/model.safetensors")  # the cache answers from now on
    assert qmamba.load("s3://iqa/models/tiny/", device="cpu").score(images[0]) == pytest.approx(expected, rel=1e-6)

    # upstream changes while the cached copy is gone: both hashes named, nothing cached
    torch.manual_seed(1)
    other = tmp_path / "other"
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in qmamba.load(folder, device="cpu").model.state_dict().items()}
    from qmamba.files.model_folder import write_model_folder

    config = json.loads((folder / "config.json").read_text())
    write_model_folder(other, state, config, "a retrained model\n")
    for path in other.iterdir():
        client.upload_file(str(path), "iqa", f"models/tiny/{path.name}")
    cached = next((tmp_path / "home" / "models").glob("*/model.safetensors"))
    cached.unlink()
    new_digest = json.loads((other / "config.json").read_text())["weights"]["sha256"]
    with pytest.raises(QMambaError, match=f"changed upstream: .* SHA-256 {digest} when first fetched and are now "
                                          f"{new_digest}"):
        qmamba.load("s3://iqa/models/tiny/", device="cpu")
    assert not cached.exists()

    # an HTTPS server (its certificate trusted through SSL_CERT_FILE) that sends the weights cut short: refused
    served = tmp_path / "served" / "tiny"
    served.mkdir(parents=True)
    (served / "config.json").write_bytes((folder / "config.json").read_bytes())
    (served / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-1000])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=served.parent))
    server.socket = _tls(tmp_path, monkeypatch).wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/tiny"
    try:
        with pytest.raises(QMambaError, match="truncated or replaced, so it was not cached"):
            qmamba.load(url, device="cpu")
        (served / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        assert qmamba.load(url, device="cpu").score(images[0]) == pytest.approx(expected, rel=1e-6)
    finally:
        server.shutdown()


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """``/<name>/config.json`` is the published config; ``/huge/model.safetensors`` answers far more than it
    records, ``/slow/model.safetensors`` a byte every 50 ms."""

    config: bytes = b""
    sent = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        try:
            if self.path.endswith("config.json"):
                self.wfile.write(self.config)
            elif self.path.startswith("/huge/"):
                while type(self).sent < 256 * 2**20:  # 10 GB announced in spirit; a client without a bound fails
                    self.wfile.write(b"\0" * 2**20)
                    type(self).sent += 2**20
            else:
                for _ in range(200):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    threading.Event().wait(0.05)
        except OSError:  # the client hung up, as it should
            pass


def test_a_model_fetch_stops_at_the_recorded_size_and_obeys_timeout(published, tmp_path, monkeypatch, capsys):
    """A 10 GB model.safetensors behind a URL was read into memory (5 GB after 7 s); --timeout 5 gave up after
    64 s: the fetch ignored the option it names."""
    _, folder, images = published
    monkeypatch.setenv("QMAMBA_HOME", str(tmp_path / "home"))
    _Misbehaving.config = (folder / "config.json").read_bytes()
    recorded = json.loads(_Misbehaving.config)["weights"]["bytes"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(QMambaError, match=f"huge/model.safetensors holds more than the {recorded} bytes its "
                                              "config.json records"):
            qmamba.load(f"{base}/huge/", device="cpu")
        assert _Misbehaving.sent < recorded + 64 * 2**20  # what the sockets buffered past the bound, no more
        started = time.monotonic()
        with pytest.raises(SystemExit):
            main(["score", "--model", f"{base}/slow/", "--timeout", "1", "--device", "cpu", str(images[0])])
        assert time.monotonic() - started < 30
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "slow/model.safetensors was still arriving after 1 s" in error, error
        assert not list((tmp_path / "home" / "models").glob("*/model.safetensors"))  # nothing cached
    finally:
        server.shutdown()


def _tls(folder: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context with a self-signed certificate for 127.0.0.1, which this process's clients trust."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    monkeypatch.setenv("SSL_CERT_FILE", str(folder / "cert.pem"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


def _copy(folder: Path, target: Path) -> Path:
    target.mkdir()
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _header(entries: dict, body: bytes) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + body


@pytest.mark.parametrize("alter, message", [
    (lambda f: _edit(f, backbone="lqmamba_test"), "the weights do not fit the model"),
    (lambda f: _edit(f, backbone="qmamba_huge"), "describes no model qmamba can build (unknown model 'qmamba_huge'"),
    (lambda f: _weights(f, _header({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}},
                                   b"\0" * 16)), "tensor 'w' claims bytes 0-4000 of a 16-byte body"),
    (lambda f: _weights(f, _header({"w": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, b"\0" * 32)),
     "unknown dtype 'F128'"),
    (lambda f: _weights(f, struct.pack("<Q", 2**62) + b"{}"), "announces a header of 4611686018427387904 bytes"),
    (lambda f: _weights(f, _pickle({"w": torch.zeros(3)})), "not a safetensors file"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\0" * 64), "config.json records"),
    (lambda f: (f / "config.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    (lambda f: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000), "nests 100000 levels deep, more than"),
    # absurd sizes: the model's shapes are compared with the weights' on the meta device, before any allocation
    (lambda f: _edit(f, backbone_args={"dim": 10**6}, head_hidden=10**9), "the weights do not fit the model"),
    (lambda f: _weights(f, struct.pack("<Q", 20_000) + b"[" * 10_000 + b"]" * 10_000),
     "its safetensors header is not one qmamba reads: its JSON nests 10000 levels deep"),
], ids=["other-preset", "unknown-preset", "offsets-past-the-end", "unknown-dtype", "huge-header", "a-pickle",
        "weights-replaced", "config-not-an-object", "config-nested-deep", "absurd-sizes", "header-nested-deep"])
def test_each_bad_folder_is_one_line(published, tmp_path, alter, message, capsys):
    _, folder, images = published
    bad = _copy(folder, tmp_path / "bad")
    alter(bad)
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--model", str(bad), "--device", "cpu", str(images[0])])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and error.count("\n") == 1 and message in error, error


def test_a_folder_file_that_is_a_link_is_refused_before_anything_of_its_target_is_read(published, tmp_path, capsys):
    """A folder's model.safetensors linked to /etc/shadow printed that file's SHA-256, or its first 8 bytes as a
    header size. Links are followed only inside a Hugging Face snapshot, into its repository's blobs."""
    _, folder, images = published
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:*:20000:0:99999:7:::\n")
    snapshot = tmp_path / "models--iqa-lab--tiny" / "snapshots" / ("c" * 40)
    snapshot.parent.mkdir(parents=True)
    for bad, name in [(tmp_path / "weights", "model.safetensors"), (tmp_path / "config", "config.json"),
                      (snapshot, "model.safetensors")]:
        _copy(folder, bad)
        (bad / name).unlink()
        (bad / name).symlink_to(secret)
        with pytest.raises(SystemExit) as exit_info:
            main(["score", "--model", str(bad), "--device", "cpu", str(images[0])])
        error = capsys.readouterr().err
        assert exit_info.value.code == 1 and error.count("\n") == 1, error
        assert f"{bad / name} is a symbolic link; a model folder's files are read only when they are regular " \
            "files in the folder" in error
        assert hashlib.sha256(secret.read_bytes()).hexdigest() not in error and "root:*" not in error
        assert str(struct.unpack("<Q", secret.read_bytes()[:8])[0]) not in error


def _weights(folder: Path, data: bytes) -> None:
    """Crafted weights, recorded in the config as a forger would record them."""
    (folder / "model.safetensors").write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    config["weights"] = {"file": "model.safetensors", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "config.json").write_text(json.dumps(config))


def _pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _edit(folder: Path, **architecture: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["architecture"].update(architecture)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_sha256_pin_is_checked_before_loading(published, capsys):
    checkpoint, folder, images = published
    digest = json.loads((folder / "config.json").read_text())["weights"]["sha256"]
    assert qmamba.load(folder, device="cpu", sha256=digest.upper()).score(images[0]) > 0
    with pytest.raises(SystemExit):
        main(["score", "--model", str(checkpoint), "--sha256", digest, "--device", "cpu", str(images[0])])
    assert f"not the pinned {digest}: it is another file" in capsys.readouterr().err


def test_hf_models_without_huggingface_hub_or_with_a_malformed_name_are_one_line(monkeypatch):
    from qmamba.errors import UsageError
    from qmamba.inference.model_sources import resolve_model

    with pytest.raises(UsageError, match=r"hf://iqa-lab is not hf://ORG/NAME"):
        resolve_model("hf://iqa-lab")
    for revision in ("../../x", "../../../../outside/rev", "/etc", "main\n", "v1/../../x", ""):
        # the cache reads refs/<revision>: each of these would name a file elsewhere
        with pytest.raises(UsageError, match="is not a revision"):
            resolve_model(f"hf://iqa-lab/qmamba-tiny@{revision}")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the hub extra were not installed
    with pytest.raises(UsageError, match=r'qmamba-tiny needs huggingface_hub: pip install "qmamba\[hub\]"'):
        resolve_model("hf://iqa-lab/qmamba-tiny")
