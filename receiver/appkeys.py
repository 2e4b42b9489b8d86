"""Typed keys for the objects the aiohttp application shares with its handlers."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from receiver.enqueuer import Enqueuer
from worker.config import Settings
from worker.currencies import FileRateProvider
from worker.merchants import MerchantStore
from worker.service import InvoiceService

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
SERVICE = web.AppKey("service", InvoiceService)
MERCHANTS = web.AppKey("merchants", MerchantStore)
RATES = web.AppKey("rates", FileRateProvider)
ENQUEUER = web.AppKey("enqueuer", Enqueuer)
