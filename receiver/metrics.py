"""Prometheus metrics of a receiver (`GET /metrics`, names prefixed `coinvoice_`).

Request counters and latencies come from a middleware; queue depths (updates
waiting for a worker, callbacks due, timers due) are read from Redis at
scrape time, so every receiver reports the system's backlog. With live rates,
so are each market source's age and error count and each price's age (the
leading worker records them; see worker/rates/).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from receiver import appkeys
from receiver.accesslog import route_pattern
from worker.services import operations

# Request latency buckets in seconds: the p99 goals live between 1 ms and 100 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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
            "Work waiting in Redis: updates to apply, callbacks and timers due",
            ["queue"],
            registry=self.registry,
        )
        self.rates = RatesCollector()
        self.registry.register(self.rates)

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


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        request.app[METRICS].observe(route_pattern(request), status, time.perf_counter() - started)


async def serve(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    redis = request.app[appkeys.REDIS]
    now = time.time()
    for name, value in (await operations.backlog(redis, int(now))).items():
        metrics.backlog.labels(name).set(value)
    settings = request.app[appkeys.SETTINGS]
    if settings.live_rates:
        sources, prices = await operations.rates_health(redis, settings.rates_sources)
        metrics.rates.sources = [
            (s.name, math.inf if s.ok_at is None else max(0.0, now - s.ok_at), s.errors)
            for s in sources
        ]
        metrics.rates.prices = [(symbol, max(0.0, now - as_of)) for symbol, as_of in prices.items()]
    return web.Response(
        body=generate_latest(metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
