"""The HTTP/1.1 client of merchant callbacks: one POST, its status, nothing else.

aiohttp's ClientSession spent ~230 µs of CPU per callback under load (a
profile of the worker); this client does the same job in a few tens of µs
because it does only that job:

* one `asyncio.Protocol` per connection (no streams, no per-request objects
  but a future and a timer), the request written in one `write`;
* the response parsed by llhttp (`httptools`, the C parser of uvicorn and
  Node.js): Content-Length, chunked and close-delimited bodies, HTTP/1.0,
  interim 1xx answers skipped; anything malformed fails the attempt and
  closes the connection;
* keep-alive: a connection goes back to its destination's pool only after a
  complete, well-framed HTTP/1.1 response without `Connection: close`;
  idle ones are closed after IDLE_SECONDS; the pool holds at most `limit`
  connections in all;
* one total timeout per request (waiting for a slot, connect, TLS, write
  and response); a timed-out connection is closed;
* no redirects (a 3xx is a status like any other), no cookies, no
  compression; the body is read up to `max_response_bytes` and thrown away.

It never resolves a name: the URL's host must be an IP address, the one the
SSRF guard checked (`destinations.pinned`); TLS verifies the certificate for
`server_hostname`, the name of the merchant's URL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import httptools
from yarl import URL

from worker.outbox.destinations import DestinationRefused

# Bytes of one response's status line and headers (1xx answers included) at most.
MAX_HEAD_BYTES = 64 * 1024
# An idle keep-alive connection is closed after this many seconds (aiohttp's default
# too); servers close theirs after 5 s (Node.js, uvicorn) to 75 s (nginx, aiohttp).
IDLE_SECONDS = 15.0
# Pooled destinations (URL and TLS name) whose request line is kept ready.
TARGET_CACHE_SIZE = 4096


class ResponseError(Exception):
    """The server's answer was not a response we can read (malformed, too large a head)."""


class ConnectionClosed(ConnectionError):
    """The server closed the connection before its response was complete."""

    def __init__(self, message: str, *, nothing_received: bool) -> None:
        super().__init__(message)
        # Not a byte of a response arrived: a keep-alive connection the server had
        # already closed while it was idle (see CallbackClient.post).
        self.nothing_received = nothing_received


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a request goes: the pool it uses and its ready request line."""

    key: tuple[str, int, str | None]  # address, port, TLS server name (None: plain HTTP)
    address: str
    port: int
    server_hostname: str | None
    request_line: str


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; at most one request on it at a time."""

    def __init__(self, client: CallbackClient, key: tuple[str, int, str | None]) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.header_bytes = 0  # names and values of this request's answers (1xx included)
        self.idle_since = 0.0
        self.waiter: asyncio.Future[int] | None = None
        self._reset()

    def _reset(self) -> None:
        """The state of one response (1xx answers reset it for the final one)."""
        self.status = 0
        self.received = 0
        self.head_bytes = 0  # bytes read while the head was incomplete
        self.headers_done = False
        self.framed = False  # Content-Length or chunked: the end is known without a close
        self.keep_alive = False
        self.body_bytes = 0
        self.done = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are no subclass of asyncio.Transport, hence the cast).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or self.done or waiter.done():
            # Bytes nobody asked for (while idle, or after the response): never reused.
            self.close()
            return
        self.received += len(data)
        if not self.headers_done:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ResponseError("malformed response: unexpected protocol upgrade"))
            return
        except httptools.HttpParserError as exc:
            self._fail(ResponseError(f"malformed response: {str(exc)[:100]}"))
            return
        if self.header_bytes > MAX_HEAD_BYTES or (
            self.head_bytes > MAX_HEAD_BYTES and not self.headers_done
        ):
            self._fail(ResponseError(f"response head over {MAX_HEAD_BYTES} bytes"))
        elif self.done:
            self._finish()
        elif self.body_bytes > self.client.max_response_bytes:
            # The status counts; the rest of the body is not read, the connection not reused.
            self.keep_alive = False
            self._finish()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost tells the waiter

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.headers_done and not self.framed and self.status >= 200:
            # A body delimited by the close (HTTP/1.0 style): complete now.
            self.keep_alive = False
            waiter.set_result(self.status)
            return
        where = "mid-response" if self.received else "before the response"
        if exc is not None:
            where += f" ({exc})"
        self._fail(
            ConnectionClosed(f"connection closed {where}", nothing_received=self.received == 0)
        )

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if len(name) in (14, 17):
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and value.lower().endswith(b"chunked")
            ):
                self.framed = True

    def on_headers_complete(self) -> None:
        if self.done:  # of a response after ours (see on_message_begin): not our status
            return
        self.headers_done = True
        self.status = self.parser.get_status_code()
        # Asked here: llhttp forgets the framing once the message is complete.
        self.keep_alive = (
            self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1"
        )

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_begin(self) -> None:
        if self.done:  # a second response in the same read: nothing we asked for
            self.keep_alive = False

    def on_message_complete(self) -> None:
        if self.done:
            return
        if 100 <= self.status < 200:  # interim (103 Early Hints, …): the final one follows
            self._reset()
            self.received = 1  # bytes of a response did arrive
            return
        self.done = True

    # the request

    def send(self, target: _Target, body: bytes, headers: Mapping[str, str]) -> None:
        """Write the request (one write: request line, headers, body)."""
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("a header name or value holds a line break")
        head = f"{target.request_line}{lines}Content-Length: {len(body)}\r\n\r\n"
        if self.closed or self.transport is None:  # closed by the server as it was made
            raise ConnectionClosed("connection closed before the request", nothing_received=True)
        self._reset()
        self.header_bytes = 0
        self.transport.write(head.encode() + body)

    def _finish(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self.status)
        if not self.keep_alive:
            self.close()

    def _fail(self, exc: BaseException) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def timed_out(self) -> None:
        self._fail(TimeoutError("no complete response in time"))

    def close(self) -> None:
        self.keep_alive = False
        self._closed()
        if self.transport is not None:
            self.transport.abort()

    def _closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.client._opened -= 1


