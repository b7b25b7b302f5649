"""``qmamba serve``: a scoring service for a trained checkpoint, and the page a person uses it through.

    qmamba serve --ckpt_path runs/demo/checkpoints/best.ckpt          # then open http://127.0.0.1:8000

``POST /score`` takes one or many images (multipart field ``files``) and answers, per image, its score on the
training dataset's scale with the direction, or why it could not be scored; ``?map=1`` adds the quality map
(window scores and a PNG data URL). ``GET /health`` describes the model, ``GET /`` serves the page (plain HTML,
CSS and JS shipped in the package: no build step, no CDN). Images from concurrent requests are batched onto the
model: a request's crops wait at most ``--window-ms`` for others to fill a batch of ``--batch-size`` images, and one
thread runs the model. Needs ``pip install "qmamba[serve]"`` (FastAPI, uvicorn); like ``qmamba score``, it imports no
Lightning.

What one request can cost is bounded (:class:`Limits`), since uploads are untrusted: the body is counted while it
streams (413 at ``--max-upload-mb``, chunked uploads included) and must keep arriving (408 after ``--body-timeout``
seconds of silence); images are checked by decoding, never by extension, and their pixels by their headers before
any decoding, per image (``--max-pixels``) and per request (``--max-request-pixels``); a quality map above
``--max-map-windows`` windows is refused for that image (its score is still given), and maps run one at a time, a
model batch per step, so other requests' batches run between their steps; more than ``--max-pending`` images
waiting gets 503 with Retry-After. ``--token`` (or ``QMAMBA_SERVE_TOKEN``) requires ``Authorization: Bearer
<token>`` on the API for deployments beyond localhost; the API docs (``/docs``, which load Swagger UI from a CDN)
are off unless ``--docs``.
"""

import argparse
import asyncio
import base64
import hmac
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

from qmamba.errors import UsageError
from qmamba.inference.model_sources import add_model_arguments
from qmamba.inference.precision import add_precision_argument

__all__ = ["Limits", "create_app", "main"]

TOKEN_ENV = "QMAMBA_SERVE_TOKEN"


@dataclass(frozen=True)
class Limits:
    """What one request may bring and cost, and how long an image waits for others to share its batch."""

    max_upload_bytes: int = 50 * 2**20
    max_pixels: int = 60_000_000  # one image
    max_request_pixels: int = 120_000_000  # all images of one request
    max_map_windows: int = 1024  # model crops of one quality map
    max_pending: int = 256  # images admitted and not yet answered, all requests together
    body_timeout_s: float = 30.0  # longest silence while a request body streams in
    batch_size: int = 8
    window_s: float = 0.01


