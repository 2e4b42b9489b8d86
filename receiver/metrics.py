"""Prometheus metrics of a receiver (`GET /metrics`, names prefixed `coinvoice_`).

Request counters and latencies come from the receiver's middleware
(receiver/middleware.py); queue depths (updates
waiting for a worker, callbacks due, timers due) are read from Redis at
scrape time, so every receiver reports the system's backlog. With live rates,
so are each market source's age and error count and each price's age (the
leading worker records them; see worker/rates/). Without Redis the scrape
still answers with the process's own metrics: the backlog and rates are left
out and `coinvoice_redis_up` is 0.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from receiver import appkeys
from worker.services import operations

# Request latency buckets in seconds: the p99 goals live between 1 ms and 100 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A scrape waits this long for the backlog (seconds), well inside a scraper's timeout,
# instead of riding out a Redis outage with the client's retries.
BACKLOG_TIMEOUT_SECONDS = 1.0


class RatesCollector(Collector):
    """The live rates' health as of the last scrape (values read from Redis by `serve`)."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, float, int]] = []  # (source, age s, errors)
        self.prices: list[tuple[str, float]] = []  # (market symbol, age s)

    def collect(self) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "coinvoice_rates_source_age_seconds",
            "Seconds since the rate source last answered usably (+Inf: never)",
            labels=["source"],
        )
        errors = CounterMetricFamily(
            "coinvoice_rates_source_errors",
            "Rate source answers that could not be used (down, slow, malformed, stale)",
            labels=["source"],
        )
        for source, seconds, count in self.sources:
            age.add_metric([source], seconds)
            errors.add_metric([source], count)
        price_age = GaugeMetricFamily(
            "coinvoice_rates_price_age_seconds",
            "Age of each live price; quotes refuse one older than COINVOICE_RATES_MAX_AGE_SECONDS",
            labels=["symbol"],
        )
        for symbol, seconds in self.prices:
            price_age.add_metric([symbol], seconds)
        # Nothing at all with the rates file: there is no source to report on.
        yield from (family for family in (age, errors, price_age) if family.samples)


class Metrics:
    def __init__(self) -> None:
        # The labelled children, so a request does not look them up under a lock.
        self._counted: dict[tuple[str, str], Counter] = {}
        self._timed: dict[str, Histogram] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "coinvoice_http_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "coinvoice_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backlog = Gauge(
            "coinvoice_backlog",
            "Work waiting in Redis: updates, ledger entries, callbacks, timers and mails due",
            ["queue"],
            registry=self.registry,
        )
        self.rates = RatesCollector()
        self.registry.register(self.rates)
        self.connections_closed = Counter(
            "coinvoice_connections_closed_total",
            "Connections the receiver closed: too_many_connections (over the per-client cap), "
            "head_timeout (no complete request head in time)",
            ["reason"],
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "coinvoice_redis_up",
            "1 when the last scrape read the backlog from Redis, 0 when Redis was unreachable",
            registry=self.registry,
        )

    def connection_closed(self, reason: str) -> None:
        """Count one connection the guard closed (receiver.connections)."""
        self.connections_closed.labels(reason).inc()

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one request and its latency."""
        key = (route, str(status))
        counter = self._counted.get(key)
        if counter is None:
            counter = self._counted[key] = self.requests.labels(*key)
        timer = self._timed.get(route)
        if timer is None:
            timer = self._timed[route] = self.latency.labels(route)
        counter.inc()
        timer.observe(seconds)


METRICS = web.AppKey("metrics", Metrics)


async def serve(request: web.Request) -> web.Response:
    """Prometheus text; the backlog gauges only when Redis answers in time."""
    metrics = request.app[METRICS]
    redis = request.app[appkeys.REDIS]
    now = time.time()
    settings = request.app[appkeys.SETTINGS]
    try:
        async with asyncio.timeout(BACKLOG_TIMEOUT_SECONDS):
            backlog = await operations.backlog(redis, int(now))
            if settings.live_rates:
                sources, prices = await operations.rates_health(redis, settings.rates_sources)
    except (RedisError, OSError, TimeoutError):
        metrics.backlog.clear()  # no stale numbers: the series are absent until Redis is back
        metrics.rates.sources, metrics.rates.prices = [], []
        metrics.redis_up.set(0)
    else:
        for name, value in backlog.items():
            metrics.backlog.labels(name).set(value)
        if settings.live_rates:
            metrics.rates.sources = [
                (s.name, math.inf if s.ok_at is None else max(0.0, now - s.ok_at), s.errors)
                for s in sources
            ]
            metrics.rates.prices = [
                (symbol, max(0.0, now - as_of)) for symbol, as_of in prices.items()
            ]
        metrics.redis_up.set(1)
    return web.Response(
        body=generate_latest(metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
