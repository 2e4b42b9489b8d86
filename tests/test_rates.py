"""Live exchange rates (spec §11): sources, combining, the leader and the table in Redis.

The sources answer from a local server (tests/rates_replay.py) with sample
answers in each source's documented format; Redis is the test session's own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pydantic
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from tests.rates_replay import FIXTURES, SOURCES, Replay
from worker.config import Settings
from worker.domain.currencies import FileRateProvider
from worker.domain.money import div
from worker.domain.prices import LiveRates, Price, RatesUnavailable, combine
from worker.rates.refresher import Refresher
from worker.rates.sources import Coinbase
from worker.store import keys
from worker.store.rates import read_prices, source_health
from worker.store.redis_server import RedisServer

D = Decimal


@pytest.fixture
async def replay() -> AsyncIterator[Replay]:
    """The four sources, answering from the sample files on 127.0.0.1."""
    server = await Replay().start()
    yield server
    await server.close()


@pytest.fixture
async def refreshers(
    redis: aioredis.Redis,
) -> AsyncIterator[Callable[..., Refresher]]:
    """Make refreshers on the test Redis; their HTTP sessions are closed afterwards."""
    made: list[Refresher] = []

    def make(settings: Settings, name: str = "worker-1", **kwargs: Any) -> Refresher:
        refresher = Refresher(redis, settings, FileRateProvider.load(), name, **kwargs)
        made.append(refresher)
        return refresher

    yield make
    for refresher in made:
        await refresher.close()


def values(prices: dict[str, Price]) -> dict[str, Decimal]:
    return {symbol: price.value for symbol, price in prices.items()}


# --------------------------------------------------------------------------- combining (pure)


@pytest.mark.parametrize(
    ("observations", "price", "dropped"),
    [
        ({"a": D(100)}, D(100), []),
        ({"a": D(100), "b": D(101)}, D("100.5"), []),
        ({"a": D(100), "b": D(101), "c": D(102)}, D(101), []),
        ({"a": D(100), "b": D(101), "c": D(120)}, D("100.5"), ["c"]),
        ({"a": D(80), "b": D(100), "c": D(101), "d": D("100.5")}, D("100.5"), ["a"]),
        # Two that disagree, or three that all differ: nobody can tell which is right.
        ({"a": D(100), "b": D(120)}, None, ["a", "b"]),
        ({"a": D(100), "b": D(110), "c": D(120)}, None, ["a", "c"]),
    ],
)
def test_combine_takes_the_median_of_the_sources_that_agree(
    observations: dict[str, Decimal], price: Decimal | None, dropped: list[str]
) -> None:
    """The price is the median of the agreeing majority; sources beyond the spread are dropped."""
    combined = combine(observations, D(2))
    assert combined.value == price
    assert [name for name, _ in combined.dropped] == dropped


def test_live_rates_never_quote_a_price_older_than_the_maximum_age() -> None:
    """A price of exactly max age is used; one second older raises RatesUnavailable."""
    catalog = FileRateProvider.load()
    now = 1_800_000_000
    table = {"BTC": Price(D(64000), now - 120, ("kraken",)), "EUR": Price(D("1.08"), now, ())}
    rates = LiveRates(catalog, table, now, max_age=120)
    assert rates.rate("EUR", "BTC") == div(D("1.08"), D(64000))
    assert rates.rate("USD", "USD") == 1  # the unit itself is never stale
    stale = LiveRates(catalog, table, now + 1, max_age=120)
    with pytest.raises(RatesUnavailable) as refused:
        stale.rate("EUR", "BTC")
    assert refused.value.currencies == ("BTC",)
    with pytest.raises(RatesUnavailable):
        LiveRates(catalog, {}, now, max_age=120).rate("EUR", "USDTT")


def test_sources_are_named_in_the_settings() -> None:
    """COINVOICE_RATES_SOURCES is a comma list of known sources; an unknown one is refused."""
    assert Settings(rates_sources="Kraken, ecb,kraken").rates_sources == ("kraken", "ecb")
    assert not Settings().live_rates
    with pytest.raises(pydantic.ValidationError):
        Settings(rates_sources="kraken,binance")


def test_the_sources_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """COINVOICE_RATES_URL_<SOURCE> overrides a source's base URL (the tests' replay)."""
    monkeypatch.setenv("COINVOICE_RATES_SOURCES", "kraken,coinbase")
    monkeypatch.setenv("COINVOICE_RATES_URL_KRAKEN", "http://127.0.0.1:9/kraken/")
    monkeypatch.setenv("COINVOICE_RATES_MAX_AGE_SECONDS", "60")
    settings = Settings()
    assert settings.rates_sources == ("kraken", "coinbase")
    assert settings.rates_url("kraken") == "http://127.0.0.1:9/kraken"
    assert settings.rates_url("coinbase") == "https://api.coinbase.com"
    assert settings.rates_max_age_seconds == 60


# --------------------------------------------------------------------------- sources


EXPECTED: dict[str, dict[str, Decimal]] = {
    "kraken": {
        "BTC": D("64012.50000"),
        "ETH": D("3101.20000"),
        "LTC": D("82.05000"),
        "BCH": D("380.40000"),
        "USDT": D("1.00020000"),
        "EUR": D("1.08210"),
    },
    "bitstamp": {
        "BTC": D("64020.00"),
        "ETH": D("3100.8"),
        "LTC": D("82.01"),
        "BCH": D("380.10"),
        "USDT": D("1.00010"),
        "EUR": D("1.08230"),
    },
    # Coinbase gives units per dollar: the price is the inverse.
    "coinbase": {
        symbol: div(D(1), D(per_dollar))
        for symbol, per_dollar in json.loads(
            (FIXTURES / "coinbase_exchange_rates.json").read_text()
        )["data"]["rates"].items()
        if symbol in {"BTC", "ETH", "LTC", "BCH", "USDT", "EUR"}
    },
    "ecb": {"EUR": D("1.0822")},
}


@pytest.mark.parametrize("source", SOURCES)
async def test_each_source_reads_its_documented_answer(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
    source: str,
) -> None:
    """Alone, each source's sample answer becomes exactly its prices in the table."""
    settings = replay.settings(redis_server.url, rates_sources=(source,))
    refresh = await refreshers(settings).tick()
    assert refresh is not None and refresh.published and not refresh.failed
    prices = await read_prices(redis)
    assert values(prices) == EXPECTED[source]
    assert EXPECTED["coinbase"]["BTC"] == D(64000)  # 1 / 0.000015625, exact
    assert all(price.sources == (source,) for price in prices.values())


