"""``qmamba serve``: the API through an HTTP client, batching under concurrent requests, the limits, and the page in
a real browser (headless Chromium, skipped with the reason where it is not installed)."""

from __future__ import annotations

import io
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from browser import headless_chrome, needs_chromium
from fastapi.testclient import TestClient
from PIL import Image

import qmamba
from qmamba.commands.serve import Limits, allowed_hosts, create_app, header_timeout_protocol

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve.png"


@pytest.fixture(scope="session")
def images(trained) -> list[Path]:
    root, _ = trained
    return sorted((root / "kadid" / "images").glob("I0*_01_0*.png"))[:6]


@pytest.fixture(scope="session")
def scorer(trained):
    return qmamba.load(trained[1] / "checkpoints" / "best.ckpt", device="cpu")


@pytest.fixture(scope="session")
def client(scorer):
    with TestClient(create_app(scorer, Limits(max_upload_bytes=200_000, max_pixels=10_000))) as client:
        yield client


def _files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def _multipart(data: bytes) -> bytes:
    return (b"--qmamba\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--qmamba--\r\n")


def test_health_describes_the_model(client, scorer):
    health = client.get("/health").json()
    assert health["model"] == "qmamba_test" and health["dataset"] == scorer.dataset
    assert health["score_range"] == [scorer.scale.low, scorer.scale.high] and health["direction"] == "higher is better"


def test_good_images_score_as_the_python_api_and_bad_ones_fail_alone(client, scorer, images):
    response = client.post("/score", files=_files(
        (images[0].name, images[0].read_bytes()),
        ("notes.png", b"this is text, whatever its name says"),  # content is decoded, not trusted by extension
        ("broken.jpg", images[1].read_bytes()[:200]),  # a truncated image
        (images[1].name, images[1].read_bytes())))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["file"] for r in results] == [images[0].name, "notes.png", "broken.jpg", images[1].name]
    assert "cannot read image notes.png" in results[1]["error"] and "error" in results[2]
    assert "cannot identify image file 'notes.png'" in results[1]["error"]  # named, not <_io.BytesIO object at 0x..>
    assert " object at 0x" not in results[1]["error"] + results[2]["error"]
    expected = scorer.score([str(images[0]), str(images[1])])
    np.testing.assert_allclose([results[0]["score"], results[3]["score"]], expected, rtol=1e-5)
    assert results[0]["direction"] == "higher is better" and results[0]["scale"] == [1.0, 5.0]


def test_refusals_are_4xx_with_one_line_reasons(client, images):
    too_big = client.post("/score", files=_files(("big.bin", b"\0" * 300_000)))
    assert too_big.status_code == 413 and "limit of 200000 bytes" in too_big.json()["detail"]
    chunked = client.post("/score", content=iter([_multipart(b"\0" * 300_000)]),
                          headers={"content-type": "multipart/form-data; boundary=qmamba"})
    assert chunked.status_code == 413  # no Content-Length: checked after reading
    text_only = client.post("/score", files=_files(("a.txt", b"hello")))
    assert text_only.status_code == 422 and "cannot read image a.txt" in text_only.json()["detail"]
    bomb = io.BytesIO()
    Image.new("L", (200, 200)).save(bomb, format="PNG")  # 40,000 pixels: above this server's 10,000
    refused = client.post("/score", files=_files(("bomb.png", bomb.getvalue())))
    assert refused.status_code == 422 and "image bomb.png of 200x200 pixels is above the limit of 10000 pixels" \
        in refused.json()["detail"]
    assert client.post("/score").status_code == 422  # no files at all


def test_a_request_costs_at_most_its_limits(scorer, images):
    small = io.BytesIO()
    Image.new("RGB", (90, 90)).save(small, format="PNG")  # 8,100 pixels each: under 10,000 per image
    limits = Limits(max_pixels=10_000, max_request_pixels=15_000, max_map_windows=3, max_pending=2)
    with TestClient(create_app(scorer, limits)) as client:
        pixels = client.post("/score", files=_files(("a.png", small.getvalue()), ("b.png", small.getvalue())))
        assert pixels.status_code == 413
        assert pixels.json()["detail"] == ("the images hold 16200 pixels in all, above this server's limit of 15000 "
                                           "per request (--max-request-pixels); send them in several requests")
        many = client.post("/score", files=_files(*[(p.name, p.read_bytes()) for p in images[:3]]))
        assert many.status_code == 413  # it was 503 "try again shortly", which could never succeed
        assert many.json()["detail"] == ("a request of 3 images is above this server's limit of 2 waiting images "
                                         "(--max-pending); send at most 2 per request")
        mapped = client.post("/score?map=1", files=_files((images[0].name, images[0].read_bytes())))
        result = mapped.json()["results"][0]  # 48x40 at 32-px crops, stride 16: 2 x 2 windows = 4 > 3
        assert mapped.status_code == 200 and "score" in result and "map" not in result
        assert result["map_error"] == ("a map of this image needs 4 windows, above this server's limit of 3 "
                                       "(--max-map-windows); send a smaller image")


