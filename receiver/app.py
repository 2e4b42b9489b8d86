"""The receiver's aiohttp application factory and its process entry point."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from receiver import appkeys
from receiver.accesslog import AccessLogger
from receiver.api.errors import error_middleware
from receiver.connections import (
    CONNECTION_GUARD,
    ConnectionGuard,
    GuardedSite,
    transport_middleware,
)
from receiver.health import LIFECYCLE, Lifecycle, mark_shutting_down
from receiver.metrics import METRICS, Metrics, metrics_middleware
from receiver.routes import setup_routes
from worker.app.runtime import invoice_service, redis_url, warn_if_demo_keys
from worker.config import MAX_BODY_BYTES, Settings
from worker.ingest.enqueue import Enqueuer
from worker.logs import configure_logging, get_logger
from worker.store.connection import connect
from worker.store.merchants import MerchantStore

log = get_logger(__name__)

# Open requests get this long to finish when the receiver stops (seconds).
SHUTDOWN_TIMEOUT_SECONDS = 10.0


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Redis and the services on it; closed only if they were opened (cleanup_ctx)."""
    settings = app[appkeys.SETTINGS]
    redis = connect(redis_url(settings))
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
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        # Outermost first: metrics see every answer, errors become JSON, and the
        # body is read (in time) before any handler runs.
        middlewares=[metrics_middleware, error_middleware, transport_middleware],
    )
    app[appkeys.SETTINGS] = settings
    metrics = app[METRICS] = Metrics()
    app[CONNECTION_GUARD] = ConnectionGuard.from_settings(settings, metrics.connection_closed)
    app[LIFECYCLE] = Lifecycle()
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(mark_shutting_down)
    setup_routes(app)
    return app


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Serve on `settings.host:port` until `stop` is set, then drain and run the cleanups."""
    runner = web.AppRunner(
        create_app(settings),
        access_log_class=AccessLogger,
        keepalive_timeout=settings.keepalive_seconds,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
    )
    await runner.setup()
    try:
        await GuardedSite(runner, settings.host, settings.port).start()
        await stop.wait()
    finally:
        await runner.cleanup()  # on_shutdown (readiness fails), drain, then cleanup_ctx


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; then connections drain and the cleanups run."""
    configure_logging(settings.log_format, settings.log_level)
    log.info("receiver_starting", host=settings.host, port=settings.port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
