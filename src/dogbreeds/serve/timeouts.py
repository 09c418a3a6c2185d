"""Read deadlines at the connection: a client must send its request headers, and then its body,
within a bounded time, or the connection is closed.

uvicorn's h11 protocol has a keep-alive timeout for idle connections between requests, but no
limit on how long one request may take to arrive: a client that sends one byte every few
seconds holds its connection forever. `timeout_protocol(header_s, body_s)` returns uvicorn's
h11 protocol with two timers:

- headers: armed when the connection opens and when the first byte of each new request
  arrives; if the headers are not complete `header_s` later, the client gets a 408 and the
  connection is closed (a connection that sent nothing is just closed).
- body: armed when the headers are complete; if the body is not complete `body_s` later, the
  connection is closed. The app enforces the same deadline itself while it reads an upload
  (serve/app.py) and answers 408 first; this timer is the backstop for endpoints that never read
  their body, and it waits one second longer than the app's so that the app's answer comes first.

Pass it to uvicorn as `http=` (serve/cli.py does). Waiting connections hold a socket and a few
kilobytes, never one of the app's admission slots.
"""
from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("dogbreeds.serve")
BACKSTOP_GRACE_S = 1.0
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s")


def timeout_protocol(header_timeout_s: float, body_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with header and body deadlines (seconds, each > 0)."""
    if not (header_timeout_s > 0 and body_timeout_s > 0):
        raise ValueError(f"timeouts must be positive, got header {header_timeout_s!r}, body {body_timeout_s!r}")
    return type("TimeoutH11Protocol", (TimeoutH11Protocol,),
                {"header_timeout_s": float(header_timeout_s), "body_timeout_s": float(body_timeout_s)})


class TimeoutH11Protocol(H11Protocol):
    header_timeout_s = 10.0
    body_timeout_s = 60.0

    _timer: asyncio.TimerHandle | None = None
    _phase: str | None = None  # "headers", "body" or None (no request in progress)
    _request_bytes = 0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers", self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._phase is None and self.conn.their_state is h11.IDLE:
            self._arm("headers", self.header_timeout_s)  # the first bytes of a new request
        self._request_bytes += len(data)
        super().data_received(data)
        self._follow_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_state()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow_state(self) -> None:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.body_timeout_s + BACKSTOP_GRACE_S)
        elif state is not h11.IDLE:
            self._disarm()  # DONE, MUST_CLOSE, CLOSED, ERROR: the request is all here, or the connection ends

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        if phase == "headers":
            self._request_bytes = 0
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _expired(self) -> None:
        phase, self._timer, self._phase = self._phase, None, None
        if self.transport.is_closing():
            return
        who = "%s:%d" % self.client if self.client else "a client"
        state = self.conn.their_state
        if phase == "headers" and state is h11.IDLE:
            if self._request_bytes:  # part of a request arrived: say why it ends
                detail = (b'{"detail":"request headers not received within %g s; send the whole request at once"}'
                          % self.header_timeout_s)
                self.transport.write(_REQUEST_TIMEOUT % (len(detail), detail))
                log.info("%s: closed, request headers not received within %g s", who, self.header_timeout_s)
            self.transport.close()
        elif phase == "body" and state is h11.SEND_BODY:
            log.info("%s: closed, request body not received within %g s", who, self.body_timeout_s)
            self.transport.close()
