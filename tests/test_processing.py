"""Processing callbacks (spec §8) end to end in one process: receive, queue, apply."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from receiver import appkeys
from receiver.api.merchant import data
from receiver.api.processing import queued_answer
from tests.support import (
    PROCESSING_KEY,
    PROCESSING_SECRET,
    create_payload,
    deposit,
    drain,
    merchant_post,
    processing_post,
    signed_headers,
)
from worker.domain.models import Merchant
from worker.domain.signing import sign
from worker.ingest.consumer import Ingest, ensure_group
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.invoices import decode_stored, parse_ledger_line
from worker.store.schedules import count_due
from worker.store.streams import stream_backlog

Client = TestClient[Any, Any]
NOW = 1_800_000_000  # a fixed "now" for observed_at values well in the future


async def new_invoice(
    client: Client, merchant: Merchant, foreign_id: str, **fields: Any
) -> dict[str, Any]:
    """A type-3 BTC invoice (address assigned at creation) unless fields say otherwise."""
    payload = {**create_payload(foreign_id, sender_currency="BTC"), **fields}
    status, body = await merchant_post(client, merchant, "/api/v2/invoices/create", payload)
    assert status == 200, body
    return body["data"]  # type: ignore[no-any-return]


async def status_of(client: Client, merchant: Merchant, foreign_id: str) -> dict[str, Any]:
    status, body = await merchant_post(
        client, merchant, "/api/v2/invoices/status", {"foreign_id": foreign_id}
    )
    assert status == 200, body
    return body["data"]  # type: ignore[no-any-return]


async def send(client: Client, payload: dict[str, Any]) -> None:
    status, body = await processing_post(client, payload)
    assert status == 200, body


# --------------------------------------------------------------------------- the receiver


async def test_accepted_callback_is_queued(client: Client, redis: aioredis.Redis) -> None:
    """A valid signed callback answers 200 only with its update in the stream."""
    status, body = await processing_post(client, deposit("bc1qnobody", "0.1"))
    assert status == 200
    assert body["data"]["queued"] == 1
    assert await stream_backlog(redis) == 1


@pytest.mark.parametrize("ids", [[], ["1800000000000-0"], ["1800000000000-0", "1800000000001-12"]])
def test_queued_answer_is_the_json_answer(ids: list[str]) -> None:
    """The pre-worded 200 is byte for byte what `data()` (json.dumps) answers."""
    fast, chain = queued_answer(ids), data({"queued": len(ids), "ids": ids})
    assert fast.body == chain.body
    assert json.loads(cast(bytes, fast.body)) == {"data": {"queued": len(ids), "ids": ids}}
    assert fast.headers["Content-Type"] == chain.headers["Content-Type"]
    assert fast.status == chain.status == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Processing-Key": PROCESSING_KEY},
        {"X-Processing-Key": PROCESSING_KEY, "X-Processing-Signature": "0" * 128},
        {"X-Processing-Key": "other", "X-Processing-Signature": "<good>"},
    ],
    ids=["missing-signature", "wrong-signature", "wrong-key"],
)
async def test_bad_signature_queues_nothing(
    client: Client, redis: aioredis.Redis, headers: dict[str, str]
) -> None:
    """403 bad_header_signature, and the stream stays empty."""
    body = json.dumps(deposit("bc1qx", "0.1")).encode()
    if headers.get("X-Processing-Signature") == "<good>":
        headers = {**headers, "X-Processing-Signature": sign(PROCESSING_SECRET, body)}
    response = await client.post(
        "/api/v2/processing/callbacks",
        data=body,
        headers={"Content-Type": "application/json", **headers},
    )
    assert response.status == 403
    assert await response.json() == {
        "error": "Bad signature header",
        "code": "bad_header_signature",
    }
    assert await stream_backlog(redis) == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"status": "mined"}, "status"),
        ({"compliance": "maybe"}, "compliance"),
        ({"transactions": []}, "transactions"),
        ({"observed_at": -5}, "observed_at"),
        (
            {"transactions": [{"id": 1, "currency": "BTC", "address": "a", "txid": "t"}]},
            "transactions.0.amount",
        ),
        (
            {
                "transactions": [
                    {"id": 1, "currency": "BTC", "address": "a", "txid": "t", "amount": "1e400"}
                ]
            },
            "transactions.0.amount",
        ),
        (
            {
                "transactions": [
                    {
                        "id": 1,
                        "currency": "BTC",
                        "address": "a",
                        "txid": "t",
                        "amount": "1",
                        "confirmations": "-1",
                    }
                ]
            },
            "transactions.0.confirmations",
        ),
        (
            {
                "transactions": [
                    {"id": 0, "currency": "BTC", "address": "a", "txid": "t", "amount": "1"}
                ]
            },
            "transactions.0.id",
        ),
    ],
)
async def test_wrong_shape_is_a_field_error(
    client: Client, redis: aioredis.Redis, change: dict[str, Any], field: str
) -> None:
    """400 with the offending field named, and nothing queued."""
    status, body = await processing_post(client, {**deposit("bc1qx", "0.1"), **change})
    assert status == 400
    assert field in body["errors"], body
    assert await stream_backlog(redis) == 0


async def test_bad_json_and_oversize_queue_nothing(client: Client, redis: aioredis.Redis) -> None:
    """Broken JSON is 400 bad_content_format, a body over 64 KiB is 413; nothing queued."""
    body = b"{broken"
    response = await client.post(
        "/api/v2/processing/callbacks",
        data=body,
        headers=signed_headers(PROCESSING_KEY, PROCESSING_SECRET, body),
    )
    assert (response.status, await response.json()) == (
        400,
        {"error": "Bad content format", "code": "bad_content_format"},
    )
    big = json.dumps({**deposit("bc1qx", "0.1"), "padding": "x" * 70_000}).encode()
    response = await client.post(
        "/api/v2/processing/callbacks",
        data=big,
        headers=signed_headers(PROCESSING_KEY, PROCESSING_SECRET, big),
    )
    assert response.status == 413
    assert await stream_backlog(redis) == 0


# --------------------------------------------------------------------------- applying


async def test_full_payment_confirms_and_credits(
    client: Client, merchant: Merchant, ingest: Ingest, redis: aioredis.Redis
) -> None:
    """Mempool → processing (24 h window from observed_at); confirmed → credited minus 1 % fee."""
    invoice = await new_invoice(client, merchant, "paid")
    address, amount = invoice["address"], invoice["sender_amount"]
    seen_at = invoice["fixed_at"] + 60
    await send(client, deposit(address, amount, tx_id=7, observed_at=seen_at))
    await drain(ingest)
    data = await status_of(client, merchant, "paid")
    assert data["status"] == "processing"
    assert data["expires_at"] == seen_at + 86_400
    assert data["currency_sent"]["remaining_amount"] == "0.00000000"
    assert data["transactions"][0]["status"] == "not_confirmed"
    assert data["sequence"] == 1

    await send(
        client,
        deposit(
            address, amount, tx_id=7, status="confirmed", confirmations=3, observed_at=seen_at + 600
        ),
    )
    await drain(ingest)
    data = await status_of(client, merchant, "paid")
    assert data["status"] == "confirmed"
    assert data["fees"] == [
        {"type": "fee_crypto_deposit", "currency": "EUR", "amount": "1.06750000"}
    ]
    assert data["transactions"][0]["confirmations"] == "3"
    assert data["sequence"] == 2
    _, balances = await merchant_post(client, merchant, "/api/v2/accounts/list", {})
    by_currency = {a["currency"]: a for a in balances["data"]}
    assert by_currency["EUR"] == {"currency": "EUR", "type": "fiat", "balance": "105.68250000"}
    assert by_currency["BTC"]["balance"] == "0.00000000"
    ledger = [parse_ledger_line(e) for e in await redis.lrange(keys.ledger(merchant.key), 0, -1)]
    assert [(e.invoice_id, e.kind, e.currency, e.amount) for e in ledger] == [
        (invoice["id"], "credit", "EUR", Decimal("106.75")),
        (invoice["id"], "fee_crypto_deposit", "EUR", Decimal("-1.0675")),
    ]
    assert int(await redis.hget(keys.delivery(invoice["id"]), "seq")) == 2


async def test_redelivered_updates_change_nothing(
    client: Client, merchant: Merchant, ingest: Ingest, redis: aioredis.Redis
) -> None:
    """The same updates sent again, in any order, leave state, ledger and outbox unchanged."""
    invoice = await new_invoice(client, merchant, "again")
    address, amount = invoice["address"], invoice["sender_amount"]
    updates = [
        deposit(address, amount, tx_id=9, observed_at=invoice["fixed_at"] + 5),
        deposit(
            address,
            amount,
            tx_id=9,
            status="confirmed",
            confirmations=2,
            observed_at=invoice["fixed_at"] + 9,
        ),
    ]
    for update in updates:
        await send(client, update)
    await drain(ingest)
    before = (
        await redis.get(keys.invoice(invoice["id"])),
        await redis.hgetall(keys.balance(merchant.key)),
        await redis.llen(keys.ledger(merchant.key)),
        await redis.hgetall(keys.delivery(invoice["id"])),
    )
    for update in updates[::-1] * 3:
        await send(client, update)
    await drain(ingest)
    after = (
        await redis.get(keys.invoice(invoice["id"])),
        await redis.hgetall(keys.balance(merchant.key)),
        await redis.llen(keys.ledger(merchant.key)),
        await redis.hgetall(keys.delivery(invoice["id"])),
    )
    assert after == before
    assert ingest.stats.unchanged == 6
    assert await stream_backlog(redis) == 0  # applied entries are deleted


async def test_instalments_each_get_a_callback(
    client: Client, merchant: Merchant, ingest: Ingest, redis: aioredis.Redis
) -> None:
    """good_until_expired: two parts; remaining drops, then the second covers → processing."""
    invoice = await new_invoice(client, merchant, "parts", type="good_until_expired")
    address = invoice["address"]
    total = Decimal(invoice["sender_amount"])
    part = (total / 2).quantize(Decimal("0.00000001"))
    await send(client, deposit(address, str(part), tx_id=1, observed_at=invoice["fixed_at"] + 1))
    await drain(ingest)
    data = await status_of(client, merchant, "parts")
    assert data["status"] == "pending"
    assert Decimal(data["currency_sent"]["remaining_amount"]) == total - part
    assert data["sequence"] == 1
    await send(
        client, deposit(address, str(total - part), tx_id=2, observed_at=invoice["fixed_at"] + 2)
    )
    await drain(ingest)
    data = await status_of(client, merchant, "parts")
    assert data["status"] == "processing"
    assert data["sequence"] == 2
    assert [t["id"] for t in data["transactions"]] == [1, 2]


async def test_fill_or_kill_underpayment_fails_at_once(
    client: Client, merchant: Merchant, ingest: Ingest, redis: aioredis.Redis
) -> None:
    """A confirmed part payment, nothing else in flight: failed at once, payback guideline."""
    invoice = await new_invoice(client, merchant, "short")
    await send(
        client,
        deposit(
            invoice["address"],
            "0.0001",
            tx_id=3,
            status="confirmed",
            observed_at=invoice["fixed_at"] + 1,
        ),
    )
    await drain(ingest)
    data = await status_of(client, merchant, "short")
    assert (data["status"], data["error"]) == ("failed", "User paid less than requested.")
    mail = json.loads(await redis.hget(keys.mails(invoice["id"]), "underpaid"))
    assert mail["kind"] == "payback_guideline"
    assert mail["received"] == "0.00010000"
    assert (
        await redis.zscore(keys.mail_due_of(invoice["id"]), f"{invoice['id']}:underpaid")
        is not None
    )


async def test_compliance_flag_fails_with_refund_claim(
    client: Client, merchant: Merchant, ingest: Ingest, redis: aioredis.Redis
) -> None:
    """A flagged transaction while pending fails the invoice; the customer gets a refund claim."""
    invoice = await new_invoice(client, merchant, "flagged")
    await send(
        client,
        deposit(
            invoice["address"],
            invoice["sender_amount"],
            tx_id=4,
            compliance="flagged",
            observed_at=invoice["fixed_at"] + 1,
        ),
    )
    await drain(ingest)
    data = await status_of(client, merchant, "flagged")
    assert (data["status"], data["error"]) == ("failed", "Transaction flagged by compliance.")
    assert data["transactions"][0]["compliance"] == "flagged"
    assert (
        json.loads(await redis.hget(keys.mails(invoice["id"]), "compliance"))["kind"]
        == "refund_claim"
    )


async def test_late_payment_is_recorded_with_status_unchanged(
    client: Client, merchant: Merchant, ingest: Ingest, redis: aioredis.Redis
) -> None:
    """A payment to a cancelled invoice is recorded and called back; the status stays failed."""
    invoice = await new_invoice(client, merchant, "late")
    await merchant_post(client, merchant, "/api/v2/invoices/late/cancel/", {})
    await send(
        client,
        deposit(
            invoice["address"],
            "0.5",
            tx_id=5,
            status="confirmed",
            observed_at=invoice["fixed_at"] + 1,
        ),
    )
    await drain(ingest)
    data = await status_of(client, merchant, "late")
    assert (data["status"], data["error"]) == ("failed", "Cancelled by customer")
    assert data["transactions"][0]["status"] == "confirmed"
    assert data["sequence"] == 2
    assert (
        json.loads(await redis.hget(keys.mails(invoice["id"]), "late:5"))["kind"]
        == "payback_guideline"
    )
    assert await redis.hgetall(keys.balance(merchant.key)) == {}


async def test_update_observed_before_expiry_counts_in_time(
    client: Client, merchant: Merchant, ingest: Ingest
) -> None:
    """observed_at before expires_at counts even when applied after it; at or after, it is late."""
    on_time = await new_invoice(client, merchant, "ontime")
    await send(
        client,
        deposit(
            on_time["address"],
            on_time["sender_amount"],
            tx_id=11,
            observed_at=on_time["release_at"] - 1,
        ),
    )
    too_late = await new_invoice(client, merchant, "toolate")
    await send(
        client,
        deposit(
            too_late["address"],
            too_late["sender_amount"],
            tx_id=12,
            observed_at=too_late["release_at"],
        ),
    )
    await drain(ingest)
    assert (await status_of(client, merchant, "ontime"))["status"] == "processing"
    data = await status_of(client, merchant, "toolate")
    assert (data["status"], data["error"]) == ("failed", "Timer expired. User not paid.")
    assert data["transactions"][0]["amount"] == too_late["sender_amount"]


async def test_orphan_deposit_is_kept(
    client: Client, ingest: Ingest, redis: aioredis.Redis
) -> None:
    """A deposit to an address no invoice owns is answered 200 and kept for operators."""
    await send(client, deposit("bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu", "0.2", tx_id=77))
    await send(client, deposit("bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu", "0.2", tx_id=77))
    await drain(ingest)
    orphans = await redis.hgetall(keys.ORPHANS)
    assert list(orphans) == [b"77:not_confirmed:0:clear"]
    assert ingest.stats.orphans == 2


async def test_deposit_to_an_address_claimed_by_a_lost_confirm_is_an_orphan(
    client: Client, merchant: Merchant, service: InvoiceService, ingest: Ingest
) -> None:
    """An owner key whose commit never happened (a lost confirm race) does not pay that invoice."""
    invoice = await new_invoice(client, merchant, "lost", timer=False)
    claimed = "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"
    # The claim is written before the commit that would assign the address; that commit lost.
    await service.store.claim_address(invoice["id"], "BTC", claimed)
    await send(client, deposit(claimed, "0.2", tx_id=78))
    await drain(ingest)
    assert ingest.stats.orphans == 1
    data = await status_of(client, merchant, "lost")
    assert (data["status"], data["transactions"]) == (invoice["status"], [])


async def test_address_spelling_is_normalized(
    client: Client, merchant: Merchant, ingest: Ingest
) -> None:
    """An upper-case bech32 address reaches the invoice that owns its lower-case form."""
    invoice = await new_invoice(client, merchant, "upper")
    await send(
        client,
        deposit(
            invoice["address"].upper(),
            invoice["sender_amount"],
            tx_id=13,
            observed_at=invoice["fixed_at"] + 1,
        ),
    )
    await drain(ingest)
    assert (await status_of(client, merchant, "upper"))["status"] == "processing"


async def test_dead_consumers_entries_are_reclaimed(
    client: Client, merchant: Merchant, service: InvoiceService, redis: aioredis.Redis
) -> None:
    """Entries a consumer took but never acknowledged are applied by another one."""
    invoice = await new_invoice(client, merchant, "reclaim")
    await send(
        client,
        deposit(
            invoice["address"],
            invoice["sender_amount"],
            tx_id=21,
            observed_at=invoice["fixed_at"] + 1,
        ),
    )
    app_redis = client.server.app[appkeys.REDIS]
    await ensure_group(app_redis)
    partition = keys.address_partition("BTC", invoice["address"])
    stream = keys.updates(partition)
    taken = await app_redis.xreadgroup(keys.UPDATES_GROUP, "crashed", {stream: ">"}, count=10)
    assert taken  # the crashed consumer took the entry and then died
    survivor = Ingest(app_redis, service, consumer="survivor", reclaim_idle_ms=0)
    assert await survivor.reclaim(partition) == 1
    assert (await status_of(client, merchant, "reclaim"))["status"] == "processing"
    assert await redis.xpending(stream, keys.UPDATES_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_many_invoices_in_one_batch(
    client: Client, merchant: Merchant, ingest: Ingest, redis: aioredis.Redis
) -> None:
    """One batch spanning 30 invoices applies each invoice's updates in order."""
    invoices = [await new_invoice(client, merchant, f"batch-{i}") for i in range(30)]
    for n, inv in enumerate(invoices):
        await send(
            client,
            deposit(
                inv["address"], inv["sender_amount"], tx_id=100 + n, observed_at=inv["fixed_at"] + 1
            ),
        )
        await send(
            client,
            deposit(
                inv["address"],
                inv["sender_amount"],
                tx_id=100 + n,
                status="confirmed",
                observed_at=inv["fixed_at"] + 2,
            ),
        )
    assert await drain(ingest) == 60
    for inv in invoices:
        stored = decode_stored(await redis.get(keys.invoice(inv["id"])))
        assert stored.invoice.status.value == "confirmed"
    balances = await redis.hgetall(keys.balance(merchant.key))
    assert Decimal(balances[b"EUR"].decode()) == 30 * (Decimal("106.75") - Decimal("1.0675"))


