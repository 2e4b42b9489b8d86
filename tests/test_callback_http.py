"""The callback HTTP client (worker/outbox/http.py) against real servers on loopback:
an aiohttp application, raw asyncio servers that misbehave, and TLS with a test CA."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trustme
import uvloop
from aiohttp import web
from yarl import URL

from worker.outbox.delivery import MAX_RESPONSE_BYTES
from worker.outbox.destinations import DestinationRefused
from worker.outbox.http import (
    MAX_HEAD_BYTES,
    CallbackClient,
    ConnectionClosed,
    ResponseError,
)

BODY = b'{"id":1,"status":"paid"}'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3\r\nyes\r\n0\r\n\r\n"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


def make_client(timeout: float = 2.0, **options: Any) -> CallbackClient:
    options.setdefault("limit", 8)
    options.setdefault("max_response_bytes", MAX_RESPONSE_BYTES)
    return CallbackClient(timeout=timeout, **options)


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head and body) as the client sent it; None at the end of the stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


class RawServer:
    """An asyncio server on 127.0.0.1 that runs `script` on each connection it accepts."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request)
        self.closed_by_client = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_client.set()
        finally:
            writer.close()

    async def request(self, reader: asyncio.StreamReader, number: int) -> bytes | None:
        request = await read_request(reader)
        if request is None:
            self.closed_by_client.set()
        else:
            self.requests.append((number, request))
        return request

    @property
    def url(self) -> URL:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}/cb")

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def answering(*answers: bytes, then_close: bool = False) -> Callable[[RawServer], Script]:
    """A script: each request on a connection gets the next answer in turn."""

    def script_for(server: RawServer) -> Script:
        async def script(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
        ) -> None:
            for answer in answers:
                if await server.request(reader, number) is None:
                    return
                writer.write(answer)
                await writer.drain()
            if not then_close:
                await server.request(reader, number)  # until the client closes

        return script

    return script_for


