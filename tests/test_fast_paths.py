"""The performance work keeps every promise (issue: benchmarks): stored formats, group
commits and the delivery line behave exactly as the plain versions did."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.machine_factories import make_invoice, run, update
from tests.sink import Sink, running_sink
from tests.support import make_settings
from worker.app.runtime import invoice_service
from worker.domain.effects import LedgerEntry, LedgerKind
from worker.domain.models import Compliance, Invoice, PaymentType, TxStatus
from worker.outbox.delivery import CLAIM_BATCH, PER_MERCHANT_IN_FLIGHT, Deliverer
from worker.services.invoices import InvoiceRequest
from worker.store import keys
from worker.store.batching import GroupCommit
from worker.store.codec import (
    _INVOICE,
    _ZDICT_1,
    dump_invoice,
    dump_invoice_json,
    invoice_json,
    load_invoice,
)
from worker.store.deliveries import (
    Outcome,
    delivery_log,
    log_entry,
    parse_log_entry,
    record_call,
)
from worker.store.invoices import LedgerLine, decode_stored, ledger_line, parse_ledger_line
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer
from worker.store.schedules import count_due

HALF = Decimal("0.00900000")


def two_payments(flag_second: bool = False) -> Invoice:
    """A type-3 instalments invoice confirmed by two transactions (the second maybe flagged)."""
    invoice = make_invoice(3, payment_type=PaymentType.GOOD_UNTIL_EXPIRED)
    second = Compliance.FLAGGED if flag_second else Compliance.CLEAR
    final, _ = run(
        invoice,
        [
            update(1, HALF, TxStatus.CONFIRMED),
            update(2, HALF, TxStatus.CONFIRMED, at=invoice.created_at + 120, compliance=second),
        ],
    )
    return final


# --------------------------------------------------------------------------- stored invoice


def test_stored_invoice_is_deflated_behind_its_marker() -> None:
    """Format \\x01: raw deflate of the JSON with the preset dictionary; a round trip."""
    for invoice in (two_payments(), two_payments(flag_second=True)):
        stored = dump_invoice(invoice)
        assert stored[:1] == b"\x01"
        assert json.loads(invoice_json(stored)) == json.loads(
            _INVOICE.dump_json(invoice, exclude_defaults=True)
        )
        assert load_invoice(stored) == invoice
        assert len(stored) < len(dump_invoice_json(invoice)) / 2


# The first 16 hex digits of the dictionary's SHA-256: it must never change.
ZDICT_1_SHA256_PREFIX = "74a917d0030f8df8"


def test_the_preset_dictionary_never_changes() -> None:
    """Stored invoices can only be inflated with these exact bytes (a new one is \\x02)."""
    assert hashlib.sha256(_ZDICT_1).hexdigest()[:16] == ZDICT_1_SHA256_PREFIX


def test_a_truncated_stored_invoice_is_refused() -> None:
    stored = dump_invoice(two_payments())
    with pytest.raises(ValueError):
        load_invoice(stored[:-8])


@given(title=st.text(max_size=300), description=st.text(max_size=300))
@settings(max_examples=50, deadline=None)
def test_any_text_round_trips(title: str, description: str) -> None:
    invoice = replace(two_payments(), title=title, description=description)
    assert load_invoice(dump_invoice(invoice)) == invoice


def test_previous_compact_json_leaves_out_what_each_transaction_repeats() -> None:
    """The previous version's JSON (still read): transactions carry no currency, address
    or `clear` compliance; loading restores them."""
    invoice = two_payments()
    stored = json.loads(dump_invoice_json(invoice))
    assert len(stored["transactions"]) == 2
    for tx in stored["transactions"]:
        assert not {"currency", "address", "compliance"} & tx.keys()
    assert load_invoice(dump_invoice_json(invoice)) == invoice


def test_a_flagged_transaction_keeps_its_compliance() -> None:
    """Only the usual value is implied: `flagged` is written out."""
    invoice = two_payments(flag_second=True)
    stored = json.loads(dump_invoice_json(invoice))
    assert [tx.get("compliance") for tx in stored["transactions"]] == [None, "flagged"]
    assert load_invoice(dump_invoice_json(invoice)) == invoice


def test_a_transaction_to_another_address_keeps_it() -> None:
    """Currency and address are left out only when they are the invoice's own."""
    invoice = two_payments()
    other = replace(invoice.transactions[1], address="bc1qsomeoneelse")
    invoice = replace(invoice, transactions=(invoice.transactions[0], other))
    stored = json.loads(dump_invoice_json(invoice))
    assert "address" not in stored["transactions"][0]
    assert stored["transactions"][1]["address"] == "bc1qsomeoneelse"
    assert load_invoice(dump_invoice_json(invoice)) == invoice


