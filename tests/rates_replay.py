"""A local server on 127.0.0.1 that answers like the live rate sources, from tests/fixtures/rates.

Each source is served under its own prefix (`/kraken`, `/bitstamp`, `/coinbase`,
`/ecb`), so the settings point `COINVOICE_RATES_URL_<SOURCE>` at it. A test
sets a source's mode: `ok` (the sample answer, dated now), `stale` (as dated
in the file), `down` (HTTP 503), `malformed` (a cut-off JSON body), `slow`
(the answer after `slow_seconds`), or gives a body of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support import make_settings
from worker.config import RateSourceName, Settings

FIXTURES = Path(__file__).parent / "fixtures" / "rates"
SOURCES: tuple[RateSourceName, ...] = ("kraken", "bitstamp", "coinbase", "ecb")
ECB_DATE = "2026-11-18"


class Replay:
    def __init__(self) -> None:
        self.modes: dict[str, str] = {}
        self.bodies: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()
        self.queries: list[str] = []
        self.slow_seconds = 5.0
        self.server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/kraken/0/public/Ticker", self._kraken)
        app.router.add_get("/bitstamp/api/v2/ticker/{pair}/", self._bitstamp)
        app.router.add_get("/coinbase/v2/exchange-rates", self._coinbase)
        app.router.add_get("/ecb/stats/eurofxref/eurofxref-daily.xml", self._ecb)
        return app

    async def start(self) -> Replay:
        self.server = TestServer(self.app(), host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    def url(self, source: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(f"/{source}"))

    def settings(self, redis_url: str, **overrides: Any) -> Settings:
        """Test settings with every source live and pointed at this server."""
        values: dict[str, Any] = {
            "rates_sources": SOURCES,
            "rates_timeout_seconds": 1.0,
            **{f"rates_url_{source}": self.url(source) for source in SOURCES},
        }
        values.update(overrides)
        return make_settings(redis_url, **values)

    async def _answer(
        self, source: str, request: web.Request, body: bytes, content_type: str
    ) -> web.Response:
        self.hits[source] += 1
        self.queries.append(request.path_qs)
        mode = self.modes.get(source, "ok")
        if mode == "down":
            return web.Response(status=503, text="Service Unavailable")
        if mode == "malformed":
            return web.Response(body=body[: len(body) // 2], content_type=content_type)
        if mode == "slow":
            await asyncio.sleep(self.slow_seconds)
        return web.Response(body=self.bodies.get(source, body), content_type=content_type)

    def _dated_now(self, source: str) -> bool:
        return self.modes.get(source, "ok") != "stale"

    async def _kraken(self, request: web.Request) -> web.Response:
        body = (FIXTURES / "kraken_ticker.json").read_bytes()
        return await self._answer("kraken", request, body, "application/json")

    async def _bitstamp(self, request: web.Request) -> web.Response:
        path = FIXTURES / "bitstamp" / f"{request.match_info['pair']}.json"
        if not path.exists():
            return web.Response(status=404, text="Not found")
        ticker = json.loads(path.read_text())
        if self._dated_now("bitstamp"):
            ticker["timestamp"] = str(int(time.time()))
        return await self._answer(
            "bitstamp", request, json.dumps(ticker).encode(), "application/json"
        )

    async def _coinbase(self, request: web.Request) -> web.Response:
        body = (FIXTURES / "coinbase_exchange_rates.json").read_bytes()
        return await self._answer("coinbase", request, body, "application/json")

    async def _ecb(self, request: web.Request) -> web.Response:
        text = (FIXTURES / "ecb_eurofxref_daily.xml").read_text()
        if self._dated_now("ecb"):
            text = text.replace(ECB_DATE, datetime.now(UTC).date().isoformat())
        return await self._answer("ecb", request, text.encode(), "text/xml")
