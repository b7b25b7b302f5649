"""``qmamba serve``: a scoring service for a trained checkpoint, and the page a person uses it through.

    qmamba serve --ckpt_path runs/demo/checkpoints/best.ckpt          # then open http://127.0.0.1:8000

``POST /score`` takes one or many images (multipart field ``files``) and answers, per image, its score on the
training dataset's scale with the direction, or why it could not be scored; ``?map=1`` adds the quality map
(window scores and a PNG data URL). ``GET /health`` describes the model, ``GET /`` serves the page (plain HTML,
CSS and JS shipped in the package: no build step, no CDN). Images from concurrent requests are batched onto the
model: a request's crops wait at most ``--window-ms`` for others to fill a batch of ``--batch-size`` images, and one
thread runs the model. Uploads are checked by decoding, never by extension; a request above ``--max-upload-mb``
gets 413, an image above ``--max-pixels`` (a decompression bomb) fails alone. Needs ``pip install
"qmamba[serve]"`` (FastAPI, uvicorn); like ``qmamba score``, it imports no Lightning.
"""

import argparse
import asyncio
import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

from qmamba.errors import UsageError

__all__ = ["Limits", "create_app", "main"]


@dataclass(frozen=True)
class Limits:
    """What one request may bring, and how long an image waits for others to share its batch."""

    max_upload_bytes: int = 50 * 2**20
    max_pixels: int = 60_000_000
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


def _decode(data: bytes, max_pixels: int) -> Any:
    """RGB array of uploaded bytes; a one-line ValueError for anything that is not a usable image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from qmamba.data.images import rgb_array

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(f"image of {image.width}x{image.height} pixels is above this server's limit of "
                                 f"{max_pixels} pixels (a decompression bomb?)")
            return rgb_array(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as err:
        raise ValueError(f"refused as a possible decompression bomb ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"not a readable image ({err.__class__.__name__}: {err})") from None


def create_app(scorer: Any, limits: Limits | None = None) -> Any:
    """The FastAPI application serving ``scorer`` (a :class:`qmamba.scoring.Scorer`)."""
    import numpy as np
    from fastapi import FastAPI, File, HTTPException, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse

    from qmamba.quality_maps import render

    limits = limits or Limits()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qmamba-model")  # the model runs here only
    batcher = _Batcher(scorer, limits, executor)
    scale = scorer.scale
    app = FastAPI(title="qmamba", description="No-reference image quality scores from a QMamba checkpoint.")
    page = resources.files("qmamba").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.middleware("http")
    async def limit_upload(request: Request, call_next: Any) -> Any:
        size = request.headers.get("content-length")
        if request.method == "POST" and size is not None and int(size) > limits.max_upload_bytes:
            return JSONResponse({"detail": f"upload of {int(size)} bytes is above this server's limit of "
                                           f"{limits.max_upload_bytes} bytes (--max-upload-mb)"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": scorer.info["backbone"], "datasets": scorer.info["datasets"],
                "dataset": scorer.dataset, "device": str(scorer.device), "score_range": [scale.low, scale.high],
                "direction": scale.direction, "crops": scorer.crops.count, "crop_size": scorer.crops.size}

    async def score_one(upload: UploadFile, with_map: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"file": upload.filename}
        loop = asyncio.get_running_loop()
        try:
            rgb = await loop.run_in_executor(None, _decode, await upload.read(), limits.max_pixels)
            crops = await loop.run_in_executor(None, scorer.crops, rgb)
        except ValueError as err:
            return {**entry, "error": str(err)}
        value = await batcher.score(crops)
        entry.update(score=value, scale=[scale.low, scale.high], direction=scale.direction)
        if scale.out_of_range(value):  # a prediction beyond the training scale is shown as it is, and said so
            entry["flag"] = scale.out_of_range(value)
        if with_map:
            qmap = await loop.run_in_executor(executor, scorer.quality_map, rgb)
            png = io.BytesIO()
            render(np.asarray(rgb), qmap, scale).save(png, format="PNG")
            entry["map"] = {"scores": qmap.scores.round(6).tolist(), "tops": qmap.tops.tolist(),
                            "lefts": qmap.lefts.tolist(), "size": qmap.size,
                            "png": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}
        return entry

    @app.post("/score")
    async def score(files: list[UploadFile] = File(...), map: int = 0) -> dict[str, Any]:  # noqa: A002
        if not files:
            raise HTTPException(422, "no images: send them as multipart field 'files'")
        total = sum(f.size or 0 for f in files)  # also for chunked uploads, which carry no Content-Length
        if total > limits.max_upload_bytes:
            raise HTTPException(413, f"upload of {total} bytes is above this server's limit of "
                                     f"{limits.max_upload_bytes} bytes (--max-upload-mb)")
        results = await asyncio.gather(*(score_one(f, bool(map)) for f in files))
        if all("error" in r for r in results):
            raise HTTPException(422, "; ".join(f"{r['file']}: {r['error']}" for r in results))
        return {"model": scorer.info["backbone"], "dataset": scorer.dataset, "results": results}

    return app


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="qmamba serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a qmamba checkpoint (runs/<name>/...)")
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
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile (requests of a "
                        "new batch size wait for its compilation once)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint with pickled Python objects (they can run code: trusted files only)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "crops", "max_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.max_upload_mb > 0:  # a limit of 0 or less would refuse every request
        parser.error(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    if not args.window_ms >= 0:
        parser.error(f"--window-ms must be >= 0, got {args.window_ms}")
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401 - FastAPI needs it for uploads
        import uvicorn
    except ImportError:
        raise UsageError("qmamba serve needs its extra: pip install \"qmamba[serve]\" (FastAPI, uvicorn and "
                         "python-multipart)") from None

    from qmamba.scoring import load

    scorer = load(args.ckpt_path, device=args.device, crops=args.crops, dataset=args.dataset,
                  batch_size=args.batch_size, trusted=args.trust_checkpoint, compile=args.compile)
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.batch_size, args.window_ms / 1000)
    print(f"qmamba serve: {scorer.info['backbone']} on {scorer.device}, {scorer.dataset} scale; open "
          f"http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(scorer, limits), host=args.host, port=args.port, log_level="warning",
                workers=1, timeout_graceful_shutdown=5, loop="asyncio", env_file=None,
                server_header=False, date_header=False, access_log=bool(os.environ.get("QMAMBA_ACCESS_LOG")))