def never_answering(server: RawServer) -> Script:
    """A script: the start of an answer to the first request, then silence."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        await server.request(reader, number)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        await server.request(reader, number)  # until the client closes

    return script


async def raw_server(script_for: Callable[[RawServer], Script]) -> RawServer:
    server = RawServer(lambda r, w, n: asyncio.sleep(0))
    server.script = script_for(server)
    return server


async def post(client: CallbackClient, url: URL, server_hostname: str | None = None) -> int:
    headers = {"Host": f"shop.example:{url.port}", "Content-Type": "application/json"}
    return await client.post(url, BODY, headers, server_hostname)


# ---------------------------------------------------------------- an aiohttp server


@pytest.fixture
async def app_server() -> AsyncIterator[tuple[URL, list[tuple[int, dict[str, str], bytes]]]]:
    """An aiohttp application recording (connection id, headers, body) of each request."""
    seen: list[tuple[int, dict[str, str], bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((id(request.transport), dict(request.headers), body))
        if request.path == "/moved":
            raise web.HTTPFound("/cb")
        if request.path == "/slow":
            await asyncio.sleep(0.2)
        return web.Response(text="ok", status=int(request.query.get("status", "200")))

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield URL(f"http://127.0.0.1:{site.port}/cb"), seen
    finally:
        await runner.cleanup()


async def test_requests_reuse_one_keep_alive_connection(
    app_server: tuple[URL, list[tuple[int, dict[str, str], bytes]]],
) -> None:
    """Ten callbacks one after another go over one connection, headers and body intact."""
    url, seen = app_server
    client = make_client()
    try:
        for _ in range(10):
            assert await post(client, url) == 200
    finally:
        await client.close()
    assert len({connection for connection, _, _ in seen}) == 1
    assert client.connects == 1
    _, headers, body = seen[0]
    assert body == BODY
    assert headers["Host"] == f"shop.example:{url.port}"
    assert headers["Content-Length"] == str(len(BODY))
    assert headers["Content-Type"] == "application/json"


async def test_concurrent_requests_open_no_more_connections_than_the_limit(
    app_server: tuple[URL, list[tuple[int, dict[str, str], bytes]]],
) -> None:
    """Six slow answers at once with a limit of 3: three connections, all reused afterwards."""
    url, seen = app_server
    client = make_client(limit=3)
    slow = url.with_path("/slow")
    try:
        assert await asyncio.gather(*[post(client, slow) for _ in range(6)]) == [200] * 6
        assert await asyncio.gather(*[post(client, url) for _ in range(3)]) == [200] * 3
    finally:
        await client.close()
    assert len({connection for connection, _, _ in seen}) == 3
    assert client.connects == 3


async def test_a_redirect_is_a_status_not_followed(
    app_server: tuple[URL, list[tuple[int, dict[str, str], bytes]]],
) -> None:
    """A 302 is returned as it is; the Location is not requested."""
    url, seen = app_server
    client = make_client()
    try:
        assert await post(client, url.with_path("/moved")) == 302
        assert await post(client, url.with_query(status="503")) == 503
    finally:
        await client.close()
    assert len(seen) == 2


async def test_a_host_that_is_not_an_address_is_refused() -> None:
    """The client never resolves a name: a URL with one is refused before any connection."""
    client = make_client()
    with pytest.raises(DestinationRefused, match="was not checked"):
        await post(client, URL("http://localhost:9/cb"))
    assert client.connects == 0


# ---------------------------------------------------------------- misbehaving servers


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (OK, True),
        (CHUNKED, True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", True),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK, True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", False),
    ],
    ids=["content-length", "chunked", "204", "103-then-200", "connection-close", "http-1.0",
         "http-1.0-keep-alive"],
)  # fmt: skip
async def test_a_connection_is_reused_only_after_a_well_framed_http_1_1_response(
    answer: bytes, reused: bool
) -> None:
    """Two requests: one connection when the first answer allows keep-alive, else two."""
    expected = 204 if b" 204 " in answer else 200
    async with await raw_server(answering(answer, answer)) as server:
        client = make_client()
        try:
            assert await post(client, server.url) == expected
            assert await post(client, server.url) == expected
        finally:
            await client.close()
    assert server.connections == (1 if reused else 2)
    assert client.connects == server.connections


async def test_a_close_delimited_body_ends_with_the_close() -> None:
    """HTTP/1.0 without Content-Length: the body runs to the close; the status counts."""

    def script_for(server: RawServer) -> Script:
        async def script(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
        ) -> None:
            await server.request(reader, number)
            writer.write(b"HTTP/1.0 201 Created\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"the rest of the body")

        return script

    async with await raw_server(script_for) as server:
        client = make_client()
        try:
            assert await post(client, server.url) == 201
            assert await post(client, server.url) == 201
        finally:
            await client.close()
    assert server.connections == 2


async def test_interim_answers_are_skipped_for_the_final_status() -> None:
    """A 100 and a 103 arriving on their own before the 200: the status is 200, the
    connection is reused."""

    def script_for(server: RawServer) -> Script:
        async def script(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
        ) -> None:
            while await server.request(reader, number) is not None:
                for part in (b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\n",
                             b"Link: </a>\r\n\r\n", OK):  # fmt: skip
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.01)

        return script

    async with await raw_server(script_for) as server:
        client = make_client()
        try:
            assert await post(client, server.url) == 200
            assert await post(client, server.url) == 200
        finally:
            await client.close()
    assert server.connections == 1


async def test_a_second_response_after_ours_is_not_taken_for_it() -> None:
    """Two responses in one write: the first one's status counts, and a connection that
    spoke out of turn is not reused."""
    answer = b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n" + OK
    async with await raw_server(answering(answer, answer)) as server:
        client = make_client()
        try:
            assert await post(client, server.url) == 500
            assert await post(client, server.url) == 500
        finally:
            await client.close()
    assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a part", "closed mid-response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "closed mid-response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "closed mid-response"),
        (b"", "closed before the response"),
    ],
    ids=["content-length", "chunked", "head", "nothing"],
)
async def test_a_close_before_the_response_is_complete_fails_the_attempt(
    answer: bytes, error: str
) -> None:
    """The server closes mid-response (or without one, on a new connection): an error, no retry."""
    async with await raw_server(answering(answer, then_close=True)) as server:
        client = make_client()
        try:
            with pytest.raises(ConnectionClosed, match=error):
                await post(client, server.url)
        finally:
            await client.close()
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ],
    ids=["no-status-line", "bad-status", "two-lengths", "negative-length", "bad-chunk", "upgrade"],
)
async def test_a_malformed_response_fails_with_a_clear_error_and_closes(answer: bytes) -> None:
    """Garbage is a ResponseError ("malformed response: …"); the connection is closed."""
    async with await raw_server(answering(answer)) as server:
        client = make_client()
        try:
            with pytest.raises(ResponseError, match="malformed response"):
                await post(client, server.url)
            async with asyncio.timeout(2):
                await server.closed_by_client.wait()
        finally:
            await client.close()


@pytest.mark.parametrize("complete", [True, False], ids=["whole", "endless"])
async def test_an_enormous_head_is_refused(complete: bool) -> None:
    """A head over MAX_HEAD_BYTES fails the attempt and closes the connection, whether
    it ever ends or not."""
    huge = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    count = MAX_HEAD_BYTES // len(huge) + 2
    answer = b"HTTP/1.1 200 OK\r\n" + huge * count
    if complete:
        answer += b"Content-Length: 2\r\n\r\nok"
    else:
        answer += huge * 1000
    async with await raw_server(answering(answer)) as server:
        client = make_client()
        try:
            with pytest.raises(ResponseError, match=f"head over {MAX_HEAD_BYTES} bytes"):
                await post(client, server.url)
            async with asyncio.timeout(2):
                await server.closed_by_client.wait()
        finally:
            await client.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_cap_is_not_read_but_the_status_counts(chunked: bool) -> None:
    """An endless body: the status arrives, reading stops at the cap, the connection closes."""

    def script_for(server: RawServer) -> Script:
        async def script(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
        ) -> None:
            await server.request(reader, number)
            if chunked:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
                chunk = b"x" * 0x4000
            for _ in range(100_000):  # 1.6 GB if anybody read it all
                writer.write(chunk)
                await writer.drain()

        return script

    async with await raw_server(script_for) as server:
        client = make_client(timeout=5)
        try:
            async with asyncio.timeout(3):
                assert await post(client, server.url) == 200
            assert await post(client, server.url) == 200
        finally:
            await client.close()
    assert server.connections == 2


async def test_a_server_that_never_answers_times_out_and_is_disconnected() -> None:
    """No answer within the timeout: TimeoutError, and the connection is closed."""
    async with await raw_server(never_answering) as server:
        client = make_client(timeout=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with pytest.raises(TimeoutError, match="no complete response in time"):
                await post(client, server.url)
            assert 0.25 < loop.time() - started < 1.5
            async with asyncio.timeout(2):
                await server.closed_by_client.wait()
        finally:
            await client.close()


async def test_a_connect_that_never_completes_times_out() -> None:
    """The timeout covers the connect too (a listener whose backlog is full)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue: further connects hang in SYN_SENT
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        client = make_client(timeout=0.3)
        with pytest.raises(TimeoutError, match="no connection in time"):
            await post(client, URL(f"http://127.0.0.1:{port}/cb"))
        await client.close()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_keep_alive_connection_closed_while_idle_is_replaced() -> None:
    """The server closes the connection after its answer; the next request opens another."""

    def script_for(server: RawServer) -> Script:
        async def script(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
        ) -> None:
            await server.request(reader, number)
            writer.write(OK)
            await writer.drain()
            await asyncio.sleep(0.05)  # then closed (idle), without saying so in the answer

        return script

    async with await raw_server(script_for) as server:
        client = make_client()
        try:
            assert await post(client, server.url) == 200
            await asyncio.sleep(0.2)
            assert await post(client, server.url) == 200
        finally:
            await client.close()
    assert server.connections == 2
    assert [number for number, _ in server.requests] == [1, 2]


