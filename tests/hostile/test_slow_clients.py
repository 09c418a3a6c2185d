"""Slow clients cannot starve the service (issue 12, defect 1): a client that trickles its
request holds a socket, never an admission slot, and is cut off by the header and body
timeouts. The full-size load test is benchmarks/bench_slow_clients.py."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

SLOTS = ["--max-queue", "4", "--max-batch", "1"]  # 5 admission slots: 5 slow clients used to lock everyone out
TIMEOUTS = ["--header-timeout", "1", "--body-timeout", "2"]


async def _timed_read(port: int, payload: bytes, drip: bytes = b"", every_s: float = 0.3,
                      stop: asyncio.Event | None = None) -> tuple[float, bytes]:
    """Send `payload`, then `drip` one byte every `every_s` s until the server closes (or `stop`
    is set); returns (seconds until the server closed, everything it sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    answer = asyncio.create_task(reader.read())  # until EOF
    try:
        writer.write(payload)
        for byte in drip:
            if answer.done() or (stop is not None and stop.is_set()):
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.wait({answer}, timeout=every_s)
        if stop is not None and stop.is_set():
            answer.cancel()
            return time.monotonic() - start, b""
        received = await asyncio.wait_for(answer, 10)
    except ConnectionError:
        received = await answer if answer.done() and not answer.exception() else b""
    finally:
        writer.close()
    return time.monotonic() - start, received


async def _trickle_body(port: int, stop: asyncio.Event) -> list[bytes]:
    """A persistent slow client: the headers at once, then one body byte every 0.3 s; when the
    server cuts it off, it connects again. Returns the first line of each answer."""
    answers = []
    while not stop.is_set():
        _, answer = await _timed_read(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                            b"Content-Length: 100000\r\n\r\n", drip=b"\xff" * 100000, stop=stop)
        answers.append(answer.split(b"\r\n")[0])
    return answers


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(*SLOTS, *TIMEOUTS)


def test_slow_clients_hold_no_slot_and_real_requests_still_succeed(server, hostile_photo):
    photo = hostile_photo.read_bytes()

    async def scenario():
        stop = asyncio.Event()
        slow = [asyncio.create_task(_trickle_body(server.port, stop)) for _ in range(12)]
        await asyncio.sleep(0.7)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            health = (await http.get("/healthz")).json()
            latencies, codes = [], []
            for _ in range(4):  # 4 waves of 3 concurrent real requests

                async def one():
                    start = time.monotonic()
                    response = await http.post("/v1/predict", content=photo, headers={"content-type": "image/jpeg"})
                    latencies.append(time.monotonic() - start)
                    codes.append(response.status_code)

                await asyncio.gather(*(one() for _ in range(3)))
            await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - started)))  # past one body timeout (2 s)
            after = (await http.get("/healthz")).json()
        stop.set()
        answers = [a for answers in await asyncio.gather(*slow) for a in answers]
        return health, after, codes, latencies, answers

    started = time.monotonic()
    health, after, codes, latencies, answers = asyncio.run(scenario())
    assert health["reading"] >= 12 and health["in_flight"] == 0, health  # they are being read, not admitted
    assert codes == [200] * 12, codes
    assert max(latencies) < 2.0, latencies
    assert answers.count(b"HTTP/1.1 408 Request Timeout") >= 12, answers  # each was cut off, and came back
    assert after["reading"] >= 12 and after["in_flight"] == 0, after


def test_header_and_body_timeouts_answer_408_and_close(server):

    async def scenario():
        headers_drip = _timed_read(server.port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n", drip=b"X-Slow: " + b"a" * 40)
        body_drip = _timed_read(server.port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
                                drip=b"\xff" * 40)
        idle = _timed_read(server.port, b"")  # connects and sends nothing
        return await asyncio.gather(headers_drip, body_drip, idle)

    (t_headers, headers_answer), (t_body, body_answer), (t_idle, idle_answer) = asyncio.run(scenario())
    assert headers_answer.startswith(b"HTTP/1.1 408") and b"within 1 s" in headers_answer, headers_answer
    assert 0.9 < t_headers < 3.0, t_headers
    assert body_answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in body_answer, body_answer
    assert 1.9 < t_body < 4.0, t_body
    assert idle_answer == b"" and 0.9 < t_idle < 3.0, (t_idle, idle_answer)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        health = http.get("/healthz").json()
    assert health["reading"] == 0 and health["in_flight"] == 0, health  # nothing left held
    log = server.log()
    assert "Traceback" not in log
    assert "request headers not received within 1 s" in log and "408" in log


def test_a_slow_body_on_an_endpoint_that_never_reads_it_is_cut_off_too(server):
    elapsed, answer = asyncio.run(_timed_read(
        server.port, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", drip=b"a" * 60, every_s=0.2))
    assert answer.startswith(b"HTTP/1.1 405"), answer  # answered at once (GET only), and the connection
    assert elapsed < 4.5, elapsed  # does not stay open for the trickled body (60 bytes x 0.2 s = 12 s)
