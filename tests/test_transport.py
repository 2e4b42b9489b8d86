"""Slow and greedy clients against a real receiver on 127.0.0.1 (issue 15 item 4): head and
body read timeouts, the per-client connection cap, client aborts counted as 499."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import cast

import pytest
from structlog.testing import capture_logs

from receiver.app import serve
from receiver.connections import ConnectionGuard
from tests.support import make_settings
from worker.store.redis_server import RedisServer, free_port

HEAD_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
CAP = 4
TIMEOUT_BODY = {"error": "Request timeout", "code": "request_timeout"}
PING = b"GET /api/v2/ping HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture
async def port(redis_server: RedisServer) -> AsyncIterator[int]:
    """A receiver served the production way (`receiver.app.serve`) with short timeouts."""
    chosen = free_port()
    settings = make_settings(
        redis_server.url,
        host="127.0.0.1",
        port=chosen,
        header_timeout_seconds=HEAD_TIMEOUT,
        body_timeout_seconds=BODY_TIMEOUT,
        max_connections_per_client=CAP,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", chosen)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
    yield chosen
    stop.set()
    await task


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, headers (lower-case names), body."""
    status_line = await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def metrics_text(port: int) -> str:
    """GET /metrics on a fresh connection."""
    reader, writer = await connect(port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    _, _, body = await answer(reader)
    writer.close()
    return body.decode()


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float = 0.1) -> None:
    """Send one byte at a time until the server closes the connection."""
    for byte in data:
        if writer.is_closing():
            return
        writer.write(bytes([byte]))
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every)


async def test_a_trickled_request_head_is_cut_off_with_408(port: int) -> None:
    """A head sent one byte per 0.1 s is answered 408 and closed after the head timeout."""
    reader, writer = await connect(port)
    started = time.monotonic()
    sender = asyncio.create_task(
        trickle(writer, b"GET /api/v2/ping HTTP/1.1\r\nX-Slow: " + b"a" * 100)
    )
    status, headers, body = await asyncio.wait_for(answer(reader), 5)
    assert (status, json.loads(body)) == (408, TIMEOUT_BODY)
    assert headers["connection"] == "close"
    assert await reader.read() == b""  # closed
    assert time.monotonic() - started < HEAD_TIMEOUT + 1.0
    sender.cancel()
    writer.close()
    closed = 'coinvoice_connections_closed_total{reason="head_timeout"} 1.0'
    assert closed in await metrics_text(port)


async def test_a_silent_connection_is_closed_after_the_head_timeout(port: int) -> None:
    """A connection that sends nothing at all does not stay open."""
    reader, writer = await connect(port)
    status, _, _ = await asyncio.wait_for(answer(reader), HEAD_TIMEOUT + 2)
    assert status == 408
    writer.close()


