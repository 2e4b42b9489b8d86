"""The receiver's aiohttp application factory and its process entry point."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

from aiohttp import web

from receiver import appkeys
from receiver.accesslog import AccessLogger
from receiver.connections import CONNECTION_GUARD, ConnectionGuard, GuardedSite
from receiver.health import LIFECYCLE, Lifecycle, mark_shutting_down
from receiver.metrics import METRICS, Metrics
from receiver.middleware import receiver_middleware
from receiver.routes import setup_routes
from worker import eventloop
from worker.app.runtime import invoice_service, warn_if_demo_keys
from worker.config import MAX_BODY_BYTES, Settings
from worker.ingest.enqueue import Enqueuer
from worker.logs import configure_logging, get_logger
from worker.store.connection import connect
from worker.store.merchants import MerchantStore

log = get_logger(__name__)

# HAProxy (deploy/haproxy.cfg: a check each second, two failures) stops sending to a
# receiver within about 1.5 s of its readiness failing. After SIGTERM the receiver keeps
# serving for a quarter of COINVOICE_SHUTDOWN_SECONDS, at most this long (seconds)...
MAX_DRAIN_SECONDS = 5.0
# ...and keeps this much of the budget for closing Redis after the last request (seconds).
CLOSE_MARGIN_SECONDS = 1.0


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Redis and the services on it; closed only if they were opened (cleanup_ctx)."""
    settings = app[appkeys.SETTINGS]
    redis = connect(settings)
    service = invoice_service(redis, settings)
    app[appkeys.REDIS] = redis
    app[appkeys.RATES] = service.rates
    app[appkeys.MERCHANTS] = MerchantStore(redis)
    app[appkeys.SERVICE] = service
    app[appkeys.ENQUEUER] = Enqueuer(redis)
    if settings.uses_demo_processing_secret:
        log.warning("demo_processing_secret", hint="set COINVOICE_PROCESSING_SECRET in production")
    warn_if_demo_keys(settings)
    yield
    await redis.aclose()


def create_app(settings: Settings) -> web.Application:
    metrics = Metrics()
    guard = ConnectionGuard.from_settings(settings, metrics.connection_closed)
    lifecycle = Lifecycle()
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        # One middleware for what were four layers (receiver/middleware.py): answers
        # while draining say `Connection: close`, metrics see every answer, errors
        # become JSON, and the body is read (in time) before any handler runs.
        middlewares=[receiver_middleware(metrics, guard, lifecycle, settings.body_timeout_seconds)],
    )
    app[appkeys.SETTINGS] = settings
    app[METRICS] = metrics
    app[CONNECTION_GUARD] = guard
    app[LIFECYCLE] = lifecycle
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(mark_shutting_down)
    setup_routes(app)
    return app


def drain_seconds(shutdown_seconds: float) -> float:
    """How long a stopping receiver keeps serving with readiness failed, before it closes."""
    return min(MAX_DRAIN_SECONDS, shutdown_seconds / 4)


async def serve(
    settings: Settings, stop: asyncio.Event, hurry: asyncio.Event | None = None
) -> None:
    """Serve until `stop` is set, then shut down within COINVOICE_SHUTDOWN_SECONDS.

    1. readiness turns 503 at once, while every request is still served
       (the drain, so a load balancer takes this receiver out first);
    2. the listener closes; requests in flight get the rest of the budget;
    3. Redis is closed and the coroutine returns.

    `hurry` (a second signal: an impatient Ctrl-C) cuts the drain short.
    """
    budget = settings.shutdown_seconds
    drain = drain_seconds(budget)
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        keepalive_timeout=settings.keepalive_seconds,
        # Requests still open when the listener closes get what is left of the budget.
        shutdown_timeout=max(0.0, budget - drain - CLOSE_MARGIN_SECONDS),
    )
    await runner.setup()
    try:
        await GuardedSite(runner, settings.host, settings.port).start()
        log.info("receiver_started", host=settings.host, port=settings.port)
        await stop.wait()
        started = time.monotonic()
        app[LIFECYCLE].shutting_down = True
        log.info("receiver_draining", drain_s=drain, shutdown_s=budget)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for((hurry or asyncio.Event()).wait(), drain)
        log.info("receiver_closing", after_s=round(time.monotonic() - started, 2))
    finally:
        await runner.cleanup()  # on_shutdown, in-flight requests, then cleanup_ctx
    log.info("receiver_stopped")


def run(settings: Settings) -> None:
    """`coinvoice receiver`: serve until SIGTERM/SIGINT, drain, exit 0 (see `serve`)."""
    configure_logging(settings.log_format, settings.log_level)
    log.info("receiver_starting", host=settings.host, port=settings.port)

    async def main() -> None:
        stop, hurry = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            (hurry if stop.is_set() else stop).set()
            log.info("receiver_signal", signal=sig.name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        await serve(settings, stop, hurry)

    eventloop.run(main())
