"""The live rate table in Redis: written by the leading worker, read by every receiver.

`cv:{rates}` holds one field per market symbol, `"{price} {as of} {sources}"`
(e.g. `"64012.5 1795703443 bitstamp,kraken"`); `cv:{rates}:leader` is the lease
of the one worker that refreshes it; `cv:{rates}:sources` keeps each source's
last good answer and error count for `/metrics`. Receivers read the table
through `RedisPrices`, never the markets themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from redis.asyncio import Redis

from worker.domain.currencies import FileRateProvider, RateProvider
from worker.domain.prices import LiveRates, Price
from worker.logs import get_logger
from worker.store import keys
from worker.store.connection import awaited
from worker.store.scripts import source

log = get_logger(__name__)

# A receiver reuses the table it read for this long (seconds): one HGETALL per
# second per process however busy, while an age check still uses the current time.
CACHE_SECONDS = 1.0
# Longest error text kept per source for operators.
ERROR_TEXT_LIMIT = 200


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """One market source as the leading worker last saw it."""

    name: str
    ok_at: int | None
    errors: int
    last_error: str | None


def encode_price(price: Price) -> str:
    return f"{price.value:f} {price.as_of} {','.join(price.sources)}"


def decode_price(raw: str) -> Price | None:
    """A table entry, or None for one that cannot be read (it is then never quoted)."""
    value, _, rest = raw.partition(" ")
    as_of, _, sources = rest.partition(" ")
    try:
        price = Decimal(value)
        when = int(as_of)
    except (InvalidOperation, ValueError):
        return None
    if not price.is_finite() or price <= 0:
        return None
    return Price(price, when, tuple(filter(None, sources.split(","))))


class RatesLead:
    """The leader lease and the fenced write of the rate table, for one worker."""

    def __init__(self, redis: Redis, name: str) -> None:
        self.redis = redis
        self.name = name
        self._lead = redis.register_script(source("rates_lead"))
        self._resign = redis.register_script(source("rates_resign"))
        self._publish = redis.register_script(source("rates_publish"))

    async def take(self, lease_ms: int) -> bool:
        """Take or renew the lead; True while this worker leads."""
        return bool(await self._lead(keys=[keys.RATES_LEADER], args=[self.name, lease_ms]))

    async def resign(self) -> None:
        """Give the lead up (at shutdown), so another worker needn't wait for the lease."""
        await self._resign(keys=[keys.RATES_LEADER], args=[self.name])

    async def publish(self, prices: Mapping[str, Price]) -> bool:
        """Write prices by market symbol; False (nothing written) when no longer leading."""
        args: list[str] = [self.name]
        for symbol, price in sorted(prices.items()):
            args += [symbol, encode_price(price)]
        return bool(await self._publish(keys=[keys.RATES_LEADER, keys.RATES], args=args))

    async def record_sources(self, ok: Mapping[str, int], failed: Mapping[str, str]) -> None:
        """Each source's outcome of one refresh: when it last answered well, errors so far."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, at in ok.items():
                pipe.hset(keys.RATES_SOURCES, f"{name}:ok_at", str(at))
            for name, error in failed.items():
                pipe.hincrby(keys.RATES_SOURCES, f"{name}:errors", 1)
                pipe.hset(keys.RATES_SOURCES, f"{name}:error", error[:ERROR_TEXT_LIMIT])
            await pipe.execute()


async def read_prices(redis: Redis) -> dict[str, Price]:
    """The whole rate table by market symbol (unreadable entries left out, and logged)."""
    raw = await awaited(redis.hgetall(keys.RATES))
    prices: dict[str, Price] = {}
    for field, value in raw.items():
        symbol = field.decode()
        price = decode_price(value.decode())
        if price is None:
            log.error("rate_entry_unreadable", symbol=symbol)
            continue
        prices[symbol] = price
    return prices


async def source_health(redis: Redis, names: Iterable[str]) -> list[SourceHealth]:
    """What the leading worker recorded for each named source (`/metrics`)."""
    raw = {
        k.decode(): v.decode()
        for k, v in (await awaited(redis.hgetall(keys.RATES_SOURCES))).items()
    }
    out = []
    for name in names:
        ok_at = raw.get(f"{name}:ok_at")
        out.append(
            SourceHealth(
                name=name,
                ok_at=int(ok_at) if ok_at else None,
                errors=int(raw.get(f"{name}:errors", 0)),
                last_error=raw.get(f"{name}:error"),
            )
        )
    return out


class RedisPrices:
    """The `PriceFeed` of receivers and workers when rates are live: the table in Redis.

    Each `current()` gives a `LiveRates` judged at the current time, so a
    price that turned stale while cached is refused all the same.
    """

    def __init__(
        self,
        redis: Redis,
        catalog: FileRateProvider,
        max_age_seconds: int,
        clock: Callable[[], float] = time.time,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        self.redis = redis
        self.catalog = catalog
        self.max_age_seconds = max_age_seconds
        self.clock = clock
        self.cache_seconds = cache_seconds
        self._cached: dict[str, Price] = {}
        self._read_at: float | None = None

    async def current(self) -> RateProvider:
        now = self.clock()
        if self._read_at is None or not 0 <= now - self._read_at < self.cache_seconds:
            self._cached = await read_prices(self.redis)
            self._read_at = now
        return LiveRates(self.catalog, self._cached, int(now), self.max_age_seconds)
