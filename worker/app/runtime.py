"""Building the shared services from Settings: one place for receiver, worker and CLI."""

from __future__ import annotations

from redis.asyncio import Redis

from worker.config import Settings
from worker.domain.addresses import demo_key_currencies, read_pool_file, xpubs_for
from worker.domain.currencies import FileRateProvider
from worker.domain.machine import Policy
from worker.logs import get_logger
from worker.services.invoices import InvoiceService
from worker.store.addresses import RedisAddressProvider
from worker.store.invoices import InvoiceStore

log = get_logger(__name__)


def policy_from(settings: Settings) -> Policy:
    return Policy(
        timer_seconds=settings.timer_seconds,
        grace_seconds=settings.expiry_grace_seconds,
        processing_window_seconds=settings.processing_window_seconds,
        processing_windows=settings.processing_windows,
    )


def invoice_service(redis: Redis, settings: Settings) -> InvoiceService:
    policy = policy_from(settings)
    rates = FileRateProvider.load(settings.rates_file)
    xpubs = xpubs_for(settings.xpubs)
    demo = demo_key_currencies(xpubs)
    if demo:
        # Anybody can spend from the demo keys' addresses: fine for a laptop, never for money.
        log.warning("demo_extended_keys_in_use", currencies=list(demo), hint="set COINVOICE_XPUBS")
    pool = read_pool_file(settings.address_pool_file) if settings.address_pool_file else None
    addresses = RedisAddressProvider(redis, xpubs, pool)
    return InvoiceService(InvoiceStore(redis, policy), rates, addresses, policy)