def test_a_map_is_scored_a_model_batch_per_step_as_quality_map_scores_it(trained, images):
    scorer = qmamba.load(trained[1] / "checkpoints" / "best.ckpt", device="cpu", batch_size=1)  # 8 windows a step
    job = scorer.map_job(str(images[0]), stride=2)
    steps = 1
    while job.step():
        steps += 1
    assert steps == -(-job.windows // (8 * scorer.batch_size)) > 1  # other batches can run between the steps
    whole = scorer.quality_map(str(images[0]), stride=2)
    np.testing.assert_allclose(job.result().scores, whole.scores, rtol=1e-6)


def test_a_token_guards_the_api_but_not_the_page_and_docs_are_off_by_default(scorer, images):
    with TestClient(create_app(scorer, token="s3cret")) as client:
        assert client.get("/").status_code == 200  # the page: it asks for the token itself
        refused = client.get("/health")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer <token>" in refused.json()["detail"]
        wrong = {"Authorization": "Bearer guess"}
        assert client.post("/score", files=_files(("a.png", images[0].read_bytes())), headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert client.get("/health", headers=right).status_code == 200
        assert client.post("/score", files=_files(("a.png", images[0].read_bytes())), headers=right).status_code == 200
        assert client.get("/docs", headers=right).status_code == 404
        assert client.get("/openapi.json", headers=right).status_code == 404
    with TestClient(create_app(scorer, docs=True)) as client:
        assert client.get("/docs").status_code == 200


class _LiveServer:
    """The app under uvicorn on 127.0.0.1 in a thread: what a raw socket client sees (TestClient reads whole
    bodies before the app does, so streaming limits need a real server)."""

    def __init__(self, app, **options) -> None:  # noqa: ANN003 - uvicorn.Config's
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _head(chunked: bool, length: int = 0) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return (f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n"
            "Content-Type: multipart/form-data; boundary=qmamba\r\n\r\n").encode()


def _response(conn: socket.socket) -> str:
    """A whole HTTP response (head and Content-Length bytes of body) read from a socket."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            next((line.split(b":")[1] for line in data.split(b"\r\n") if line.lower().startswith(b"content-length")),
                 b"0")):
        block = conn.recv(65536)
        if not block:
            break
        data += block
    return data.decode(errors="replace")


def test_a_loopback_server_answers_only_to_loopback_host_names(scorer):
    """Without a token a server on 127.0.0.1 answered to any Host: a page of another site whose name resolves to
    127.0.0.1 (DNS rebinding) could use it from the visitor's browser."""
    assert allowed_hosts(None, "127.0.0.1") == {"127.0.0.1", "localhost", "::1"} and allowed_hosts(None, "0.0.0.0") \
        is None
    # the option adds names to the loopback ones that the start line names (it had replaced them: 400 for both)
    assert allowed_hosts("Example.org:8000,[::1]", "127.0.0.1") == {"example.org", "::1", "127.0.0.1", "localhost"}
    assert allowed_hosts("iqa.example.org", "0.0.0.0") == {"iqa.example.org", "::1", "127.0.0.1", "localhost"}
    assert allowed_hosts("*", "127.0.0.1") is None
    app = create_app(scorer, hosts=allowed_hosts(None, "127.0.0.1"))
    for url, status in (("http://localhost:8000", 200), ("http://127.0.0.1", 200), ("http://[::1]:8000", 200),
                        ("http://rebound.example:8000", 400)):
        with TestClient(app, base_url=url) as client:
            answer = client.get("/health")
            assert answer.status_code == status, url
    assert answer.json()["detail"] == ("this server does not answer to the host 'rebound.example'; it answers to "
                                       "127.0.0.1, ::1, localhost (--allowed-hosts)")


def test_headers_that_trickle_are_cut_off_and_a_keep_alive_connection_still_serves(scorer):
    """uvicorn bounds no header read: a client sending a byte of its headers now and then held a connection open."""
    live = _LiveServer(create_app(scorer), http=header_timeout_protocol(1.0))
    try:
        with live.connect() as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()
            closed = False
            while not closed and time.monotonic() - started < 8:
                try:
                    conn.sendall(b"X")  # one byte of a header every 0.2 s: never a whole request
                    if select.select([conn], [], [], 0.2)[0]:
                        closed = conn.recv(1024) == b""
                except OSError:  # reset: the server closed with a byte of ours unread (which is when depends on load)
                    closed = True
            assert closed and time.monotonic() - started < 3
        with live.connect() as conn:  # a request whose headers arrive in time, twice on one connection
            for _ in range(2):
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert _response(conn).startswith("HTTP/1.1 200")
                time.sleep(0.6)
    finally:
        live.stop()


def test_a_chunked_upload_is_stopped_at_the_limit_and_a_stalled_one_times_out(scorer):
    live = _LiveServer(create_app(scorer, Limits(max_upload_bytes=200_000, body_timeout_s=0.5)))
    try:
        with live.connect() as conn:  # 150 MB offered in 1 MB chunks, without a Content-Length
            preamble = _multipart(b"").split(b"\r\n--qmamba--")[0]
            conn.sendall(_head(chunked=True) + b"%x\r\n" % len(preamble) + preamble + b"\r\n")
            sent = 0
            while sent < 150 and not select.select([conn], [], [], 0.05)[0]:  # until the server answers
                conn.sendall(b"%x\r\n" % 2**20 + b"\0" * 2**20 + b"\r\n")
                sent += 1
            answer = _response(conn)
        assert answer.startswith("HTTP/1.1 413") and "above this server's limit of 200000 bytes" in answer
        assert sent < 20  # stopped near the limit, not after 150 MB
        with live.connect() as conn:  # announces 5,000 bytes, sends the start of a form, then nothing
            conn.sendall(_head(chunked=False, length=5000) + preamble + b"\0" * 100)
            started = time.monotonic()
            answer = _response(conn)
        assert answer.startswith("HTTP/1.1 408") and "stalled for 0.5 s (--body-timeout)" in answer
        assert time.monotonic() - started < 5
    finally:
        live.stop()


def test_quality_map_comes_with_window_scores_and_a_png(client, scorer, images):
    result = client.post("/score?map=1", files=_files((images[2].name, images[2].read_bytes()))).json()["results"][0]
    qmap = scorer.quality_map(str(images[2]))
    np.testing.assert_allclose(result["map"]["scores"], qmap.scores, rtol=1e-5, atol=1e-6)
    assert result["map"]["png"].startswith("data:image/png;base64,")


def test_twenty_concurrent_requests_are_batched_and_all_answered(scorer, images):
    app = create_app(scorer, Limits(batch_size=8, window_s=0.05))
    expected = dict(zip([p.name for p in images], scorer.score([str(p) for p in images]), strict=True))
    with TestClient(app) as client, ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda i: client.post("/score", files=_files(
            (images[i % len(images)].name, images[i % len(images)].read_bytes()))), range(20)))
    assert all(r.status_code == 200 for r in responses)
    for response in responses:
        result = response.json()["results"][0]
        assert result["score"] == pytest.approx(expected[result["file"]], rel=1e-5)


