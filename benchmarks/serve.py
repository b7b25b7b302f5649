"""``qmamba serve`` under load: requests/s and latency for 1, 4 and 16 concurrent clients, next to ``qmamba score``.

    python benchmarks/serve.py runs/demo/checkpoints/best.ckpt            # the demo model on the CPU
    python benchmarks/serve.py CKPT --requests 200 --clients 1 4 16 --images data/demo/koniq10k/1024x768

Starts ``qmamba serve`` as a subprocess on a free localhost port, sends one image per request (cycling through
--images) from N client threads with keep-alive connections, and prints requests/s and the p50 / p95 latency; then
the same images through ``qmamba.load(...).iter_batches`` (what ``qmamba score`` runs) in this process, as img/s.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

import qmamba


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(url: str, payloads: list[tuple[str, bytes]], requests: int, clients: int) -> tuple[float, list[float]]:
    """Seconds for ``requests`` requests spread over ``clients`` threads, and every request's latency."""
    latencies: list[float] = []
    lock, counter = threading.Lock(), iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=120) as session:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                name, data = payloads[index % len(payloads)]
                start = time.perf_counter()
                response = session.post(f"{url}/score", files={"files": (name, data)})
                response.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--images", type=Path, default=Path("data/demo/koniq10k/1024x768"),
                        help="a folder of images to send (one per request)")
    parser.add_argument("--count", type=int, default=32, help="distinct images sent, cycled")
    parser.add_argument("--requests", type=int, default=200, help="requests per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.count]
    if not paths:
        parser.error(f"no images in {args.images}")
    payloads = [(p.name, p.read_bytes()) for p in paths]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "qmamba", "serve", "--ckpt_path", str(args.checkpoint),
                               "--port", str(port), "--device", args.device], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("qmamba serve did not start") from None
                time.sleep(0.3)
        load_test(url, payloads, min(16, args.requests), 4)  # warm-up
        print(f"{len(paths)} images from {args.images}, {args.requests} requests per row, model on {args.device}")
        print(f"| {'clients':>7} | {'requests/s':>10} | {'p50 ms':>7} | {'p95 ms':>7} |")
        print(f"|{'-' * 9}|{'-' * 12}|{'-' * 9}|{'-' * 9}|")
        for clients in args.clients:
            seconds, latencies = load_test(url, payloads, args.requests, clients)
            cuts = statistics.quantiles(latencies, n=20)
            print(f"| {clients:>7} | {args.requests / seconds:>10.1f} | {1000 * statistics.median(latencies):>7.1f} | "
                  f"{1000 * cuts[18]:>7.1f} |", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    scorer = qmamba.load(args.checkpoint, device=args.device)
    files = [str(p) for p in paths] * max(1, args.requests // len(paths))
    start = time.perf_counter()
    for _ in scorer.iter_batches(files):
        pass
    print(f"\nqmamba score's loop on the same images: {len(files) / (time.perf_counter() - start):.1f} img/s")


if __name__ == "__main__":
    main()
