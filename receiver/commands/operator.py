"""Operator views for the CLI: `coinvoice orphans`, `coinvoice invoice show`, redelivery.

What is read comes from `worker.services.operations`; this module connects,
prints one JSON document and picks the exit code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from worker.app.runtime import invoice_service
from worker.config import Settings
from worker.services import operations
from worker.services.invoices import InvoiceNotFound, InvoiceService
from worker.store.connection import connect
from worker.store.deliveries import redeliver
from worker.store.invoices import Stored


async def orphans(settings: Settings) -> int:
    """Print each orphan deposit once, its recorded updates merged (spec §8)."""
    redis = connect(settings)
    try:
        found = await operations.orphans(redis)
    finally:
        await redis.aclose()
    for orphan in found:
        print(json.dumps(orphan))
    return 0


@asynccontextmanager
async def _invoice_of(
    settings: Settings, merchant: str, foreign_id: str
) -> AsyncIterator[tuple[Redis, InvoiceService, Stored]]:
    """Redis, the service and the merchant's invoice; InvoiceNotFound if there is none."""
    redis = connect(settings)
    try:
        service = invoice_service(redis, settings)
        yield redis, service, await service.by_foreign_id(merchant, foreign_id)
    finally:
        await redis.aclose()


def _not_found(merchant: str, foreign_id: str) -> int:
    print(f"coinvoice: no invoice {foreign_id!r} for merchant {merchant!r}", file=sys.stderr)
    return 1


async def invoice_show(settings: Settings, merchant: str, foreign_id: str) -> int:
    """The merchant's view of one invoice plus what only operators see."""
    try:
        async with _invoice_of(settings, merchant, foreign_id) as (redis, _, stored):
            view = await operations.invoice_details(redis, stored)
    except InvoiceNotFound:
        return _not_found(merchant, foreign_id)
    print(json.dumps(view, indent=2))
    return 0


async def callbacks_redeliver(settings: Settings, merchant: str, foreign_id: str) -> int:
    """Deliver an invoice's newest snapshot again now, dead-lettered or not."""
    try:
        async with _invoice_of(settings, merchant, foreign_id) as (_, service, stored):
            sequence = await redeliver(service.store, stored.invoice, service.now())
    except InvoiceNotFound:
        return _not_found(merchant, foreign_id)
    if not sequence:
        print("coinvoice: the invoice has no callback to redeliver yet", file=sys.stderr)
        return 1
    print(json.dumps({"foreign_id": foreign_id, "sequence": sequence, "state": "pending"}))
    return 0