async def test_refresh_combines_every_source_into_the_table(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
) -> None:
    """All four sources: each currency's price is the median of the sources that have it."""
    settings = replay.settings(redis_server.url)
    before = int(time.time())
    refresh = await refreshers(settings).tick()
    assert refresh is not None and sorted(refresh.ok) == sorted(SOURCES) and not refresh.failed
    prices = await read_prices(redis)
    assert prices["BTC"].value == D("64012.5")  # 64000 < 64012.5 < 64020
    assert prices["BTC"].sources == ("bitstamp", "coinbase", "kraken")
    # EUR from all four: the mean of the middle two, 1.0822 (ECB) and 1/0.924 (Coinbase).
    assert prices["EUR"].value == div(D("1.0822") + div(D(1), D("0.924")), D(2))
    assert prices["EUR"].sources == ("bitstamp", "coinbase", "ecb", "kraken")
    assert set(prices) == {"BTC", "ETH", "LTC", "BCH", "USDT", "EUR"}
    assert all(before <= price.as_of <= time.time() for price in prices.values())
    assert "/kraken/0/public/Ticker?pair=XBTUSD,ETHUSD,LTCUSD,BCHUSD,USDTUSD,EURUSD" in (
        replay.queries
    )
    health = {h.name: h for h in await source_health(redis, SOURCES)}
    assert all(h.ok_at is not None and h.errors == 0 for h in health.values())


