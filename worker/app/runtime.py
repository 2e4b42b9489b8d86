"""Building the shared services from Settings: one place for receiver, worker and CLI."""

from __future__ import annotations

from redis.asyncio import Redis

from worker.config import Settings
from worker.domain.addresses import demo_key_currencies, read_pool_file, xpubs_for
from worker.domain.currencies import FileRateProvider, FixedPrices, PriceFeed
from worker.domain.machine import Policy
from worker.logs import get_logger
from worker.services.invoices import InvoiceService
from worker.store.addresses import RedisAddressProvider
from worker.store.invoices import InvoiceStore
from worker.store.rates import RedisPrices

log = get_logger(__name__)


def policy_from(settings: Settings) -> Policy:
    return Policy(
        timer_seconds=settings.timer_seconds,
        grace_seconds=settings.expiry_grace_seconds,
        processing_window_seconds=settings.processing_window_seconds,
        processing_windows=settings.processing_windows,
    )


def price_feed(redis: Redis, settings: Settings, catalog: FileRateProvider) -> PriceFeed:
    """Live prices from the table in Redis when sources are configured, else the file's."""
    if settings.live_rates:
        return RedisPrices(redis, catalog, settings.rates_max_age_seconds)
    return FixedPrices(catalog)


def invoice_service(redis: Redis, settings: Settings) -> InvoiceService:
    policy = policy_from(settings)
    rates = FileRateProvider.load(settings.rates_file)
    xpubs = xpubs_for(settings.xpubs)
    pool = read_pool_file(settings.address_pool_file) if settings.address_pool_file else None
    addresses = RedisAddressProvider(redis, xpubs, pool)
    return InvoiceService(
        InvoiceStore(redis, policy),
        rates,
        addresses,
        policy,
        prices=price_feed(redis, settings, rates),
    )


def warn_if_demo_keys(settings: Settings) -> None:
    """Warn once per process that derives deposit addresses (receiver, worker) from demo keys.

    Anybody can spend from the demo keys' addresses: fine for a laptop, never for money.
    Operator commands derive nothing, so they stay quiet.
    """
    demo = demo_key_currencies(xpubs_for(settings.xpubs))
    if demo:
        log.warning("demo_extended_keys_in_use", currencies=list(demo), hint="set COINVOICE_XPUBS")