@pytest.mark.parametrize("fresh_one_answers", [True, False])
async def test_a_stale_connection_is_retried_once_on_a_new_one(fresh_one_answers: bool) -> None:
    """A reused connection closed without a byte of answer (the server dropped it as we
    wrote): one retry on a new connection; if that fails too, the attempt fails."""

    def script_for(server: RawServer) -> Script:
        async def script(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
        ) -> None:
            await server.request(reader, number)
            if number == 1 or (number == 2 and fresh_one_answers):
                writer.write(OK)
                await writer.drain()
            if number == 1:
                await server.request(reader, number)  # the second request: no answer

        return script

    async with await raw_server(script_for) as server:
        client = make_client()
        try:
            assert await post(client, server.url) == 200
            if fresh_one_answers:
                assert await post(client, server.url) == 200
            else:
                with pytest.raises(ConnectionClosed, match="before the response"):
                    await post(client, server.url)
        finally:
            await client.close()
    assert [number for number, _ in server.requests] == [1, 1, 2]


async def test_idle_connections_are_closed_after_a_while() -> None:
    """A connection left idle longer than idle_seconds is closed by the client."""
    async with await raw_server(answering(OK)) as server:
        client = make_client(idle_seconds=0.1)
        try:
            assert await post(client, server.url) == 200
            async with asyncio.timeout(2):
                await server.closed_by_client.wait()
        finally:
            await client.close()


