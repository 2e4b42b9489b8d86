"""Live rates through HTTP (spec §11): quotes from the table, 503 when stale, the page, metrics.

The receiver runs with every source configured (it reads only the table in
Redis); a refresher in the test fills the table from the local replay server,
either now (fresh) or as if it last ran five minutes ago (stale).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from receiver import appkeys
from receiver.app import create_app
from receiver.pages import csrf
from tests.rates_replay import Replay
from tests.support import create_payload, make_settings, merchant_post, signed_headers
from worker.app import main as worker_main
from worker.config import Settings
from worker.domain.currencies import FileRateProvider, FixedPrices
from worker.domain.models import Merchant
from worker.domain.money import ceil8, div, mul
from worker.domain.prices import RatesUnavailable
from worker.rates.refresher import Refresher
from worker.store import keys
from worker.store.rates import RedisPrices, read_prices
from worker.store.redis_server import RedisServer

Client = TestClient[Any, Any]
UNAVAILABLE = {"error": "Exchange rates unavailable", "code": "rates_unavailable"}
# How long before now a "stale" refresh ran: more than the 120 s maximum age.
STALE_BY_SECONDS = 300


@pytest.fixture
async def replay() -> AsyncIterator[Replay]:
    server = await Replay().start()
    yield server
    await server.close()


@pytest.fixture
def live_settings(redis_server: RedisServer, replay: Replay) -> Settings:
    return replay.settings(redis_server.url)


@pytest.fixture
async def client(redis: aioredis.Redis, live_settings: Settings) -> AsyncIterator[Client]:
    """A receiver with live rates (overrides conftest's file-rates client)."""
    async with TestClient(TestServer(create_app(live_settings))) as test_client:
        prices = test_client.server.app[appkeys.SERVICE].prices
        assert isinstance(prices, RedisPrices)
        # Each request sees the table the test just wrote (the cache has its own test).
        prices.cache_seconds = 0
        yield test_client


async def refresh(redis: aioredis.Redis, settings: Settings, *, ago: float = 0) -> None:
    """Fill the table as the leading worker would have, `ago` seconds before now."""
    refresher = Refresher(
        redis, settings, FileRateProvider.load(), "test-worker", clock=lambda: time.time() - ago
    )
    try:
        result = await refresher.tick()
        assert result is not None and result.published
    finally:
        await refresher.close()


async def create(client: Client, merchant: Merchant, foreign_id: str, **fields: Any) -> Any:
    return await merchant_post(
        client, merchant, "/api/v2/invoices/create", create_payload(foreign_id, **fields)
    )


def token(invoice: dict[str, Any]) -> str:
    return str(invoice["url"]).rsplit("/", 1)[1]


async def confirm(client: Client, invoice: dict[str, Any], **body: Any) -> tuple[int, Any]:
    response = await client.post(
        f"/api/v2/public/invoices/{token(invoice)}/confirm",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    return response.status, await response.json()


async def public(client: Client, invoice: dict[str, Any]) -> Any:
    response = await client.get(f"/api/v2/public/invoices/{token(invoice)}")
    assert response.status == 200
    return (await response.json())["data"]


async def test_create_quotes_from_the_live_table(
    client: Client, redis: aioredis.Redis, live_settings: Settings, merchant: Merchant
) -> None:
    """A type 3 invoice's sender_amount is the invoice amount at the table's prices, rounded up."""
    await refresh(redis, live_settings)
    status, body = await create(client, merchant, "live-1", sender_currency="BTC")
    assert status == 200, body
    prices = await read_prices(redis)
    expected = ceil8(mul(Decimal("106.75"), div(prices["EUR"].value, prices["BTC"].value)))
    assert body["data"]["sender_amount"] == f"{expected:f}"
    # Not the rates file's price (EUR 1.08, BTC 64000): the live table was used.
    from_file = ceil8(mul(Decimal("106.75"), div(Decimal("1.08"), Decimal(64000))))
    assert expected != from_file


@pytest.mark.parametrize(
    "fields",
    [
        {"timer": True, "sender_currency": "BTC"},  # type 3
        {"timer": True},  # type 2
        {"timer": False},  # type 1
    ],
    ids=["type3", "type2", "type1"],
)
async def test_stale_rates_refuse_create_and_create_nothing(
    client: Client,
    redis: aioredis.Redis,
    live_settings: Settings,
    merchant: Merchant,
    fields: dict[str, Any],
) -> None:
    """Prices older than the max age: 503 rates_unavailable; no id, address or foreign id used."""
    await refresh(redis, live_settings, ago=STALE_BY_SECONDS)
    before = set(await redis.keys("*"))
    response = await client.post(
        "/api/v2/invoices/create",
        data=(raw := json.dumps(create_payload("stale-1", **fields)).encode()),
        headers=signed_headers(merchant.key, merchant.secret, raw),
    )
    assert response.status == 503
    assert await response.json() == UNAVAILABLE
    assert response.headers["Retry-After"] == "15"
    assert set(await redis.keys("*")) == before  # nothing written at all
    # Once the prices are fresh again the same foreign id creates the invoice.
    await refresh(redis, live_settings)
    status, body = await create(client, merchant, "stale-1", **fields)
    assert status == 200, body
    # The first id of its partition: the refused attempt drew none.
    partition = keys.foreign_id_partition(merchant.key, "stale-1")
    assert body["data"]["id"] == keys.partitions() + partition


async def test_without_any_table_create_is_refused(client: Client, merchant: Merchant) -> None:
    """Live rates configured but no worker has written prices yet: 503, not the file's prices."""
    status, body = await create(client, merchant, "none-1", sender_currency="ETH")
    assert (status, body) == (503, UNAVAILABLE)


async def test_stale_rates_refuse_a_type1_confirm_and_the_page_says_so(
    client: Client, redis: aioredis.Redis, live_settings: Settings, merchant: Merchant
) -> None:
    """Type 1 fixes its rate at confirmation: stale prices refuse it and nothing is assigned."""
    await refresh(redis, live_settings)
    status, body = await create(client, merchant, "t1", timer=False)
    assert status == 200, body
    invoice = body["data"]
    assert (await public(client, invoice))["prices_unavailable"] is False

    await redis.delete(keys.RATES)
    await refresh(redis, live_settings, ago=STALE_BY_SECONDS)
    status, answer = await confirm(client, invoice, sender_currency="LTC", email="b@example.com")
    assert (status, answer) == (503, UNAVAILABLE)
    view = await public(client, invoice)
    assert view["status"] == "created" and view["address"] is None
    assert view["prices_unavailable"] is True and view["offers"] == []
    assert not await redis.exists(keys.ADDRESS_IDS)

    page = await client.get(f"/invoice/{token(invoice)}")
    html = await page.text()
    assert page.status == 200
    assert "Prices are unavailable for now." in html
    assert 'id="confirm-form"' not in html
    # A form posted from this very page (its anti-forgery cookie in the jar) while stale.
    path = f"/invoice/{token(invoice)}"
    anti_forgery = client.session.cookie_jar.filter_cookies(client.make_url(path))[csrf.COOKIE]
    form = await client.post(
        path,
        data={"sender_currency": "LTC", "email": "b@example.com", csrf.FIELD: anti_forgery.value},
    )
    assert form.status == 503
    assert "Prices are unavailable for now." in await form.text()

    await refresh(redis, live_settings)
    view = await public(client, invoice)
    assert view["prices_unavailable"] is False and len(view["offers"]) == 5
    status, answer = await confirm(client, invoice, sender_currency="LTC", email="b@example.com")
    assert status == 200, answer
    assert answer["data"]["status"] == "pending"


async def test_a_type2_confirm_uses_its_fixed_quote_even_when_rates_are_stale(
    client: Client, redis: aioredis.Redis, live_settings: Settings, merchant: Merchant
) -> None:
    """Type 2 fixed every quote at creation: picking one later needs no live price."""
    await refresh(redis, live_settings)
    status, body = await create(client, merchant, "t2", timer=True)
    assert status == 200, body
    fixed = {o["currency"]: o["amount"] for o in (await public(client, body["data"]))["offers"]}
    await redis.delete(keys.RATES)
    await refresh(redis, live_settings, ago=STALE_BY_SECONDS)
    status, answer = await confirm(client, body["data"], sender_currency="ETH", email="c@x.org")
    assert status == 200, answer
    assert answer["data"]["sender_amount"] == fixed["ETH"]


async def test_currencies_rates_come_from_the_table_and_refuse_stale_prices(
    client: Client, redis: aioredis.Redis, live_settings: Settings, merchant: Merchant
) -> None:
    """currencies/rates shows live prices while fresh and answers 503 when they are not."""
    await refresh(redis, live_settings, ago=STALE_BY_SECONDS)
    status, body = await merchant_post(client, merchant, "/api/v2/currencies/rates", {})
    assert (status, body) == (503, UNAVAILABLE)
    await refresh(redis, live_settings)
    status, body = await merchant_post(client, merchant, "/api/v2/currencies/rates", {})
    assert status == 200
    # BTC against USD at the live median (64012.5), not the rates file's 64000.
    assert "64012.5" in json.dumps(body)


async def test_metrics_show_each_sources_age_and_errors(
    client: Client, redis: aioredis.Redis, live_settings: Settings, replay: Replay
) -> None:
    """/metrics: seconds since each source answered, its error count, and each price's age."""
    replay.modes["kraken"] = "down"
    await refresh(redis, live_settings)
    await refresh(redis, live_settings)
    text = await (await client.get("/metrics")).text()
    assert 'coinvoice_rates_source_errors_total{source="kraken"} 2.0' in text
    assert 'coinvoice_rates_source_errors_total{source="ecb"} 0.0' in text
    assert 'coinvoice_rates_source_age_seconds{source="kraken"} +Inf' in text
    age = re.search(r'coinvoice_rates_source_age_seconds\{source="bitstamp"\} ([0-9.e+-]+)', text)
    assert age is not None and 0 <= float(age.group(1)) < 10
    price_age = re.search(r'coinvoice_rates_price_age_seconds\{symbol="BTC"\} ([0-9.e+-]+)', text)
    assert price_age is not None and float(price_age.group(1)) < 10


async def test_the_rates_file_stays_the_default(
    redis: aioredis.Redis, redis_server: RedisServer, merchant: Merchant
) -> None:
    """Without COINVOICE_RATES_SOURCES prices come from the rates file and never go stale."""
    async with TestClient(TestServer(create_app(make_settings(redis_server.url)))) as plain:
        assert isinstance(plain.server.app[appkeys.SERVICE].prices, FixedPrices)
        status, body = await create(plain, merchant, "file-1", sender_currency="BTC")
        assert status == 200
        expected = ceil8(mul(Decimal("106.75"), div(Decimal("1.08"), Decimal(64000))))
        assert body["data"]["sender_amount"] == f"{expected:f}"
        assert "coinvoice_rates_source" not in await (await plain.get("/metrics")).text()
    assert await redis.exists(keys.RATES) == 0


async def test_receivers_cache_the_table_for_a_second_but_judge_age_now(
    redis: aioredis.Redis, live_settings: Settings
) -> None:
    """A receiver reads the table once a second at most, yet refuses a stale price at once."""
    written_at = int(time.time()) - 200
    refresher = Refresher(
        redis, live_settings, FileRateProvider.load(), "test-worker", clock=lambda: written_at
    )
    assert await refresher.tick() is not None
    await refresher.close()
    now = [written_at + 120.5]  # exactly the maximum age: still usable
    feed = RedisPrices(redis, FileRateProvider.load(), 120, clock=lambda: now[0])
    assert (await feed.current()).rate("EUR", "BTC") > 0
    await redis.delete(keys.RATES)
    now[0] += 0.4
    assert (await feed.current()).rate("EUR", "BTC") > 0  # the cached table
    now[0] += 0.4  # still within the cache's second, but 121 s old now
    with pytest.raises(RatesUnavailable):
        (await feed.current()).rate("EUR", "BTC")


async def test_the_worker_keeps_the_table_fresh(
    redis: aioredis.Redis, live_settings: Settings, tmp_path: Path
) -> None:
    """A worker started with live sources runs the refresher loop, which fills the table."""
    settings = live_settings.model_copy(update={"maildir": tmp_path / "maildir"})
    ctx: Any = {"settings": settings}
    await worker_main.startup(ctx)
    try:
        assert "rates" in [task.get_name() for task in ctx["tasks"]]
        for _ in range(100):
            if await redis.exists(keys.RATES):
                break
            await asyncio.sleep(0.05)
        assert set(await read_prices(redis)) == {"BTC", "ETH", "LTC", "BCH", "USDT", "EUR"}
        assert await redis.get(keys.RATES_LEADER) == ctx["name"].encode()
    finally:
        await worker_main.shutdown(ctx)
    assert not await redis.exists(keys.RATES_LEADER)  # resigned on shutdown


async def test_the_openapi_document_lists_the_503_where_prices_are_needed(client: Client) -> None:
    """create, confirm and currencies/rates document 503 rates_unavailable; status does not."""
    paths = (await (await client.get("/api/v2/openapi.json")).json())["paths"]
    for path in (
        "/api/v2/invoices/create",
        "/api/v2/public/invoices/{token}/confirm",
        "/api/v2/currencies/rates",
    ):
        assert "rates_unavailable" in paths[path]["post"]["responses"]["503"]["description"]
    status_503 = paths["/api/v2/invoices/status"]["post"]["responses"]["503"]["description"]
    assert "rates_unavailable" not in status_503  # it reaches Redis, but quotes nothing
