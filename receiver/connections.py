"""Slow and greedy clients at the transport: head and body read timeouts, a per-client
connection cap, and client aborts told apart from server errors.

aiohttp itself waits for a request head or body as long as the client keeps the
connection open (a body trickled at one byte per five seconds held a connection
for minutes, and thousands of them exhausted the descriptors). So:

* `ConnectionGuard` wraps each connection's protocol (`GuardedSite` installs it):
  it refuses a client address over its connection cap with a 429, and closes a
  connection whose request head has not arrived `header_timeout_seconds` after
  the connection opened (or after the first byte of a later request), with a 408.
* `read_in_time` (called by the receiver's middleware, receiver/middleware.py)
  reads the body within `body_timeout_seconds` (408 and the connection closed
  otherwise) before any handler runs, answers a body
  that cannot be decoded (a broken `Content-Encoding`) 400 `bad_content_format`,
  and a client that went away mid-body as a client abort: status 499, logged
  at info.

Idle keep-alive connections are closed by aiohttp's own `keepalive_timeout`.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from receiver.accesslog import route_pattern
from receiver.api.errors import ApiError, bad_content, json_error
from worker.config import Settings
from worker.logs import get_logger

log = get_logger(__name__)

# nginx's status for "the client closed the connection before the answer": counted
# in metrics and the access log, never sent (nobody is left to read it).
CLIENT_CLOSED_REQUEST = 499


def _raw_response(status: int, reason: str, body: dict[str, str]) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, for use outside aiohttp."""
    payload = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n"
    )
    if status == 429:
        head += "Retry-After: 1\r\n"
    return head.encode() + b"\r\n" + payload


_TOO_MANY = _raw_response(
    429, "Too Many Requests", {"error": "Too many connections", "code": "too_many_connections"}
)
_HEAD_TIMEOUT = _raw_response(
    408, "Request Timeout", {"error": "Request timeout", "code": "request_timeout"}
)


# How early a timer may fire (uvloop's resolution is a millisecond), in seconds.
_TIMER_SLACK_SECONDS = 0.001


@dataclass
class _Connection:
    client: str
    transport: asyncio.Transport
    busy: bool = False  # a request's head arrived and its handler has not returned yet
    # When the head now awaited began (loop time), None when no head is awaited.
    head_since: float | None = None
    # The check of that head's deadline; left armed when the head arrives in time (it
    # then finds nothing awaited), so a busy connection arms a timer once per timeout
    # instead of arming and cancelling one per request.
    timer: asyncio.TimerHandle | None = None


class ConnectionGuard:
    """Per-connection state shared by the protocol wrapper and the middleware."""

    def __init__(
        self,
        header_timeout: float,
        max_per_client: int,
        closed: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.header_timeout = header_timeout
        self.max_per_client = max_per_client
        # Told the reason of each connection the guard closes (a metrics counter): an
        # attack makes thousands, too many for a log line each.
        self._closed = closed
        self._open: dict[asyncio.BaseTransport, _Connection] = {}
        self._per_client: Counter[str] = Counter()

    @classmethod
    def from_settings(
        cls, settings: Settings, closed: Callable[[str], None] = lambda reason: None
    ) -> ConnectionGuard:
        return cls(settings.header_timeout_seconds, settings.max_connections_per_client, closed)

    def admit(self, transport: asyncio.Transport) -> bool:
        """Count a new connection; False (answered 429 and closed) when its client is at the cap."""
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if self.max_per_client and self._per_client[client] >= self.max_per_client:
            self._closed("too_many_connections")
            transport.write(_TOO_MANY)
            transport.close()
            return False
        self._per_client[client] += 1
        connection = self._open[transport] = _Connection(client, transport)
        self._head_started(connection)  # the first request's head is due from the start
        return True

    def release(self, transport: asyncio.BaseTransport) -> None:
        connection = self._open.pop(transport, None)
        if connection is None:
            return
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None
        self._per_client[connection.client] -= 1
        if self._per_client[connection.client] <= 0:
            del self._per_client[connection.client]

    def bytes_arrived(self, transport: asyncio.BaseTransport) -> None:
        """The first byte of a later request's head starts its clock."""
        connection = self._open.get(transport)
        if connection is not None and not connection.busy and connection.head_since is None:
            self._head_started(connection)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        connection = self._open.get(transport) if transport is not None else None
        if connection is not None:
            connection.busy = True
            connection.head_since = None  # arrived: its deadline check finds nothing

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        connection = self._open.get(transport) if transport is not None else None
        if connection is not None:
            connection.busy = False  # idle: aiohttp's keep-alive timeout applies

    def _head_started(self, connection: _Connection) -> None:
        loop = asyncio.get_running_loop()
        connection.head_since = loop.time()
        if connection.timer is None:
            connection.timer = loop.call_at(
                connection.head_since + self.header_timeout, self._expire, connection
            )

    def _expire(self, connection: _Connection) -> None:
        """A head's deadline: close the connection if that head, or a later one begun
        since, is still awaited past its own deadline; check again at the later one's."""
        connection.timer = None
        since = connection.head_since
        if since is None or connection.busy or connection.transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        # A later head: its own deadline (a millisecond early counts as on time: timers
        # fire to the millisecond).
        if loop.time() < since + self.header_timeout - _TIMER_SLACK_SECONDS:
            connection.timer = loop.call_at(since + self.header_timeout, self._expire, connection)
            return
        self._closed("head_timeout")
        connection.transport.write(_HEAD_TIMEOUT)
        connection.transport.close()


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the guard watching it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's does not subclass asyncio.Transport, so no isinstance).
        transport = cast(asyncio.Transport, transport)
        if self._guard.admit(transport):
            self._transport = transport
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._guard.bytes_arrived(self._transport)
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._transport is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.release(self._transport)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


CONNECTION_GUARD = web.AppKey("connection_guard", ConnectionGuard)


class GuardedSite(web.TCPSite):
    """A TCP site whose connections go through a `ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        super().__init__(runner, host, port)
        self._guard = runner.app[CONNECTION_GUARD]

    async def start(self) -> None:
        # As TCPSite.start, with the protocol factory wrapped (aiohttp has no hook for it).
        await web.BaseSite.start(self)
        guard = self._guard
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _GuardedProtocol(guard, server()),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def read_in_time(request: web.Request, body_timeout: float) -> web.StreamResponse | None:
    """Read the body within `body_timeout` seconds, before any handler runs; None when it
    was read (aiohttp keeps it: handlers read it again for free), else the answer to give:
    408 (and the connection closed), 400 `bad_content_format` (and closed), or the client
    abort's 499. Errors of the read itself (a body over the size limit) are raised."""
    try:
        if request.content.is_eof():
            # The whole body came with the head (most do): nothing to wait for,
            # so no timer to arm and cancel.
            await request.read()
        else:
            async with asyncio.timeout(body_timeout):
                await request.read()
    except TimeoutError:
        log.info("request_body_timeout", route=route_pattern(request))
        timed_out = json_error(
            ApiError(408, {"error": "Request timeout", "code": "request_timeout"})
        )
        timed_out.force_close()
        return timed_out
    except (ConnectionError, web.RequestPayloadError):
        if _client_gone(request):
            log.info("client_aborted", route=route_pattern(request), method=request.method)
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        # Still connected: a body that does not decode (a broken Content-Encoding).
        # The rest cannot be read either: mark it ended, so aiohttp does not try to
        # drain it after the answer (and log the same failure again), and close.
        request.content.feed_eof()
        response = json_error(bad_content())
        response.force_close()
        return response
    return None