async def test_close_closes_idle_connections() -> None:
    """`close` ends the pooled connections at once."""
    async with await raw_server(answering(OK)) as server:
        client = make_client()
        assert await post(client, server.url) == 200
        await client.close()
        async with asyncio.timeout(2):
            await server.closed_by_client.wait()


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_server(
    authority: trustme.CA,
) -> AsyncIterator[tuple[URL, list[tuple[int, str]]]]:
    """An aiohttp server on 127.0.0.1 whose certificate is for shop.invalid only."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("shop.invalid").configure_cert(context)
    seen: list[tuple[int, str]] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        seen.append((id(request.transport), request.headers["Host"]))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/cb", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield URL(f"https://127.0.0.1:{site.port}/cb"), seen
    finally:
        await runner.cleanup()


def trusting(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context


async def test_tls_to_the_pinned_address_verifies_the_url_name(
    authority: trustme.CA, tls_server: tuple[URL, list[tuple[int, str]]]
) -> None:
    """Connected to the checked address, TLS checks the certificate for the URL's name; the
    connection is kept alive."""
    url, seen = tls_server
    client = make_client(ssl_context=trusting(authority))
    try:
        assert await post(client, url, "shop.invalid") == 200
        assert await post(client, url, "shop.invalid") == 200
    finally:
        await client.close()
    assert client.connects == 1
    assert len({connection for connection, _ in seen}) == 1
    assert seen[0][1] == f"shop.example:{url.port}"


async def test_tls_under_another_name_is_refused(
    authority: trustme.CA, tls_server: tuple[URL, list[tuple[int, str]]]
) -> None:
    """The same server asked for other.invalid fails verification; the right name still
    works on its own connection (the pool is keyed by the TLS name too)."""
    url, seen = tls_server
    client = make_client(ssl_context=trusting(authority))
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await post(client, url, "other.invalid")
        assert await post(client, url, "shop.invalid") == 200
    finally:
        await client.close()
    assert len(seen) == 1


async def test_tls_is_verified_against_the_system_trust_by_default(
    tls_server: tuple[URL, list[tuple[int, str]]],
) -> None:
    """Without a trust of its own the client trusts the system's CAs, not the test CA."""
    url, seen = tls_server
    client = make_client()
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await post(client, url, "shop.invalid")
    finally:
        await client.close()
    assert seen == []


async def test_https_needs_a_name_to_verify() -> None:
    """An https request without server_hostname is a programming error, not a blind TLS."""
    client = make_client()
    with pytest.raises(ValueError, match="needs the name"):
        await post(client, URL("https://127.0.0.1:9/cb"), None)


# ---------------------------------------------------------------- uvloop


def test_the_client_runs_on_uvloop_too(authority: trustme.CA) -> None:
    """On uvloop (the receiver's loop, and the worker's once it moves): keep-alive over
    TLS, a connection the server closed replaced, a timeout."""

    async def scenario() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("shop.invalid").configure_cert(context)
        server = await raw_server(answering(OK, OK, then_close=True))
        server.server = await asyncio.start_server(server._accept, "127.0.0.1", 0, ssl=context)
        silent = await raw_server(never_answering)
        async with silent:
            client = make_client(timeout=0.3, ssl_context=trusting(authority))
            try:
                url = server.url.with_scheme("https")
                for _ in range(3):  # the server closes after two: the third on a new connection
                    assert await post(client, url, "shop.invalid") == 200
                with pytest.raises(TimeoutError):
                    await post(client, silent.url)
            finally:
                await client.close()
                await server.__aexit__()
        assert [number for number, _ in server.requests] == [1, 1, 2]

    uvloop.run(scenario())
