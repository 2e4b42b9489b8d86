"""Operator views for the CLI: `coinvoice orphans`, `coinvoice invoice show`."""

from __future__ import annotations

import json
import sys

from worker import keys, machine
from worker.aioredis import awaited, connect
from worker.codec import load_update
from worker.config import Settings
from worker.delivery import delivery_log, redeliver
from worker.events import TransactionUpdate
from worker.runtime import invoice_service, redis_url
from worker.service import InvoiceNotFound
from worker.snapshot import snapshot


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


async def invoice_show(settings: Settings, merchant: str, foreign_id: str) -> int:
    """The merchant's view of one invoice plus what only operators see."""
    redis = connect(redis_url(settings))
    try:
        service = invoice_service(redis, settings)
        try:
            stored = await service.by_foreign_id(merchant, foreign_id)
        except InvoiceNotFound:
            print(
                f"coinvoice: no invoice {foreign_id!r} for merchant {merchant!r}", file=sys.stderr
            )
            return 1
        invoice = stored.invoice
        timer = await redis.zscore(keys.TIMERS, invoice.id)
        mails = await awaited(redis.hgetall(keys.mails(invoice.id)))
        callbacks = await delivery_log(redis, invoice)
    finally:
        await redis.aclose()
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
    redis = connect(redis_url(settings))
    try:
        service = invoice_service(redis, settings)
        try:
            stored = await service.by_foreign_id(merchant, foreign_id)
        except InvoiceNotFound:
            print(
                f"coinvoice: no invoice {foreign_id!r} for merchant {merchant!r}", file=sys.stderr
            )
            return 1
        sequence = await redeliver(service.store, stored.invoice, service.now())
    finally:
        await redis.aclose()
    if not sequence:
        print("coinvoice: the invoice has no callback to redeliver yet", file=sys.stderr)
        return 1
    print(json.dumps({"foreign_id": foreign_id, "sequence": sequence, "state": "pending"}))
    return 0
