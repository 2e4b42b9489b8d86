"""A real HTTP merchant endpoint for the delivery tests: records every callback it gets.

Its behaviour is scripted per path: a list of status codes to answer in turn,
a delay (a hanging merchant), a redirect, or an endless body.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Behaviour:
    statuses: list[int] = field(default_factory=list)  # answered in turn, then 200
    delay: float = 0.0  # seconds before answering
    redirect_to: str | None = None
    endless_body: bool = False


class Sink:
    """A merchant callback endpoint on 127.0.0.1."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.behaviour: dict[str, Behaviour] = {}
        self.arrived = asyncio.Condition()
        self.server: TestServer | None = None

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with self.arrived:
            self.received.append(
                Received(request.path, dict(request.headers), body, time.monotonic())
            )
            self.arrived.notify_all()
        rule = self.behaviour.get(request.path, Behaviour())
        if rule.delay:
            await asyncio.sleep(rule.delay)
        if rule.redirect_to:
            raise web.HTTPFound(rule.redirect_to)
        status = rule.statuses.pop(0) if rule.statuses else 200
        if rule.endless_body:
            response = web.StreamResponse(status=status)
            await response.prepare(request)
            chunk = b"x" * 65536
            for _ in range(10_000):  # 640 MiB if anybody read it all
                await response.write(chunk)
            return response
        return web.Response(status=status, text="ok")

    async def wait_for(
        self, count: int, path: str | None = None, seconds: float = 10.0
    ) -> list[Received]:
        """Until `count` callbacks (to `path`) arrived; return them."""

        def matching() -> list[Received]:
            return [r for r in self.received if path is None or r.path == path]

        async with asyncio.timeout(seconds), self.arrived:
            await self.arrived.wait_for(lambda: len(matching()) >= count)
        return matching()


async def running_sink() -> AsyncIterator[Sink]:
    sink = Sink()
    app = web.Application()
    app.router.add_post("/{tail:.*}", sink.handle)
    sink.server = TestServer(app, host="127.0.0.1")
    await sink.server.start_server()
    try:
        yield sink
    finally:
        await sink.server.close()
