"""Payment scenarios and the reference model the crash and concurrency tests compare against.

Every scenario is one invoice with the distinct updates its payment produces.
The reference applies each distinct update once, in natural order, through
the pure state machine; whatever the processes did (duplicates, reordering,
crashes, restarts) must end in the same invoices, ledger and e-mails.
Scenarios are chosen so that their final state does not depend on the order
in which one payment's updates arrive (see docs/architecture.md).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis

from receiver.commands.simulate import deposit_body
from worker.domain import machine
from worker.domain.effects import LedgerEntry
from worker.domain.events import TransactionUpdate
from worker.domain.models import Compliance, Invoice, Merchant, PaymentType, TxStatus
from worker.domain.money import fmt8
from worker.services.invoices import InvoiceRequest, InvoiceService
from worker.store import keys
from worker.store.invoices import decode_stored, parse_ledger_line

KINDS = ("full", "underpaid", "flagged", "overpaid", "instalments")


@dataclass
class Plan:
    kind: str
    invoice: Invoice
    updates: list[TransactionUpdate]


def _update(
    inv: Invoice, tx_id: int, amount: Decimal, status: TxStatus, conf: int, at: int, **kw: Any
) -> TransactionUpdate:
    assert inv.address is not None
    return TransactionUpdate(
        tx_id=tx_id,
        currency=inv.address.currency,
        address=inv.address.address,
        amount=amount,
        txid=f"{tx_id:064x}",
        confirmations=conf,
        status=status,
        compliance=kw.get("compliance", Compliance.CLEAR),
        observed_at=at,
    )


def _payment(inv: Invoice, tx_id: int, amount: Decimal, start: int) -> list[TransactionUpdate]:
    """Mempool sighting, one more confirmation, then confirmed."""
    nc, ok = TxStatus.NOT_CONFIRMED, TxStatus.CONFIRMED
    return [
        _update(inv, tx_id, amount, nc, 0, start),
        _update(inv, tx_id, amount, nc, 1, start + 1),
        _update(inv, tx_id, amount, ok, 3, start + 2),
    ]


async def create_plans(
    service: InvoiceService, merchant: Merchant, count: int, rng: random.Random, prefix: str = "inv"
) -> list[Plan]:
    """`count` type-3 invoices (BTC address at creation), each with a payment scenario."""
    plans = []
    for n in range(count):
        kind = KINDS[n % len(KINDS)]
        payment_type = (
            PaymentType.GOOD_UNTIL_EXPIRED if kind == "instalments" else PaymentType.FILL_OR_KILL
        )
        invoice = await service.create(
            merchant,
            InvoiceRequest(
                foreign_id=f"{prefix}-{n}",
                title=f"Order {n}",
                currency="EUR",
                amount=Decimal(rng.randint(100, 100_000)) / 100,
                timer=True,
                sender_currency="BTC",
                payment_type=payment_type,
            ),
        )
        assert invoice.sender_amount is not None and invoice.fixed_at is not None
        required, start, tx = invoice.sender_amount, invoice.fixed_at + 10, 1000 * (n + 1)
        if kind == "full":
            updates = _payment(invoice, tx, required, start)
        elif kind == "underpaid":
            updates = _payment(invoice, tx, (required / 2).quantize(Decimal("0.00000001")), start)
        elif kind == "overpaid":
            updates = _payment(invoice, tx, required * 2, start)
        elif kind == "flagged":
            updates = [
                _update(invoice, tx, required, TxStatus.NOT_CONFIRMED, 0, start),
                _update(
                    invoice,
                    tx,
                    required,
                    TxStatus.NOT_CONFIRMED,
                    1,
                    start + 1,
                    compliance=Compliance.FLAGGED,
                ),
            ]
        else:
            half = (required / 2).quantize(Decimal("0.00000001"))
            updates = _payment(invoice, tx, half, start) + _payment(
                invoice, tx + 1, required - half, start + 5
            )
        plans.append(Plan(kind, invoice, updates))
    return plans


def body(update: TransactionUpdate) -> bytes:
    """The §8 processing callback that reports `update`."""
    return json.dumps(
        deposit_body(
            tx_id=update.tx_id,
            currency=update.currency,
            address=update.address,
            amount=fmt8(update.amount),
            txid=update.txid,
            status=update.status.value,
            confirmations=update.confirmations,
            compliance=update.compliance.value,
            observed_at=update.observed_at,
        )
    ).encode()


@dataclass
class Expected:
    invoices: dict[int, Invoice]
    ledger: Counter[tuple[int, str, str]]  # (invoice id, kind, amount) → count
    balances: dict[str, Decimal]  # currency → balance


def reference(plans: list[Plan], policy: machine.Policy) -> Expected:
    """Each distinct update applied once, in natural order, through the pure machine."""
    invoices: dict[int, Invoice] = {}
    ledger: Counter[tuple[int, str, str]] = Counter()
    balances: dict[str, Decimal] = {}
    for plan in plans:
        invoice = plan.invoice
        for update in plan.updates:
            transition = machine.apply(invoice, update, policy)
            invoice = transition.invoice
            for effect in transition.effects:
                if isinstance(effect, LedgerEntry):
                    ledger[(invoice.id, effect.kind.value, fmt8(effect.amount))] += 1
                    balances[effect.currency] = (
                        balances.get(effect.currency, Decimal(0)) + effect.amount
                    )
        invoices[invoice.id] = invoice
    return Expected(invoices, ledger, balances)


async def mismatches(redis: aioredis.Redis, merchant: Merchant, expected: Expected) -> list[str]:
    """Every difference between Redis and the reference (empty when all is right)."""
    problems: list[str] = []
    for invoice_id, want in expected.invoices.items():
        got = decode_stored(await redis.get(keys.invoice(invoice_id))).invoice
        # The refund token is random: it must exist exactly when a mail does, and find its invoice.
        if replace(got, sequence=0, refund_token=None) != replace(want, sequence=0):
            problems.append(f"invoice {invoice_id}: got {got} want {want}")
        if (got.refund_token is not None) != bool(want.mailed):
            problems.append(f"invoice {invoice_id}: refund token {got.refund_token!r}")
        elif got.refund_token is not None:
            owner = await redis.get(keys.refund_token(got.refund_token))
            if owner != str(invoice_id).encode():
                problems.append(f"invoice {invoice_id}: refund token owned by {owner!r}")
        mails = {k.decode() for k in await redis.hkeys(keys.mails(invoice_id))}
        if mails != set(want.mailed):
            problems.append(
                f"invoice {invoice_id}: mails {sorted(mails)} want {sorted(want.mailed)}"
            )
        seq = await redis.hget(keys.delivery(invoice_id), "seq")
        if got.sequence and int(seq or 0) != got.sequence:
            problems.append(
                f"invoice {invoice_id}: outbox at sequence {seq}, invoice at {got.sequence}"
            )
    rows = map(parse_ledger_line, await redis.lrange(keys.ledger(merchant.key), 0, -1))
    ledger = Counter((r.invoice_id, r.kind, fmt8(r.amount)) for r in rows)
    if ledger != expected.ledger:
        problems.append(
            f"ledger differs: extra {ledger - expected.ledger}, missing {expected.ledger - ledger}"
        )
    raw_balances = await redis.hgetall(keys.balance(merchant.key))
    balances = {k.decode(): Decimal(v.decode()) for k, v in raw_balances.items()}
    if balances != {c: b for c, b in expected.balances.items()}:
        problems.append(f"balances {balances} want {expected.balances}")
    return problems
