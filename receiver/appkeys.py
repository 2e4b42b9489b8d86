"""Typed keys for the objects the aiohttp application shares with its handlers."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from worker.config import Settings
from worker.domain.currencies import FileRateProvider
from worker.ingest.enqueue import Enqueuer
from worker.services.invoices import InvoiceService
from worker.store.merchants import MerchantStore

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
SERVICE = web.AppKey("service", InvoiceService)
MERCHANTS = web.AppKey("merchants", MerchantStore)
RATES = web.AppKey("rates", FileRateProvider)
ENQUEUER = web.AppKey("enqueuer", Enqueuer)
