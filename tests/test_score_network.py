"""`qmamba score` against URLs that misbehave, served on 127.0.0.1 by this module (issue 34, items 5 and 6): one
that never answers, one that trickles, one that answers 10 GB, error statuses; a run waiting on the network stops at
a signal; tar members above the size bound are never read."""

from __future__ import annotations

import base64
import signal
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from score_runs import file_scores, parts_of, rows_of, run_score

from qmamba.inference.sources import NetworkLimits, shard_images

HUGE = 10 * 2**30  # what /huge announces
HUGE_CAP = 200 * 2**20  # what it sends at most, so that a client without a bound fails instead of filling memory


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, image: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.image = image
        self.stopping = threading.Event()
        self.silent_called = threading.Event()
        self.huge_sent = 0
        self.credentials_by_host: list[tuple[str, bool]] = []  # (Host header, whether credentials came) of private.png

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        route = self.path.lstrip("/")
        if route == "good.png":
            self._answer(200, self.server.image)
        elif route == "private.png":  # basic authentication as user "reader", password "p@ss"
            granted = self.headers.get("Authorization") == f"Basic {base64.b64encode(b'reader:p@ss').decode()}"
            self.server.credentials_by_host.append((self.headers["Host"], "Authorization" in self.headers))
            self._answer(200 if granted else 401, self.server.image if granted else b"who are you?")
        elif route == "silent":  # accepts the connection, never answers
            self.server.silent_called.set()
            self.server.stopping.wait()
        elif route == "trickle":  # a byte every 50 ms of a 1 MB image
            self.send_response(200)
            self.send_header("Content-Length", str(2**20))
            self.end_headers()
            while not self.server.stopping.wait(0.05):
                self._send(b"\0")
        elif route == "huge":
            self.send_response(200)
            self.send_header("Content-Length", str(HUGE))
            self.end_headers()
            block = b"\0" * 2**20
            while self.server.huge_sent < HUGE_CAP and self._send(block):
                self.server.huge_sent += len(block)
        elif route == "here.png":  # the same origin: the credentials go along
            self._redirect("/private.png")
        elif route == "elsewhere.png":  # another host (the same server under another name): they must not
            self._redirect(f"http://localhost:{self.server.server_address[1]}/private.png")
        elif route == "busy":
            self._answer(503, b"try later")
        else:
            self._answer(404, b"no such image")

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._send(body)

    def _send(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:  # the client hung up
            return False


@pytest.fixture
def server(trained) -> Iterator[_Server]:  # noqa: ANN001
    image = next((trained[0] / "kadid" / "images").glob("I01_01_01.png")).read_bytes()
    server = _Server(image)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stopping.set()
    server.shutdown()
    server.server_close()


def test_urls_that_do_not_answer_trickle_are_huge_or_fail_are_rows_naming_why(trained, server, tmp_path, capsys):
    routes = ["silent", "trickle", "huge", "missing", "busy", "good.png", "private.png"]
    private, here, elsewhere = (server.url(r).replace("http://", "http://reader:p%40ss@")
                                for r in ("private.png", "here.png", "elsewhere.png"))
    refused = server.url("private.png").replace("http://", "http://intruder:wrong-secret@")
    table = tmp_path / "urls.csv"
    table.write_text("url\n" + "".join(f"{u}\n" for u in [*map(server.url, routes), private, refused, here,
                                                            elsewhere]))
    output = tmp_path / "scores.jsonl"
    assert run_score(trained, str(table), "-o", str(output), "--workers", "0", "--timeout", "1.5",
                     "--max-image-mb", "1") == 1
    rows = rows_of(output)
    assert rows[server.url("silent")]["error"] == f"no answer from {server.url('silent')} within 1.5 s (--timeout)"
    assert rows[server.url("trickle")]["error"].startswith(f"{server.url('trickle')} was still arriving after 1.5 s")
    assert rows[server.url("huge")]["error"] == (f"{server.url('huge')} holds more than 1 MB, the bound of one "
                                                 "image (--max-image-mb)")
    assert server.huge_sent < 64 * 2**20  # reading stopped at the bound (the rest is what the sockets buffered)
    assert rows[server.url("missing")]["error"] == f"cannot read {server.url('missing')}: HTTP 404 Not Found"
    assert rows[server.url("busy")]["error"] == f"cannot read {server.url('busy')}: HTTP 503 Service Unavailable"
    assert rows[server.url("private.png")]["error"] == f"cannot read {server.url('private.png')}: HTTP 401 Unauthorized"
    local = tmp_path / "good.png"
    local.write_bytes(server.image)
    expected = file_scores(trained, {"good": local})["good"]
    assert rows[server.url("good.png")]["score"] == pytest.approx(expected, rel=1e-6)
    # credentials are sent, to the URL's own host only (curl's rule): a redirect elsewhere goes without them
    masked = {url: url.replace("p%40ss", "***").replace("wrong-secret", "***") for url in (private, refused, here,
                                                                                          elsewhere)}
    assert rows[masked[private]]["score"] == pytest.approx(expected, rel=1e-6)
    assert rows[masked[here]]["score"] == pytest.approx(expected, rel=1e-6)
    assert rows[masked[elsewhere]]["error"] == f"cannot read {masked[elsewhere]}: HTTP 401 Unauthorized"
    assert sorted(set(server.credentials_by_host)) == [
        (f"127.0.0.1:{server.server_address[1]}", False), (f"127.0.0.1:{server.server_address[1]}", True),
        (f"localhost:{server.server_address[1]}", False)]
    assert rows[masked[refused]]["error"] == f"cannot read {masked[refused]}: HTTP 401 Unauthorized"
    err = capsys.readouterr().err  # no message, row or record holds a password, the row keys included
    assert f"skipped {masked[refused]}: " in err and f"skipped {masked[elsewhere]}: " in err
    assert not any(secret in text for secret in ("p%40ss", "p@ss", "wrong-secret") for text in (
        err, output.read_text()))


@pytest.mark.parametrize("signum,workers,output", [(signal.SIGTERM, 1, "scores.csv"), (signal.SIGINT, 0, "parts/")],
                         ids=["SIGTERM-a-worker-waits", "SIGINT-the-main-process-waits"])
@pytest.mark.slow
def test_a_signal_stops_a_run_that_waits_on_a_url(trained, server, tmp_path, workers, signum, output, forked_qmamba):
    """The run waited on a silent URL until the server closed (230 s), whatever the signal. Both signals take the
    same path; the wait is in the main process (--workers 0) or in a DataLoader worker. The interrupted image is
    unscored, not failed: a folder output once recorded it in an errors part (the per-image error handler caught
    the interruption), so a rerun skipped it."""
    process = forked_qmamba("score").popen(
        ["score", "--ckpt_path", str(trained[1] / "checkpoints" / "best.ckpt"), server.url("silent"),
         server.url("good.png"), "-o", f"{tmp_path}/{output}", "--device", "cpu", "--timeout", "600", "--workers",
         str(workers)], stderr=subprocess.PIPE)
    assert server.silent_called.wait(120), "the run never asked for the URL"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)  # bounded by the signal, not by --timeout
    assert process.returncode == 128 + signum, err
    assert "stopped early" in err.strip().splitlines()[-1] and "Traceback" not in err
    if output.endswith("/"):
        assert server.url("silent") not in parts_of(tmp_path / output)
        assert not (tmp_path / output / "_qmamba.json").exists()
    else:
        assert not (tmp_path / output).exists() and (tmp_path / f"{output}.partial").is_file()


def test_tar_members_above_the_bound_are_errors_and_never_read(trained, tmp_path):
    image = next((trained[0] / "kadid" / "images").glob("I01_01_01.png"))
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (2 * 2**20))
    shard = tmp_path / "000000.tar"
    with tarfile.open(shard, "w") as archive:
        archive.add(image, arcname="small.png")
        archive.add(big, arcname="big.png")
    output = tmp_path / "scores.jsonl"
    assert run_score(trained, str(shard), "-o", str(output), "--max-image-mb", "1") == 1  # the local engine
    rows = rows_of(output)
    bound = "holds more than 1 MB (2.0 MB), the bound of one image (--max-image-mb)"
    assert rows[f"{shard}#big.png"]["error"] == f"{shard}#big.png {bound}"
    assert rows[f"{shard}#small.png"]["score"] is not None
    streamed = {key: (data is not None, failure) for key, data, failure in  # the Ray engine's reading tasks
                shard_images(str(shard), limits=NetworkLimits(max_bytes=2**20))}
    assert streamed == {f"{shard}#small.png": (True, None), f"{shard}#big.png": (False, f"{shard}#big.png {bound}")}