async def test_timer_expires_an_unpaid_invoice(
    client: Client, merchant: Merchant, service: InvoiceService, redis: aioredis.Redis
) -> None:
    """The sweep fails an invoice whose expires_at + grace passed, and removes its timer."""
    invoice = await new_invoice(client, merchant, "expire")
    assert (
        await redis.zscore(keys.timers_of(invoice["id"]), invoice["id"])
        == invoice["release_at"] + 30
    )
    clock = service.clock
    service.clock = lambda: invoice["release_at"] + 29
    try:
        assert await service.fire_due_timers() == 0
        service.clock = lambda: invoice["release_at"] + 30
        assert await service.fire_due_timers() == 1
        assert await service.fire_due_timers() == 0  # a second sweep finds nothing
    finally:
        service.clock = clock
    data = await status_of(client, merchant, "expire")
    assert (data["status"], data["error"]) == ("failed", "Timer expired. User not paid.")
    assert await redis.zscore(keys.timers_of(invoice["id"]), invoice["id"]) is None


async def test_a_stray_timer_entry_heals_itself(
    client: Client, merchant: Merchant, service: InvoiceService, redis: aioredis.Redis
) -> None:
    """A timer entry earlier than its invoice's deadline changes nothing and is reset to it."""
    invoice = await new_invoice(client, merchant, "stray")
    await redis.zadd(keys.timers_of(invoice["id"]), {str(invoice["id"]): 1})
    assert await service.fire_due_timers() == 0
    assert (
        await redis.zscore(keys.timers_of(invoice["id"]), invoice["id"])
        == invoice["release_at"] + 30
    )
    assert (await status_of(client, merchant, "stray"))["status"] == "pending"


