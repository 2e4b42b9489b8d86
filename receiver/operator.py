"""Operator views for the CLI: `coinvoice orphans`, `coinvoice invoice show`."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from worker import keys, machine
from worker.aioredis import awaited, connect
from worker.codec import load_update
from worker.config import Settings
from worker.delivery import delivery_log, redeliver
from worker.events import TransactionUpdate
from worker.runtime import invoice_service, redis_url
from worker.service import InvoiceNotFound, InvoiceService
from worker.snapshot import snapshot
from worker.store import Stored


async def orphans(settings: Settings) -> int:
    """Print each orphan deposit once, its recorded updates merged (spec §8)."""
    redis = connect(redis_url(settings))
    try:
        raw = await awaited(redis.hgetall(keys.ORPHANS))
    finally:
        await redis.aclose()
    by_tx: dict[int, list[TransactionUpdate]] = {}
    for payload in raw.values():
        update = load_update(payload)
        by_tx.setdefault(update.tx_id, []).append(update)
    for tx_id in sorted(by_tx):
        updates = by_tx[tx_id]
        tx = machine.new_transaction(updates[0], late=False)
        for update in updates:
            tx = machine.merge(tx, update)
        print(
            json.dumps(
                {
                    "tx_id": tx.id,
                    "currency": tx.currency,
                    "address": tx.address,
                    "amount": str(tx.amount),
                    "txid": tx.txid,
                    "status": tx.status.value,
                    "confirmations": tx.confirmations,
                    "compliance": tx.compliance.value,
                    "first_observed_at": tx.first_observed_at,
                    "observed_at": tx.observed_at,
                }
            )
        )
    return 0


@asynccontextmanager
async def _invoice_of(
    settings: Settings, merchant: str, foreign_id: str
) -> AsyncIterator[tuple[Redis, InvoiceService, Stored]]:
    """Redis, the service and the merchant's invoice; InvoiceNotFound if there is none."""
    redis = connect(redis_url(settings))
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
            invoice = stored.invoice
            timer = await redis.zscore(keys.TIMERS, invoice.id)
            mails = await awaited(redis.hgetall(keys.mails(invoice.id)))
            callbacks = await delivery_log(redis, invoice)
    except InvoiceNotFound:
        return _not_found(merchant, foreign_id)
    view = snapshot(invoice) | {
        "version": stored.version,
        "token": invoice.token,
        "invoice_type": invoice.invoice_type,
        "payment_type": invoice.payment_type.value,
        "email": invoice.email,
        "timer_fires_at": None if timer is None else int(timer),
        "credited": None if invoice.credited is None else str(invoice.credited),
        "mails": {k.decode(): json.loads(v) for k, v in mails.items()},
        "callbacks": callbacks,
    }
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