def test_invoices_written_in_full_still_load() -> None:
    """JSON with every transaction field written out reads as the same invoice."""
    invoice = two_payments()
    assert load_invoice(_INVOICE.dump_json(invoice, exclude_defaults=True)) == invoice


async def test_an_invoice_is_one_string_of_version_and_json(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """`cv:inv:{id}` is `{version}:{stored form}`; each committed change bumps the version."""
    service = invoice_service(redis, make_settings(redis_server.url))
    merchant = make_merchant("Shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(redis).add(merchant)
    invoice = await service.create(
        merchant, InvoiceRequest("f-1", "Tea", "EUR", Decimal("10"), timer=True)
    )
    raw = await redis.get(keys.invoice(invoice.id))
    assert raw.startswith(b"1:\x01") and decode_stored(raw).invoice == invoice
    cancelled = await service.cancel(merchant.key, "f-1")
    stored = decode_stored(await redis.get(keys.invoice(invoice.id)))
    assert (stored.version, stored.invoice) == (2, cancelled)


# --------------------------------------------------------------------------- delivery log


@given(
    sequence=st.integers(1, 10_000),
    at=st.integers(0, 2**40),
    status=st.one_of(st.none(), st.integers(100, 599)),
    duration=st.integers(0, 10**6),
    error=st.text(max_size=300),
)
def test_a_log_entry_reads_back_as_written(
    sequence: int, at: int, status: int | None, duration: int, error: str
) -> None:
    """Any attempt, error text with spaces included, survives the one-line entry."""
    outcome = Outcome(status, error, duration, delivered=status == 200)
    assert parse_log_entry(log_entry(sequence, at, outcome)) == (
        sequence,
        {"at": at, "status_code": status, "error": error, "duration_ms": duration},
    )


async def test_the_log_is_in_the_delivery_hash_and_an_old_list_still_reads(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """delivery_done.lua logs each attempt as a field of `cv:dlv` (one key per invoice);
    a log an earlier version kept in its own list (`cv:dlog`) shows first."""
    service = invoice_service(redis, make_settings(redis_server.url))
    merchant = make_merchant("Shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(redis).add(merchant)
    invoice = await service.create(
        merchant, InvoiceRequest("f-1", "Tea", "EUR", Decimal("10"), timer=True)
    )
    invoice = replace(invoice, sequence=2)
    await redis.hset(keys.delivery(invoice.id), "seq", 2)
    # As the previous version left it: sequence 1 delivered after one failure.
    failed = Outcome(None, "TimeoutError: slow", 10_002, delivered=False)
    await redis.rpush(
        keys.delivery_log(invoice.id),
        log_entry(1, 100, failed),
        log_entry(1, 160, Outcome(200, "", 4, delivered=True)),
    )
    await redis.hset(keys.delivery(invoice.id), "delivered", 1)
    for at, outcome in (
        (200, Outcome(500, "", 7, delivered=False)),
        (260, Outcome(200, "", 3, delivered=True)),
    ):
        keys_, args = record_call(invoice.id, 2, outcome, at, [60])
        await service.store.scripts.delivery_done(keys=keys_, args=args)
    state = await redis.hgetall(keys.delivery(invoice.id))
    assert state[b"n"] == b"2" and state[b"a1"].startswith(b"2 200 500 ")
    assert await redis.object("encoding", keys.delivery(invoice.id)) == b"listpack"
    log = await delivery_log(redis, invoice)
    assert [row["state"] for row in log] == ["delivered", "delivered"]
    assert [[a["at"] for a in row["attempts"]] for row in log] == [[100, 160], [200, 260]]


# --------------------------------------------------------------------------- group commit


async def test_concurrent_submissions_share_one_flush_and_get_their_own_results() -> None:
    """What arrives while a flush is in flight goes into the next one, results in order."""
    calls: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        calls.append(items)
        await asyncio.sleep(0)
        return [item * 10 for item in items]

    batches: GroupCommit[int, int] = GroupCommit(flush, max_batch=100)
    results = await asyncio.gather(*(batches.submit(n) for n in range(50)))
    assert results == [n * 10 for n in range(50)]
    assert len(calls) < 50 and sorted(x for call in calls for x in call) == list(range(50))


async def test_a_failed_flush_fails_each_of_its_callers() -> None:
    """A round trip that raises reaches every caller in it; the next flush works again."""
    fail = True

    async def flush(items: list[int]) -> list[int]:
        if fail:
            raise ConnectionError("redis went away")
        return items

    batches: GroupCommit[int, int] = GroupCommit(flush, max_batch=10)
    outcomes = await asyncio.gather(*(batches.submit(n) for n in range(3)), return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    fail = False
    assert await batches.submit(7) == 7


async def test_an_item_that_failed_alone_fails_alone() -> None:
    """A flush may return an exception for one item: only its caller sees it."""

    async def flush(items: list[int]) -> list[int | BaseException]:
        return [ValueError(n) if n == 2 else n for n in items]

    batches: GroupCommit[int, int] = GroupCommit(flush, max_batch=10)
    outcomes = await asyncio.gather(*(batches.submit(n) for n in range(4)), return_exceptions=True)
    assert outcomes[:2] == [0, 1] and isinstance(outcomes[2], ValueError) and outcomes[3] == 3


# --------------------------------------------------------------------------- delivery line


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async for running in running_sink():
        yield running


async def test_callbacks_beyond_a_merchants_cap_wait_in_line_not_a_second(
    redis: aioredis.Redis, redis_server: RedisServer, sink: Sink
) -> None:
    """More due callbacks than one merchant's cap are all delivered in one round, in line."""
    settings = make_settings(redis_server.url)
    service = invoice_service(redis, settings)
    merchant = make_merchant("Shop", sink.url("/shop"))
    await MerchantStore(redis).add(merchant)
    count = 2 * PER_MERCHANT_IN_FLIGHT  # over the cap, within one claim
    assert count <= CLAIM_BATCH
    ids = []
    for n in range(count):
        created = await service.create(
            merchant, InvoiceRequest(f"f-{n}", "Tea", "EUR", Decimal("10"), timer=True)
        )
        await service.cancel(merchant.key, f"f-{n}")
        ids.append(created.id)
    deliverer = Deliverer(redis, service.store, settings)
    await deliverer.start()
    try:
        assert await deliverer.deliver_due() == count
        await deliverer.wait_idle()
    finally:
        await deliverer.close()
    assert len(sink.received) == count
    assert await count_due(redis, keys.delivery_due, float("inf")) == 0
    stored = await service.store.get_many(ids)
    logs = [await delivery_log(redis, s.invoice) for s in stored.values()]
    assert all(log[-1]["state"] == "delivered" for log in logs)


# --------------------------------------------------------------------------- ledger


@given(
    invoice_id=st.integers(1, 2**53),
    amount=st.decimals(min_value=-(10**12), max_value=10**12, places=8, allow_nan=False),
    at=st.integers(0, 2**40),
)
def test_a_ledger_line_reads_back_as_written(invoice_id: int, amount: Decimal, at: int) -> None:
    """Any ledger entry survives its one-line stored form exactly."""
    entry = LedgerEntry("merchant", "EUR", amount, LedgerKind.FEE, invoice_id)
    assert parse_ledger_line(ledger_line(entry, at)) == LedgerLine(
        invoice_id, "fee_crypto_deposit", "EUR", amount, at
    )
