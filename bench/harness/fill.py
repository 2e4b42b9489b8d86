"""Realistic invoices and payment updates, made fast: no HD derivation, pipelined writes.

`service.create` derives a deposit address per invoice (milliseconds each);
for tens of thousands of invoices the benchmarks instead build type-3 BTC
invoices with the pure `machine.create`, give each a valid bech32 address of
its own (a hash as the witness program: valid, canonical, nobody's), and
write them through the store's own create script, pipelined.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal

from bip_utils import SegwitBech32Encoder
from redis.asyncio import Redis

from worker.domain import machine
from worker.domain.currencies import quote
from worker.domain.events import TransactionUpdate
from worker.domain.machine import NewInvoice
from worker.domain.models import (
    Compliance,
    DepositAddress,
    Invoice,
    Merchant,
    PaymentType,
    TxStatus,
)
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.scripts import execute

# Invoices written per pipeline (one round trip, one fsync).
PIPELINE = 500
EIGHT_PLACES = Decimal("0.00000001")


def btc_address(n: int, salt: str = "") -> str:
    """A valid, canonical bech32 P2WPKH address unique to `n` (and `salt`)."""
    program = hashlib.sha256(f"{salt}:{n}".encode()).digest()[:20]
    return str(SegwitBech32Encoder.Encode("bc", 0, program))


def foreign_id(n: int, salt: str = "") -> str:
    return f"order-{salt}{n:08d}"


async def reserve_ids(redis: Redis, merchant: Merchant, foreign_ids: Sequence[str]) -> list[int]:
    """A fresh invoice id for each foreign id, in its partition (one pipelined round trip)."""
    async with redis.pipeline(transaction=False) as pipe:
        for fid in foreign_ids:
            pipe.incr(keys.invoice_ids(keys.foreign_id_partition(merchant.key, fid)))
        counters = await pipe.execute()
    return [
        int(n) * keys.partitions() + keys.foreign_id_partition(merchant.key, fid)
        for n, fid in zip(counters, foreign_ids, strict=True)
    ]


def new_invoice(
    service: InvoiceService,
    merchant: Merchant,
    invoice_id: int,
    fid: str,
    rng: random.Random,
    now: int,
    payment_type: PaymentType = PaymentType.FILL_OR_KILL,
    salt: str = "",
) -> Invoice:
    """A pending type-3 EUR→BTC invoice with its own address, as `service.create` makes it."""
    amount = Decimal(rng.randint(1_000, 100_000)) / 100
    return machine.create(
        NewInvoice(
            id=invoice_id,
            merchant=merchant.key,
            foreign_id=fid,
            token=secrets.token_urlsafe(24),
            title=f"Order {invoice_id}",
            description="",
            currency="EUR",
            amount=amount,
            timer=True,
            payment_type=payment_type,
            terms=merchant.terms,
            created_at=now,
            sender_currency="BTC",
            quotes=(quote(service.rates, "EUR", amount, "BTC"),),
            address=DepositAddress(invoice_id, "BTC", btc_address(invoice_id, salt)),
        ),
        service.policy,
    )


async def store_invoices(service: InvoiceService, invoices: Iterable[Invoice]) -> int:
    """Write invoices through create.lua, `PIPELINE` per round trip; how many were written."""
    store, written = service.store, 0
    for chunk in _chunks(invoices, PIPELINE):
        async with store.redis.pipeline(transaction=False) as pipe:
            for invoice in chunk:
                await store.queue_create(pipe, invoice)
            results = await execute(pipe)
        # Per invoice: the token and address lookups (True), then create.lua's [1, id].
        bad = [r for r in results if isinstance(r, list) and not int(r[0])]
        if bad:
            raise RuntimeError(f"{len(bad)} invoices were not created (duplicate foreign ids?)")
        written += len(chunk)
    return written


async def create_invoices(
    service: InvoiceService,
    merchant: Merchant,
    count: int,
    rng: random.Random,
    payment_type: PaymentType = PaymentType.FILL_OR_KILL,
    salt: str = "",
) -> list[Invoice]:
    """`count` pending invoices, stored; returned in foreign-id order."""
    now = int(time.time())
    fids = [foreign_id(n, salt) for n in range(count)]
    ids = await reserve_ids(service.store.redis, merchant, fids)
    invoices = [
        new_invoice(service, merchant, i, fid, rng, now, payment_type, salt)
        for i, fid in zip(ids, fids, strict=True)
    ]
    await store_invoices(service, invoices)
    return invoices


def payment(
    invoice: Invoice, tx_id: int, amount: Decimal | None = None, start: int | None = None
) -> list[TransactionUpdate]:
    """One full payment as the processing layer reports it: mempool, 1 confirmation, confirmed.

    Every update changes the invoice (status or confirmations), so each one makes
    a new merchant callback.
    """
    assert invoice.address is not None and invoice.sender_amount is not None
    paid = invoice.sender_amount if amount is None else amount
    at = (invoice.fixed_at or invoice.created_at) + 1 if start is None else start
    steps = [(TxStatus.NOT_CONFIRMED, 0), (TxStatus.NOT_CONFIRMED, 1), (TxStatus.CONFIRMED, 3)]
    return [
        TransactionUpdate(
            tx_id=tx_id,
            currency=invoice.address.currency,
            address=invoice.address.address,
            amount=paid,
            txid=hashlib.sha256(str(tx_id).encode()).hexdigest(),
            confirmations=confirmations,
            status=status,
            compliance=Compliance.CLEAR,
            observed_at=at + step,
        )
        for step, (status, confirmations) in enumerate(steps)
    ]


def round_robin(per_invoice: Sequence[Sequence[TransactionUpdate]]) -> list[TransactionUpdate]:
    """Every invoice's first update, then every second one, …: a batch never repeats an invoice."""
    longest = max((len(u) for u in per_invoice), default=0)
    return [u[step] for step in range(longest) for u in per_invoice if step < len(u)]


def _chunks(items: Iterable[Invoice], size: int) -> Iterator[list[Invoice]]:
    chunk: list[Invoice] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
