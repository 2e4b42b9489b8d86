"""What operators see: backlogs, orphan deposits, one invoice with its internals.

The receiver's `/metrics` and the operator commands read Redis only through
these functions, so the Redis layout can change without touching them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis

from worker.domain import machine
from worker.domain.events import TransactionUpdate
from worker.domain.models import Invoice
from worker.domain.money import ZERO, fmt8
from worker.domain.snapshot import snapshot
from worker.store import keys
from worker.store.codec import load_update
from worker.store.connection import awaited
from worker.store.deliveries import delivery_log
from worker.store.invoices import Stored
from worker.store.ledger import pending_entries
from worker.store.rates import SourceHealth, read_prices, source_health
from worker.store.schedules import count_due
from worker.store.streams import stream_backlog


async def backlog(redis: Redis, now: int) -> dict[str, int]:
    """Work waiting in Redis, summed over the partitions: stream entries, ledger entries
    not yet on the balances, and callbacks, timers and mails due by `now`."""
    return {
        "updates": await stream_backlog(redis),
        "ledger_entries": await pending_entries(redis),
        "callbacks_due": await count_due(redis, keys.delivery_due, now),
        "timers_due": await count_due(redis, keys.timers, now),
        "mails_due": await count_due(redis, keys.mail_due, now),
    }


async def orphans(redis: Redis) -> list[dict[str, Any]]:
    """Each orphan deposit once, its recorded updates merged (spec §8), by transaction id."""
    raw = await awaited(redis.hgetall(keys.ORPHANS))
    by_tx: dict[int, list[TransactionUpdate]] = {}
    for payload in raw.values():
        update = load_update(payload)
        by_tx.setdefault(update.tx_id, []).append(update)
    out = []
    for tx_id in sorted(by_tx):
        updates = by_tx[tx_id]
        tx = machine.new_transaction(updates[0], late=False)
        for update in updates:
            tx = machine.merge(tx, update)
        out.append(
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
    return out


def settlement(invoice: Invoice) -> dict[str, str] | None:
    """What a confirmed invoice put on the merchant's balance: gross, fee, net; None before.

    `gross` is the payment exchanged into the invoice currency (the invoice amount when
    fully paid); the fee is charged on it, and `net` is what the balance grew by.
    """
    if invoice.credited is None:
        return None
    fee = invoice.fee or ZERO
    return {
        "currency": invoice.currency,
        "gross": fmt8(invoice.credited),
        "fee": fmt8(fee),
        "net": fmt8(invoice.credited - fee),
        "meaning": "gross: the payment exchanged into the invoice currency, before the fee; "
        "net = gross - fee: what reached the merchant's balance",
    }


async def invoice_details(redis: Redis, stored: Stored) -> dict[str, Any]:
    """The merchant's view of one invoice plus what only operators see."""
    invoice = stored.invoice
    timer = await redis.zscore(keys.timers(keys.invoice_partition(invoice.id)), invoice.id)
    mails = await awaited(redis.hgetall(keys.mails(invoice.id)))
    return snapshot(invoice) | {
        "version": stored.version,
        "token": invoice.token,
        "invoice_type": invoice.invoice_type,
        "payment_type": invoice.payment_type.value,
        "email": invoice.email,
        "timer_fires_at": None if timer is None else int(timer),
        "credited": settlement(invoice),
        "mails": {k.decode(): json.loads(v) for k, v in mails.items()},
        "callbacks": await delivery_log(redis, invoice),
    }


async def rates_health(
    redis: Redis, sources: Iterable[str]
) -> tuple[list[SourceHealth], dict[str, int]]:
    """Each live rate source's last good answer and error count, and each price's as-of time."""
    prices = await read_prices(redis)
    return await source_health(redis, sources), {s: p.as_of for s, p in sorted(prices.items())}