async def test_a_source_that_is_down_is_skipped_and_counted(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
) -> None:
    """Kraken answers 503: the others still price everything; Kraken's errors count up."""
    replay.modes["kraken"] = "down"
    refresher = refreshers(replay.settings(redis_server.url))
    with capture_logs() as logs:
        refresh = await refresher.tick()
        await refresher.tick()
    assert refresh is not None and refresh.failed == {"kraken": "HTTP 503"}
    assert (await read_prices(redis))["BTC"].value == D(64010)  # median of 64000 and 64020
    health = {h.name: h for h in await source_health(redis, SOURCES)}
    assert health["kraken"].errors == 2 and health["kraken"].ok_at is None
    assert health["kraken"].last_error == "HTTP 503"
    assert health["bitstamp"].errors == 0
    assert [e["source"] for e in logs if e["event"] == "rate_source_failed"] == ["kraken"] * 2


@pytest.mark.parametrize(
    ("source", "error"),
    [("kraken", "malformed JSON"), ("coinbase", "malformed JSON"), ("ecb", "malformed XML")],
)
async def test_a_malformed_answer_is_a_source_error(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
    source: str,
    error: str,
) -> None:
    """A cut-off body is that source's error for the round; the rest are used."""
    replay.modes[source] = "malformed"
    refresh = await refreshers(replay.settings(redis_server.url)).tick()
    assert refresh is not None and refresh.failed == {source: error}
    assert set(await read_prices(redis)) == {"BTC", "ETH", "LTC", "BCH", "USDT", "EUR"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": ["EGeneral:Too many requests"]}',
        b'{"error": [], "result": {"XXBTZUSD": {"c": ["-5", "1"]}}}',
        b'{"error": [], "result": {"XXBTZUSD": {"c": ["NaN", "1"]}}}',
        b'{"error": [], "result": {"XXBTZUSD": {"c": [64000.5, "1"]}}}',
        b'{"error": [], "result": []}',
        b"[1, 2]",
        b'{"error": [], "result": {"XXBTZUSD": {"c": ["1e999999", "1"]}}}',
    ],
)
async def test_an_unusable_kraken_answer_prices_nothing(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
    body: bytes,
) -> None:
    """Errors, absurd or non-finite prices, wrong shapes: refused (a JSON number is fine)."""
    replay.bodies["kraken"] = body
    settings = replay.settings(redis_server.url, rates_sources=("kraken",))
    refresh = await refreshers(settings).tick()
    assert refresh is not None
    if b"64000.5" in body:
        # A JSON number is read as the exact decimal it spells, never through float.
        assert refresh.ok and (await read_prices(redis))["BTC"].value == D("64000.5")
    else:
        assert "kraken" in refresh.failed
        assert await read_prices(redis) == {}