class CallbackClient:
    """Pooled keep-alive connections to merchants' callback endpoints (one per process)."""

    def __init__(
        self,
        *,
        timeout: float,
        limit: int,
        max_response_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.timeout = timeout
        self.limit = limit
        self.max_response_bytes = max_response_bytes
        self.idle_seconds = idle_seconds
        self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._slots = asyncio.Semaphore(limit)
        # Idle connections per destination, the most recently used last.
        self._idle: dict[tuple[str, int, str | None], list[_Connection]] = {}
        self._opened = 0  # connections open: in use and idle
        self._targets: dict[tuple[URL, str | None], _Target] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False
        self.connects = 0  # new connections made (tests and benchmarks read it)

    async def post(
        self, url: URL, body: bytes, headers: Mapping[str, str], server_hostname: str | None
    ) -> int:
        """POST `body` with `headers` (the Host header among them); the response's status.

        Raises TimeoutError, ResponseError, ConnectionError or another OSError
        (ssl.SSLError among them) when no complete status arrived in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        target = self._target(url, server_hostname)
        if self._slots.locked():
            try:
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            except TimeoutError:
                raise TimeoutError("no free connection slot in time") from None
        else:
            await self._slots.acquire()
        try:
            connection = self._pooled(target, loop.time())
            if connection is not None:
                try:
                    return await self._exchange(connection, target, body, headers, deadline)
                except ConnectionClosed as exc:
                    if not exc.nothing_received:
                        raise
                    # The server closed this keep-alive connection while it was idle and
                    # we wrote before we saw it: retried once on a new connection, as
                    # browsers and aiohttp do. Safe even if the server did get the first
                    # request: a callback carries its invoice's sequence and signature,
                    # merchants dedupe by sequence, and any attempt may be repeated anyway
                    # (a lease that runs out delivers the same sequence again: "at least
                    # once", spec §9).
            connection = await self._connect(target, deadline)
            return await self._exchange(connection, target, body, headers, deadline)
        finally:
            self._slots.release()

    async def close(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for line in self._idle.values():
            for connection in line:
                connection.close()
        self._idle.clear()

    def _target(self, url: URL, server_hostname: str | None) -> _Target:
        found = self._targets.get((url, server_hostname))
        if found is not None:
            return found
        host = url.host or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            refused = f"refused: {host} was not checked before the request"
            raise DestinationRefused(refused) from None
        if url.scheme == "https":
            if not server_hostname:
                raise ValueError("an https request needs the name to verify the certificate for")
        elif url.scheme == "http":
            server_hostname = None
        else:
            raise ValueError(f"not an http(s) URL: {url.scheme}://")
        path = url.raw_path_qs or "/"
        if any(c <= " " or c == "\x7f" for c in path):
            raise ValueError("the request target holds a space or a control character")
        port = url.port or (443 if url.scheme == "https" else 80)
        target = _Target(
            key=(host, port, server_hostname),
            address=host,
            port=port,
            server_hostname=server_hostname,
            request_line=f"POST {path} HTTP/1.1\r\n",
        )
        if len(self._targets) >= TARGET_CACHE_SIZE:
            self._targets.clear()
        self._targets[(url, server_hostname)] = target
        return target

    def _pooled(self, target: _Target, now: float) -> _Connection | None:
        """The destination's most recently used idle connection that is still open."""
        line = self._idle.get(target.key)
        while line:
            connection = line.pop()
            transport = connection.transport
            stale = now - connection.idle_since > self.idle_seconds
            if connection.closed or transport is None or transport.is_closing() or stale:
                connection.close()
            else:
                return connection
        return None

    async def _connect(self, target: _Target, deadline: float) -> _Connection:
        """A new connection to the checked address (TLS verified for the URL's name)."""
        if self._opened >= self.limit:
            self._evict_oldest_idle()
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        connection = _Connection(self, target.key)
        self._opened += 1
        try:
            sock.setblocking(False)
            async with asyncio.timeout_at(deadline):
                # An address, never a name: nothing is resolved here.
                await loop.sock_connect(sock, (target.address, target.port))
                if target.server_hostname is None:
                    await loop.create_connection(lambda: connection, sock=sock)
                else:
                    await loop.create_connection(
                        lambda: connection,
                        sock=sock,
                        ssl=self._ssl,
                        server_hostname=target.server_hostname,
                        ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
                    )
        except BaseException as exc:
            connection._closed()
            if connection.transport is not None:
                connection.transport.abort()
            else:
                sock.close()
            if isinstance(exc, TimeoutError):
                raise TimeoutError("no connection in time") from None
            raise
        self.connects += 1
        return connection

    async def _exchange(
        self,
        connection: _Connection,
        target: _Target,
        body: bytes,
        headers: Mapping[str, str],
        deadline: float,
    ) -> int:
        """One request and its response on `connection`; pooled again if it may be reused."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[int] = loop.create_future()
        connection.waiter = waiter
        timer = loop.call_at(deadline, connection.timed_out)
        try:
            connection.send(target, body, headers)
            status = await waiter
        except BaseException:
            connection.close()  # a cancelled or failed request leaves nothing to reuse
            raise
        finally:
            timer.cancel()
            connection.waiter = None
        if connection.keep_alive and not connection.closed and not self._closing:
            connection.idle_since = loop.time()
            self._idle.setdefault(target.key, []).append(connection)
            if self._sweeper is None:
                self._sweeper = loop.call_later(self.idle_seconds, self._sweep)
        else:
            connection.close()
        return status

    def _sweep(self) -> None:
        """Close the connections idle longer than idle_seconds; again later while any are."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for key, line in list(self._idle.items()):
            keep: list[_Connection] = []
            for connection in line:
                if not connection.closed and now - connection.idle_since <= self.idle_seconds:
                    keep.append(connection)
                else:
                    connection.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.idle_seconds / 2, self._sweep
            )

    def _evict_oldest_idle(self) -> None:
        """Make room for a new connection: close the idle one unused the longest."""
        oldest: _Connection | None = None
        for line in self._idle.values():
            if line and (oldest is None or line[0].idle_since < oldest.idle_since):
                oldest = line[0]
        if oldest is not None:
            self._idle[oldest.key].remove(oldest)
            if not self._idle[oldest.key]:
                del self._idle[oldest.key]
            oldest.close()