def test_a_request_that_fits_the_limit_gets_503_while_others_wait(scorer, images, monkeypatch):
    import threading

    entered, release = threading.Event(), threading.Event()
    score_crops = scorer.score_crops

    def held(crops):  # noqa: ANN001, ANN202
        entered.set()
        release.wait(60)
        return score_crops(crops)

    monkeypatch.setattr(scorer, "score_crops", held)
    images_of = [(p.name, p.read_bytes()) for p in images[:2]]
    with TestClient(create_app(scorer, Limits(max_pending=2, window_s=0.0))) as client, \
            ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/score", files=_files(*images_of))
        assert entered.wait(60), "the first request never reached the model"
        busy = client.post("/score", files=_files(images_of[0]))
        release.set()
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
        assert busy.json()["detail"] == ("2 images are waiting, and this server takes at most 2 (--max-pending): try "
                                         "again shortly")
        assert first.result(60).status_code == 200


def test_a_client_that_leaves_mid_batch_does_not_stop_the_batcher():
    """A request cancelled while its image waits (the client disconnected) must not break later requests."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from qmamba.commands.serve import _Batcher

    class Slow:
        def score_crops(self, crops):
            time.sleep(0.05)
            return [float(c) for c in crops]

    async def scenario() -> list[float]:
        batcher = _Batcher(Slow(), Limits(batch_size=4, window_s=0.02), ThreadPoolExecutor(1))
        leaving = asyncio.create_task(batcher.score(1))
        staying = asyncio.create_task(batcher.score(2))
        await asyncio.sleep(0.03)  # both are in the running batch now
        leaving.cancel()
        first = await asyncio.wait_for(staying, 10)
        return [first, await asyncio.wait_for(batcher.score(3), 10)]  # before the fix: the batcher was dead

    assert asyncio.run(scenario()) == [2.0, 3.0]


def test_serve_without_its_extra_says_what_to_install(monkeypatch, capsys):
    from qmamba.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--ckpt_path", "missing.ckpt"])
    assert exit_info.value.code == 2 and 'pip install "qmamba[serve]"' in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [("--max-upload-mb", "-1"), ("--max-upload-mb", "0"), ("--window-ms", "-5"),
                                          ("--window-ms", "nan"), ("--body-timeout", "0"), ("--token", " "),
                                          ("--max-pending", "0"), ("--max-map-windows", "-1")])
def test_limits_that_would_refuse_everything_are_usage_errors(option, value, capsys):
    from qmamba.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--ckpt_path", "missing.ckpt", option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{option} must be" in err and "Traceback" not in err


def test_the_page_is_served_without_external_resources(client):
    page = client.get("/").text
    assert "<title>qmamba: image quality</title>" in page
    assert "http://" not in page and "https://" not in page  # works offline: no CDN


@pytest.mark.slow
@needs_chromium
@pytest.mark.parametrize("token", [None, "s3cret"], ids=["open", "token in the address"])
def test_the_page_in_a_real_browser_scores_sorts_and_shows_maps(trained, images, tmp_path, token):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "qmamba", "serve", "--ckpt_path",
                               str(trained[1] / "checkpoints" / "best.ckpt"), "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **({"QMAMBA_SERVE_TOKEN": token} if token else {})})
    chrome = None
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.2)
        chrome = headless_chrome(1100, 900)
        chrome.get(url + (f"#token={token}" if token else ""))  # with a token, the page sends it on every call
        picker = chrome.find_element(By.ID, "picker")
        picker.send_keys("\n".join(str(p) for p in images[:2]))
        wait = WebDriverWait(chrome, 60)
        wait.until(lambda c: c.find_element(By.ID, "status").text.startswith("Scored 2 of 2"))
        scores = {c.find_element(By.CLASS_NAME, "name").text: float(c.find_element(By.CLASS_NAME, "score").text)
                  for c in chrome.find_elements(By.CLASS_NAME, "card")}
        api = qmamba.load(trained[1] / "checkpoints" / "best.ckpt", device="cpu").score([str(p) for p in images[:2]])
        assert scores == {p.name: pytest.approx(s, abs=0.006) for p, s in zip(images[:2], api, strict=True)}
        Select(chrome.find_element(By.ID, "sort")).select_by_value("best")
        order = [c.find_element(By.CLASS_NAME, "name").text for c in chrome.find_elements(By.CLASS_NAME, "card")]
        assert order == [p.name for _, p in sorted(zip(api, images[:2], strict=True), key=lambda t: -t[0])]
        chrome.find_element(By.ID, "maps").click()
        wait.until(lambda c: all("showmap" in card.get_attribute("class")
                                 for card in c.find_elements(By.CLASS_NAME, "card")))
        maps = chrome.find_elements(By.CSS_SELECTOR, "img.map")
        assert all(m.get_attribute("src").startswith("data:image/png") for m in maps)
        assert "trained on" in chrome.find_element(By.ID, "model").text  # /health answered too
        chrome.save_screenshot(str(tmp_path / "serve.png"))
        if os.environ.get("QMAMBA_SCREENSHOT") and token is None:  # refresh the screenshot of docs/serve.md
            shutil.copy(tmp_path / "serve.png", SCREENSHOT)
    finally:
        if chrome is not None:
            chrome.quit()
        server.terminate()
        server.wait(timeout=30)