async def test_a_bug_in_one_sources_parser_fails_only_that_source(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error no check foresaw fails Coinbase for the round; the others still price BTC."""

    async def broken(self: object, ask: object) -> dict[str, Decimal]:
        raise ZeroDivisionError

    monkeypatch.setattr(Coinbase, "read", broken)
    refresh = await refreshers(replay.settings(redis_server.url)).tick()
    assert refresh is not None
    assert refresh.failed == {"coinbase": "unreadable answer: ZeroDivisionError"}
    assert (await read_prices(redis))["BTC"].sources == ("bitstamp", "kraken")


async def test_a_diverging_source_is_dropped_and_logged(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
) -> None:
    """Kraken says 70 000 for BTC while the others say ~64 000: dropped, logged, not used."""
    answer = json.loads((FIXTURES / "kraken_ticker.json").read_text())
    answer["result"]["XXBTZUSD"]["c"] = ["70000.00000", "0.1"]
    replay.bodies["kraken"] = json.dumps(answer).encode()
    refresher = refreshers(replay.settings(redis_server.url))
    with capture_logs() as logs:
        await refresher.tick()
    btc = (await read_prices(redis))["BTC"]
    assert btc.value == D(64010) and btc.sources == ("bitstamp", "coinbase")
    (dropped,) = [e for e in logs if e["event"] == "rate_outlier_dropped"]
    assert dropped["symbol"] == "BTC" and dropped["source"] == "kraken"
    assert dropped["price"] == "70000.00000" and dropped["median"] == "64020.00"
    assert (await read_prices(redis))["ETH"].sources == ("bitstamp", "coinbase", "kraken")


async def test_two_sources_that_disagree_give_no_price(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
) -> None:
    """With only two sources and no agreement there is no telling which is right: no price."""
    answer = json.loads((FIXTURES / "kraken_ticker.json").read_text())
    answer["result"]["XXBTZUSD"]["c"] = ["70000.00000", "0.1"]
    replay.bodies["kraken"] = json.dumps(answer).encode()
    settings = replay.settings(redis_server.url, rates_sources=("kraken", "coinbase"))
    with capture_logs() as logs:
        await refreshers(settings).tick()
    prices = await read_prices(redis)
    assert "BTC" not in prices and "ETH" in prices
    assert [e["symbol"] for e in logs if e["event"] == "rate_sources_disagree"] == ["BTC"]


async def test_stale_answers_are_refused(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
) -> None:
    """A Bitstamp ticker older than the max age, ECB rates days old: those sources are skipped."""
    replay.modes["bitstamp"] = replay.modes["ecb"] = "stale"
    refresh = await refreshers(replay.settings(redis_server.url)).tick()
    assert refresh is not None
    assert refresh.failed["bitstamp"].startswith("btcusd: stale ticker")
    assert refresh.failed["ecb"] == "stale reference rates of 2026-11-18"
    eur = (await read_prices(redis))["EUR"]
    assert eur.sources == ("coinbase", "kraken")


async def test_a_slow_source_times_out_and_the_others_are_used(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
) -> None:
    """Coinbase takes 5 s, the timeout is 0.5 s: the round ends in time without it."""
    replay.modes["coinbase"] = "slow"
    settings = replay.settings(redis_server.url, rates_timeout_seconds=0.5)
    started = time.monotonic()
    refresh = await refreshers(settings).tick()
    assert time.monotonic() - started < 3
    assert refresh is not None and refresh.failed == {"coinbase": "timed out after 0.5 s"}
    assert (await read_prices(redis))["BTC"].sources == ("bitstamp", "kraken")


# --------------------------------------------------------------------------- the leader


async def test_only_the_leader_reads_the_sources(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
) -> None:
    """Two workers tick at once: one reads the markets, the other waits; it takes over on exit."""
    settings = replay.settings(redis_server.url)
    first, second = refreshers(settings, "worker-1"), refreshers(settings, "worker-2")
    results = await asyncio.gather(first.tick(), second.tick())
    assert sum(result is not None for result in results) == 1
    assert replay.hits == {"kraken": 1, "bitstamp": 6, "coinbase": 1, "ecb": 1}
    leader, other = (first, second) if results[0] is not None else (second, first)
    assert await leader.tick() is not None and await other.tick() is None
    assert (await redis.pttl(keys.RATES_LEADER)) > 0
    await leader.close()  # resigns
    assert await other.tick() is not None


async def test_a_former_leader_cannot_overwrite_the_table(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    replay: Replay,
    refreshers: Callable[..., Refresher],
) -> None:
    """A leader whose lease ran out (a stalled process) cannot overwrite its successor's table."""
    settings = replay.settings(redis_server.url)
    stalled = refreshers(settings, "worker-1", clock=lambda: time.time() - 1000)
    assert await stalled.tick() is not None
    await redis.delete(keys.RATES_LEADER)  # its lease ran out
    successor = refreshers(settings, "worker-2")
    assert await successor.tick() is not None
    written = await read_prices(redis)
    late = await stalled.refresh()
    assert not late.published
    assert await read_prices(redis) == written
    assert min(price.as_of for price in written.values()) >= time.time() - 5
