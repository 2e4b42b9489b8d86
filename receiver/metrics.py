"""Prometheus metrics of a receiver (`GET /metrics`, names prefixed `coinvoice_`).

Request counters and latencies come from a middleware; queue depths (updates
waiting for a worker, callbacks due, timers due) are read from Redis at
scrape time, so every receiver reports the system's backlog.
"""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from receiver import appkeys
from receiver.accesslog import route_pattern
from worker.services import operations

# Request latency buckets in seconds: the p99 goals live between 1 ms and 100 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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
    for name, value in (await operations.backlog(redis, int(time.time()))).items():
        metrics.backlog.labels(name).set(value)
    return web.Response(
        body=generate_latest(metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