class _Batcher:
    """Collects crops of images from concurrent requests into model batches, run one at a time in one thread."""

    def __init__(self, scorer: Any, limits: Limits, executor: ThreadPoolExecutor) -> None:
        self.scorer, self.limits, self.executor = scorer, limits, executor
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future[float]]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def score(self, crops: Any) -> float:
        if self.task is None:
            self.task = asyncio.create_task(self._run())
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        await self.queue.put((crops, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.limits.window_s
            while len(batch) < self.limits.batch_size:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            batch = [(crops, future) for crops, future in batch if not future.done()]  # clients that left
            if not batch:
                continue
            try:
                scores = await loop.run_in_executor(self.executor, self.scorer.score_crops, [c for c, _ in batch])
            except Exception as err:  # noqa: BLE001 - every waiting request learns why
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), score in zip(batch, scores, strict=True):
                if not future.done():  # a client that disconnected meanwhile must not stop the batcher
                    future.set_result(score)


def _pixels(data: bytes) -> int:
    """Width x height from an image's header (nothing decoded); 0 when it is no image (it fails alone later)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 - any unreadable upload: reported by _decode with its reason
        return 0


class _Guard:
    """ASGI middleware in front of the API: the bearer token, and the request body counted and timed while it
    streams, so that neither a chunked upload without Content-Length nor a stalled one is read to the end first."""

    def __init__(self, app: Any, limits: Limits, token: str | None, allowed_hosts: frozenset[str] | None) -> None:
        self.app, self.limits, self.token, self.allowed_hosts = app, limits, token, allowed_hosts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = _host_name(headers.get("host", ""))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:  # DNS rebinding: a page of another
            return await _reply(send, 400, f"this server does not answer to the host {host!r}; it answers to "  # site
                                           f"{', '.join(sorted(self.allowed_hosts))} (--allowed-hosts)")
        if self.token is not None and scope["path"] != "/" and not hmac.compare_digest(
                headers.get("authorization", "").encode(), f"Bearer {self.token}".encode()):
            return await _reply(send, 401, "this server needs its access token: send the header Authorization: "
                                           "Bearer <token> (the page asks for it)", {"www-authenticate": "Bearer"})
        limit, length = self.limits.max_upload_bytes, headers.get("content-length", "")
        if scope["method"] == "POST" and length.isdigit() and int(length) > limit:
            return await _reply(send, 413, _too_large(int(length), limit))
        received, streaming = 0, True

        async def counted() -> dict[str, Any]:
            from fastapi import HTTPException

            nonlocal received, streaming
            if not streaming:  # the body is in: later calls wait for a disconnect, as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.limits.body_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body stalled for {self.limits.body_timeout_s:g} s "
                                         "(--body-timeout)") from None
            streaming = message["type"] == "http.request" and message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > limit:  # raised inside FastAPI's body parsing, which answers HTTPExceptions as they are
                raise HTTPException(413, _too_large(received, limit, so_far=True))
            return message

        await self.app(scope, counted, send)


def _too_large(size: int, limit: int, so_far: bool = False) -> str:
    return (f"upload of {'more than ' if so_far else ''}{size} bytes is above this server's limit of {limit} bytes "
            "(--max-upload-mb)")


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a bound on the time a request's line and headers take to arrive, from the
    connection or the previous response on: uvicorn has none, so a client that trickles its headers (slowloris)
    held a connection for ever. The body has its own bound (``--body-timeout``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            self._header_timer: Any = None
            super().connection_made(transport)
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._awaited:  # a new request's headers were parsed
                self._cancel()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            self._cancel()
            self._awaited = self.cycle
            self._header_timer = self.loop.call_later(seconds, self._too_slow)

        def _cancel(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is self._awaited and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def _host_name(host: str) -> str:
    """A Host header without its port: ``[::1]:8000`` -> ``::1``, ``LocalHost:80`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def allowed_hosts(option: str | None, bound: str) -> frozenset[str] | None:
    """The Host names the server answers to (None: any). By default a server on a loopback address answers to the
    loopback names only, so that a page of another site whose name resolves to 127.0.0.1 (DNS rebinding) cannot use
    it; a server on another address answers to any name. ``--allowed-hosts`` adds names to the loopback ones, which
    the start line tells you to open (``*``: any name)."""
    if option is not None:
        names = frozenset(_host_name(n) for n in option.split(",") if n.strip())
        return None if "*" in names else names | LOOPBACK
    return LOOPBACK if bound in LOOPBACK else None


async def _reply(send: Any, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


def create_app(scorer: Any, limits: Limits | None = None, token: str | None = None, docs: bool = False,
               hosts: frozenset[str] | None = None) -> Any:
    """The FastAPI application serving ``scorer`` (a :class:`qmamba.inference.scoring.Scorer`); ``token`` requires
    ``Authorization: Bearer <token>`` on everything but the page; ``docs`` serves FastAPI's ``/docs``; ``hosts``
    are the Host names it answers to (None: any; :func:`allowed_hosts`)."""
    import numpy as np
    from fastapi import FastAPI, File, HTTPException, UploadFile
    from fastapi.responses import HTMLResponse

    from qmamba.inference.images import ImageReadError, NamedBytes, read_rgb
    from qmamba.inference.quality_maps import render

    limits = limits or Limits()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qmamba-model")  # the model runs here only
    batcher = _Batcher(scorer, limits, executor)
    maps = asyncio.Semaphore(1)  # one quality map at a time; its steps share the model thread with the batches
    pending = [0]  # images admitted and not yet answered
    scale = scorer.scale
    app = FastAPI(title="qmamba", description="No-reference image quality scores from a QMamba checkpoint.",
                  **({} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}))
    app.add_middleware(_Guard, limits=limits, token=token, allowed_hosts=hosts)
    page = resources.files("qmamba.commands").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": scorer.info["backbone"], "datasets": scorer.info["datasets"],
                "dataset": scorer.dataset, "device": str(scorer.device), **scale.as_header(),
                "crops": scorer.crops.count,
                "crop_size": scorer.crops.size, "precision": scorer.precision}

    async def quality_map(rgb: Any, entry: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(None, scorer.map_job, rgb)
        if job.windows > limits.max_map_windows:
            entry["map_error"] = (f"a map of this image needs {job.windows} windows, above this server's limit of "
                                  f"{limits.max_map_windows} (--max-map-windows); send a smaller image")
            return
        async with maps:
            while await loop.run_in_executor(executor, job.step):
                pass
        qmap = job.result()
        png = io.BytesIO()
        await loop.run_in_executor(None, lambda: render(np.asarray(rgb), qmap, scale).save(png, format="PNG"))
        entry["map"] = {"scores": qmap.scores.round(6).tolist(), "tops": qmap.tops.tolist(),
                        "lefts": qmap.lefts.tolist(), "size": qmap.size,
                        "png": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}

    async def score_one(name: str, data: bytes, with_map: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"file": name}
        loop = asyncio.get_running_loop()
        try:
            rgb = await loop.run_in_executor(None, partial(read_rgb, NamedBytes(data, name),
                                                           max_pixels=limits.max_pixels))
            crops = await loop.run_in_executor(None, scorer.crops, rgb)
        except (ImageReadError, ValueError) as err:  # not an image, a bomb, too small for a crop: that image alone
            return {**entry, "error": str(err)}
        value = await batcher.score(crops)
        entry.update(score=value, scale=scale.bounds, direction=scale.direction)
        if scale.out_of_range(value):  # a prediction beyond the training scale is shown as it is, and said so
            entry["flag"] = scale.out_of_range(value)
        if with_map:
            await quality_map(rgb, entry)
        return entry

    @app.post("/score")
    async def score(files: list[UploadFile] = File(...), map: int = 0) -> dict[str, Any]:  # noqa: A002
        if not files:
            raise HTTPException(422, "no images: send them as multipart field 'files'")
        if len(files) > limits.max_pending:  # could never be admitted: not "try again" but "send fewer"
            raise HTTPException(413, f"a request of {len(files)} images is above this server's limit of "
                                     f"{limits.max_pending} waiting images (--max-pending); send at most "
                                     f"{limits.max_pending} per request")
        if pending[0] + len(files) > limits.max_pending:
            raise HTTPException(503, f"{pending[0]} images are waiting, and this server takes at most "
                                     f"{limits.max_pending} (--max-pending): try again shortly",
                                headers={"Retry-After": "2"})
        names = [f.filename or f"upload {i}" for i, f in enumerate(files)]
        datas = [await f.read() for f in files]
        pixels = sum(_pixels(d) for d in datas)
        if pixels > limits.max_request_pixels:
            raise HTTPException(413, f"the images hold {pixels} pixels in all, above this server's limit of "
                                     f"{limits.max_request_pixels} per request (--max-request-pixels); send them "
                                     "in several requests")
        pending[0] += len(files)
        try:
            results = await asyncio.gather(*(score_one(n, d, bool(map)) for n, d in zip(names, datas, strict=True)))
        finally:
            pending[0] -= len(files)
        if all("error" in r for r in results):
            raise HTTPException(422, "; ".join(f"{r['file']}: {r['error']}" for r in results))
        return {"model": scorer.info["backbone"], "dataset": scorer.dataset, "results": results}

    return app


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="qmamba serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_precision_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dataset", help="report on this training dataset's scale (default: the first)")
    parser.add_argument("--crops", type=int, help="evaluation crops per image (default: as in training)")
    parser.add_argument("--batch-size", type=int, default=Limits.batch_size, help="images per model batch")
    parser.add_argument("--window-ms", type=float, default=Limits.window_s * 1000,
                        help="how long an image waits for others to share its batch (default 10)")
    parser.add_argument("--max-upload-mb", type=float, default=Limits.max_upload_bytes / 2**20,
                        help="largest request body (default 50)")
    parser.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="largest image (default 60 M)")
    parser.add_argument("--max-request-pixels", type=int, default=Limits.max_request_pixels,
                        help="most pixels of all images in one request (default 120 M)")
    parser.add_argument("--max-map-windows", type=int, default=Limits.max_map_windows,
                        help="most windows of one quality map; larger maps are refused for that image (default 1024)")
    parser.add_argument("--max-pending", type=int, default=Limits.max_pending,
                        help="most images waiting at once, all requests together; beyond: 503 (default 256)")
    parser.add_argument("--body-timeout", type=float, default=Limits.body_timeout_s,
                        help="seconds a request body may stall before 408 (default 30)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a request's line and headers may take to arrive before the connection is "
                             "closed (default 10)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"require Authorization: Bearer TOKEN on the API (default: ${TOKEN_ENV}; the page asks "
                             "for it, or open it as http://HOST:PORT/#token=TOKEN)")
    parser.add_argument("--allowed-hosts", metavar="NAMES", help="comma-separated Host names the server answers to "
                        "besides the loopback names, * for any (default: the loopback names alone when --host is a "
                        "loopback address, else any)")
    parser.add_argument("--docs", action="store_true", help="serve FastAPI's /docs (loads Swagger UI from a CDN)")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile (requests of a "
                        "new batch size wait for its compilation once)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "crops", "max_pixels", "max_request_pixels", "max_map_windows", "max_pending"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.max_upload_mb > 0:  # a limit of 0 or less would refuse every request
        parser.error(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    if not args.window_ms >= 0:
        parser.error(f"--window-ms must be >= 0, got {args.window_ms}")
    for name in ("body_timeout", "header_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.token is not None and not args.token.strip():
        parser.error(f"--token must be a secret, got an empty one (from --token or ${TOKEN_ENV}); leave both unset "
                     "to serve without one")
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401 - FastAPI needs it for uploads
        import uvicorn
    except ImportError:
        raise UsageError("qmamba serve needs its extra: pip install \"qmamba[serve]\" (FastAPI, uvicorn and "
                         "python-multipart)") from None

    from qmamba.inference.scoring import load

    scorer = load(args.ckpt_path, device=args.device, crops=args.crops, dataset=args.dataset,
                  batch_size=args.batch_size, trusted=args.trust_checkpoint, sha256=args.sha256, compile=args.compile,
                  precision=args.precision)
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.max_request_pixels, args.max_map_windows,
                    args.max_pending, args.body_timeout, args.batch_size, args.window_ms / 1000)
    print(f"qmamba serve: {scorer.info['backbone']} on {scorer.device}, {scorer.dataset} scale; open "
          f"http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    if args.token is None and args.host not in LOOPBACK:
        print(f"qmamba serve: listening on {args.host} without --token: anyone who reaches this port can use the "
              "model", flush=True)
    uvicorn.run(create_app(scorer, limits, args.token, args.docs, allowed_hosts(args.allowed_hosts, args.host)),
                host=args.host, http=header_timeout_protocol(args.header_timeout), port=args.port, log_level="warning",
                workers=1, timeout_graceful_shutdown=5, loop="asyncio", env_file=None,
                server_header=False, date_header=False, access_log=bool(os.environ.get("QMAMBA_ACCESS_LOG")))