async def test_racing_timer_sweeps_fire_each_timer_once(
    client: Client,
    merchant: Merchant,
    service: InvoiceService,
    redis: aioredis.Redis,
    ingest: Ingest,
) -> None:
    """Five sweeps at once over 20 due invoices: each fails once, one callback, one e-mail."""
    invoices = [
        await new_invoice(client, merchant, f"due-{n}", type="good_until_expired")
        for n in range(20)
    ]
    for n, inv in enumerate(invoices):  # a part payment, so expiry also owes an e-mail
        await send(
            client,
            deposit(inv["address"], "0.00000100", tx_id=500 + n, observed_at=inv["fixed_at"] + 1),
        )
    await drain(ingest)
    clock = service.clock
    service.clock = lambda: max(inv["release_at"] for inv in invoices) + 30
    try:
        fired = await asyncio.gather(*(service.fire_due_timers() for _ in range(5)))
    finally:
        service.clock = clock
    assert sum(fired) == 20
    for inv in invoices:
        data = await status_of(client, merchant, inv["foreign_id"])
        assert (data["status"], data["error"], data["sequence"]) == (
            "failed",
            "Timer expired. User paid less than requested.",
            2,
        )
        assert list(await redis.hkeys(keys.mails(inv["id"]))) == [b"timer_underpaid"]
    assert await count_due(redis, keys.mail_due, float("inf")) == 20
    assert await count_due(redis, keys.timers, float("inf")) == 0