async def test_a_trickled_body_is_cut_off_with_408(port: int) -> None:
    """A complete head, then a body one byte per 0.1 s: 408 after the body timeout, closed."""
    reader, writer = await connect(port)
    writer.write(
        b"POST /api/v2/processing/callbacks HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    started = time.monotonic()
    sender = asyncio.create_task(trickle(writer, b"{" + b" " * 99))
    status, headers, body = await asyncio.wait_for(answer(reader), 5)
    assert (status, json.loads(body)) == (408, TIMEOUT_BODY)
    assert headers["connection"] == "close"
    assert time.monotonic() - started < BODY_TIMEOUT + 1.0
    sender.cancel()
    writer.close()


async def test_keep_alive_connections_survive_idle_time_and_later_heads_are_timed(
    port: int,
) -> None:
    """Idle between requests is not a slow head; a later request's head is timed from its
    first byte."""
    reader, writer = await connect(port)
    writer.write(PING)
    assert (await answer(reader))[0] == 200
    await asyncio.sleep(HEAD_TIMEOUT * 2)
    writer.write(PING)
    assert (await answer(reader))[0] == 200
    sender = asyncio.create_task(trickle(writer, PING[:-2] + b"X-Slow: " + b"a" * 100))
    assert (await asyncio.wait_for(answer(reader), 5))[0] == 408
    sender.cancel()
    writer.close()


async def test_connections_over_the_per_client_cap_are_refused_with_429(port: int) -> None:
    """CAP connections from one address are served; one more gets 429 and is closed; a
    freed slot is usable again."""
    open_ = [await connect(port) for _ in range(CAP)]
    for reader, writer in open_:
        writer.write(PING)
        assert (await answer(reader))[0] == 200
    reader, writer = await connect(port)
    status, headers, body = await asyncio.wait_for(answer(reader), 5)
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(body)["code"] == "too_many_connections"
    assert await reader.read() == b""
    writer.close()
    _, first_writer = open_.pop()
    first_writer.close()
    await first_writer.wait_closed()
    await asyncio.sleep(0.1)  # the server sees the close
    reader, writer = await connect(port)
    writer.write(PING)
    assert (await asyncio.wait_for(answer(reader), 5))[0] == 200
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    _, _, metrics = await answer(reader)
    assert 'coinvoice_connections_closed_total{reason="too_many_connections"} 1.0' in (
        metrics.decode()
    )
    for _, w in [*open_, (reader, writer)]:
        w.close()


async def test_a_client_that_disconnects_mid_body_is_a_499_logged_at_info(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Gone mid-body: an info-level `client_aborted`, 499 in metrics and the access log,
    no error logged."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    with capture_logs() as logs:
        _, writer = await connect(port)
        writer.write(
            b"POST /api/v2/processing/callbacks HTTP/1.1\r\nHost: t\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"id": 1'
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(5):
            while not [e for e in logs if e["event"] == "client_aborted"]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    (aborted,) = [e for e in logs if e["event"] == "client_aborted"]
    assert aborted["log_level"] == "info"
    assert aborted["route"] == "/api/v2/processing/callbacks"
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    metrics = await metrics_text(port)
    route = 'route="/api/v2/processing/callbacks"'
    assert f'coinvoice_http_requests_total{{{route},status="499"}} 1.0' in metrics
    assert f'{route},status="500"' not in metrics
    statuses = [getattr(r, "status", None) for r in caplog.records if r.name == "aiohttp.access"]
    assert 499 in statuses and 500 not in statuses


class _FakeTransport:
    """Just enough of a transport for the guard: what it was sent, and whether it closed."""

    def __init__(self) -> None:
        self.sent = b""
        self.closed = False

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True


async def test_a_later_head_is_timed_from_its_own_first_byte_not_an_earlier_heads() -> None:
    """The deadline check armed for one head (which arrived in time) finds the next head,
    begun later, not yet due: it waits for that head's own deadline, then closes."""
    closed: list[str] = []
    guard = ConnectionGuard(HEAD_TIMEOUT, max_per_client=0, closed=closed.append)
    transport = _FakeTransport()
    assert guard.admit(cast(asyncio.Transport, transport))
    guard.request_started(cast(asyncio.Transport, transport))  # the first head, at once
    guard.request_finished(cast(asyncio.Transport, transport))
    await asyncio.sleep(HEAD_TIMEOUT * 0.6)
    guard.bytes_arrived(cast(asyncio.Transport, transport))  # a second head begins...
    await asyncio.sleep(HEAD_TIMEOUT * 0.6)  # ...the first head's deadline passes
    assert not transport.closed, "timed from the first head's start"
    await asyncio.sleep(HEAD_TIMEOUT * 0.6)  # the second head's own deadline passes
    assert transport.closed and closed == ["head_timeout"]
    assert transport.sent.startswith(b"HTTP/1.1 408 ")
    guard.release(cast(asyncio.Transport, transport))


async def test_heads_that_arrive_in_time_are_never_cut() -> None:
    guard = ConnectionGuard(HEAD_TIMEOUT, max_per_client=0)
    transport = _FakeTransport()
    assert guard.admit(cast(asyncio.Transport, transport))
    for _ in range(8):  # requests across several deadlines, each head arriving at once
        guard.bytes_arrived(cast(asyncio.Transport, transport))
        guard.request_started(cast(asyncio.Transport, transport))
        await asyncio.sleep(HEAD_TIMEOUT / 3)  # the handler runs
        guard.request_finished(cast(asyncio.Transport, transport))
    assert not transport.closed
    guard.release(cast(asyncio.Transport, transport))
