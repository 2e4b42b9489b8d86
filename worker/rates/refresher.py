"""The rates refresher: one worker at a time reads the market sources into Redis.

Every `COINVOICE_RATES_REFRESH_SECONDS` each worker tries to take (or renew)
the leader lease in Redis; the leader reads every configured source at once,
each within `COINVOICE_RATES_TIMEOUT_SECONDS`, combines each currency's
observations (`worker.domain.prices.combine`: median, outliers dropped and
logged) and writes the table, fenced by the lease. A source that is down,
slow, malformed or stale is skipped and counted; a currency no source priced
keeps its old entry, which ages until quotes refuse it (503).

`refresh()` is the core tests call directly; `run()` is the loop around it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.config import Settings
from worker.domain.currencies import FileRateProvider
from worker.domain.prices import BASE, Price, combine
from worker.logs import get_logger
from worker.rates.sources import SOURCES, Ask, Source, SourceError
from worker.store.rates import RatesLead

log = get_logger(__name__)

# The lead is a lease of this many refresh intervals: a dead leader is replaced
# within it, long before its prices reach the maximum age (120 s by default).
LEASE_INTERVALS = 3
# An answer larger than this is not a ticker (bytes).
MAX_ANSWER_BYTES = 1024 * 1024
USER_AGENT = "coinvoice-rates/1 (+https://github.com/coinvoice)"


@dataclass(frozen=True, slots=True)
class Refresh:
    """The outcome of one refresh by the leader."""

    prices: Mapping[str, Price]
    ok: Mapping[str, int]
    failed: Mapping[str, str]
    # False when the lead was lost before the write (nothing written).
    published: bool


class Refresher:
    """Reads the configured sources into the rate table while this worker leads."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        catalog: FileRateProvider,
        name: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.lead = RatesLead(redis, name)
        self.sources: list[Source] = [SOURCES[source] for source in settings.rates_sources]
        self.symbols = frozenset(c.market for c in catalog.currencies()) - {BASE}
        self.clock = clock
        interval = settings.rates_refresh_seconds
        lease = max(LEASE_INTERVALS * interval, interval + settings.rates_timeout_seconds + 1)
        self.lease_ms = int(lease * 1000)
        if lease > settings.rates_max_age_seconds:
            # A dead leader would then leave prices to age out before another takes over.
            log.warning(
                "rates_lease_longer_than_max_age",
                lease_seconds=lease,
                max_age_seconds=settings.rates_max_age_seconds,
                hint="lower COINVOICE_RATES_REFRESH_SECONDS",
            )
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        """Refresh every interval while leading; a Redis outage only skips rounds."""
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.tick()
                except (RedisError, OSError) as exc:
                    log.warning("rates_refresh_redis_error", error=repr(exc))
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.0, self.settings.rates_refresh_seconds - elapsed))
        finally:
            await self.close()

    async def tick(self) -> Refresh | None:
        """One round: refresh if this worker leads (None when another one does)."""
        if not await self.lead.take(self.lease_ms):
            return None
        return await self.refresh()

    async def refresh(self) -> Refresh:
        """Read every source, combine, write the table (fenced by the lease)."""
        now = self.clock()
        outcomes = await asyncio.gather(*(self._read(source, now) for source in self.sources))
        ok: dict[str, int] = {}
        failed: dict[str, str] = {}
        observed: dict[str, dict[str, Decimal]] = {}
        for source, outcome in zip(self.sources, outcomes, strict=True):
            if isinstance(outcome, str):
                failed[source.name] = outcome
                log.warning("rate_source_failed", source=source.name, error=outcome)
                continue
            ok[source.name] = int(now)
            for symbol, value in outcome.items():
                observed.setdefault(symbol, {})[source.name] = value
        prices = self._combine(observed, int(now))
        published = await self.lead.publish(prices)
        await self.lead.record_sources(ok, failed)
        log.info(
            "rates_refreshed" if published else "rates_lead_lost",
            symbols=sorted(prices),
            sources_ok=sorted(ok),
            sources_failed=sorted(failed),
        )
        return Refresh(prices, ok, failed, published)

    def _combine(self, observed: Mapping[str, Mapping[str, Decimal]], now: int) -> dict[str, Price]:
        spread = self.settings.rates_max_spread_percent
        prices: dict[str, Price] = {}
        for symbol, observations in sorted(observed.items()):
            combined = combine(observations, spread)
            for source, value in combined.dropped:
                log.warning(
                    "rate_outlier_dropped",
                    symbol=symbol,
                    source=source,
                    price=f"{value:f}",
                    median=f"{combined.median:f}",
                    max_spread_percent=f"{spread:f}",
                )
            if combined.value is None:
                log.warning(
                    "rate_sources_disagree",
                    symbol=symbol,
                    observations={name: f"{value:f}" for name, value in observations.items()},
                )
                continue
            prices[symbol] = Price(combined.value, now, combined.used)
        missing = self.symbols - observed.keys()
        if missing:
            log.warning("rate_unpriced", symbols=sorted(missing))
        return prices

    async def _read(self, source: Source, now: float) -> dict[str, Decimal] | str:
        """One source's prices, or why there are none (an error text)."""
        ask = Ask(
            get=self._get,
            base_url=self.settings.rates_url(source.name),
            symbols=self.symbols,
            now=now,
            max_age=self.settings.rates_max_age_seconds,
        )
        timeout = self.settings.rates_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                return await source.read(ask)
        except TimeoutError:
            return f"timed out after {timeout:g} s"
        except SourceError as exc:
            return str(exc)
        except aiohttp.ClientError as exc:
            return f"request failed: {type(exc).__name__}"
        except Exception as exc:
            # An answer no check foresaw (say, a price so extreme that its inverse
            # overflows) is that source's problem for this round; it must never end
            # the loop, or every price would age out.
            log.exception("rate_source_unreadable", source=source.name)
            return f"unreadable answer: {type(exc).__name__}"

    async def _get(self, url: str) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        async with self._session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise SourceError(f"HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise SourceError("answer too large")
            return bytes(body)

    async def close(self) -> None:
        """Close the HTTP session and hand the lead over (shutdown)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        try:
            await self.lead.resign()
        except (RedisError, OSError) as exc:
            log.warning("rates_resign_failed", error=repr(exc))
