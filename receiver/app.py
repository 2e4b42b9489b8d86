"""The receiver's aiohttp application factory and its process entry point."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from receiver import appkeys
from receiver.accesslog import AccessLogger
from receiver.api.errors import error_middleware
from receiver.health import LIFECYCLE, Lifecycle, mark_shutting_down
from receiver.metrics import METRICS, Metrics, metrics_middleware
from receiver.routes import setup_routes
from worker.app.runtime import invoice_service
from worker.config import MAX_BODY_BYTES, Settings
from worker.ingest.enqueue import Enqueuer
from worker.logs import configure_logging, get_logger
from worker.store.connection import connect
from worker.store.merchants import MerchantStore

log = get_logger(__name__)


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
    yield
    await redis.aclose()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[metrics_middleware, error_middleware],
    )
    app[appkeys.SETTINGS] = settings
    app[METRICS] = Metrics()
    app[LIFECYCLE] = Lifecycle()
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(mark_shutting_down)
    setup_routes(app)
    return app


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; aiohttp then drains connections and runs cleanups."""
    configure_logging(settings.log_format, settings.log_level)
    log.info("receiver_starting", host=settings.host, port=settings.port)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log_class=AccessLogger,
        shutdown_timeout=10,
    )
