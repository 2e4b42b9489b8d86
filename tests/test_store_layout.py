"""The stored layout of issue 14: invoices deflated, lookups in bucketed hashes, the
callback log in the delivery hash; and data written by the layout before it still works.

"Before" is the layout of the previous version: the invoice `{version}:{compact JSON}`,
one string key per lookup (`cv:fid:…`, `cv:tok:…`, `cv:addr:…`), the attempt log in a
list `cv:dlog:…`. `as_written_before` turns an invoice created now into exactly that.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import create_payload, deposit, drain, merchant_post, processing_post
from worker.domain.models import Invoice, Merchant
from worker.ingest.consumer import Ingest
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.codec import dump_invoice_json
from worker.store.deliveries import Outcome, delivery_log, log_entry, record_call
from worker.store.invoices import DuplicateForeignId, InvoiceStore, decode_stored

Client = TestClient[Any, Any]


async def new_invoice(client: Client, merchant: Merchant, foreign_id: str) -> dict[str, Any]:
    payload = create_payload(foreign_id, sender_currency="BTC")
    status, body = await merchant_post(client, merchant, "/api/v2/invoices/create", payload)
    assert status == 200, body
    return body["data"]  # type: ignore[no-any-return]


async def as_written_before(redis: aioredis.Redis, invoice: Invoice) -> None:
    """Rewrite one invoice's keys as the previous version wrote them."""
    assert invoice.address is not None
    raw = await redis.get(keys.invoice(invoice.id))
    version = decode_stored(raw).version
    await redis.set(keys.invoice(invoice.id), b"%d:" % version + dump_invoice_json(invoice))
    lookups = [
        (
            keys.foreign_id_index(invoice.merchant, invoice.foreign_id),
            keys.foreign_id(invoice.merchant, invoice.foreign_id),
        ),
        (keys.token_index(invoice.token), keys.token(invoice.token)),
        (
            keys.address_index(invoice.address.currency, invoice.address.address),
            keys.address(invoice.address.currency, invoice.address.address),
        ),
    ]
    for index, old in lookups:
        assert await redis.hdel(index.key, index.field) == 1
        await redis.set(old, invoice.id)


async def test_an_invoice_written_before_reads_updates_and_stays_unique(
    client: Client,
    merchant: Merchant,
    service: InvoiceService,
    ingest: Ingest,
    redis: aioredis.Redis,
) -> None:
    """Lookups by token, foreign id and address find it; its foreign id and address stay
    taken; a payment applies to it, and its commit writes the current form."""
    created = await new_invoice(client, merchant, "old-1")
    stored = await service.store.get(created["id"])
    assert stored is not None
    invoice = stored.invoice
    assert invoice.address is not None
    await as_written_before(redis, invoice)
    raw = await redis.get(keys.invoice(invoice.id))
    assert raw.startswith(b"1:{")

    store: InvoiceStore = service.store
    assert (await service.by_token(invoice.token)).invoice == invoice
    assert await store.id_by_foreign_id(merchant.key, "old-1") == invoice.id
    assert await store.ids_by_address([("BTC", invoice.address.address), ("BTC", "bc1qnone")]) == [
        invoice.id,
        None,
    ]
    # The foreign id is still taken, by the old key.
    status, body = await merchant_post(
        client, merchant, "/api/v2/invoices/create", create_payload("old-1", sender_currency="BTC")
    )
    assert status == 400, body
    with pytest.raises(DuplicateForeignId) as taken:
        await store.create(
            replace(
                invoice, id=await store.next_id(merchant.key, "old-1"), token="t" * 32, address=None
            )
        )
    assert taken.value.existing_id == invoice.id
    # And the address: another invoice cannot claim it.
    with pytest.raises(RuntimeError, match="owned by invoice"):
        await store.claim_address(invoice.id + 1, "BTC", invoice.address.address)

    # A payment to the old invoice's address is applied to it.
    amount = invoice.sender_amount
    status, body = await processing_post(
        client,
        deposit(invoice.address.address, str(amount), tx_id=71, observed_at=invoice.fixed_at or 0),
    )
    assert status == 200, body
    await drain(ingest)
    after = await store.get(invoice.id)
    assert after is not None and after.version == 2 and after.invoice.status.value == "processing"
    assert (await redis.get(keys.invoice(invoice.id))).startswith(b"2:\x01")


async def test_a_callback_log_written_before_shows_with_new_attempts(
    client: Client, merchant: Merchant, service: InvoiceService, redis: aioredis.Redis
) -> None:
    """`cv:dlog` entries of the previous version come first in the operator views."""
    created = await new_invoice(client, merchant, "old-log")
    stored = await service.store.get(created["id"])
    assert stored is not None
    await redis.hset(keys.delivery(created["id"]), "seq", 1)
    failed = Outcome(503, "", 9, delivered=False)
    await redis.rpush(keys.delivery_log(created["id"]), log_entry(1, 100, failed))
    keys_, args = record_call(created["id"], 1, Outcome(200, "", 4, delivered=True), 160, [60])
    await service.store.scripts.delivery_done(keys=keys_, args=args)
    [row] = await delivery_log(redis, replace(stored.invoice, sequence=1))
    assert row["state"] == "delivered"
    assert [(a["at"], a["status_code"]) for a in row["attempts"]] == [(100, 503), (160, 200)]


async def test_many_lookups_in_one_bucket(
    client: Client,
    merchant: Merchant,
    service: InvoiceService,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With one bucket per partition every lookup shares a few hashes, and with a
    listpack limit of 4 most are hash tables: each entry still finds its own invoice,
    none another's."""
    monkeypatch.setattr(keys, "INDEX_BUCKETS", 1)
    await redis.config_set("hash-max-listpack-entries", 4)
    try:
        await crowded_buckets(client, merchant, service, redis)
    finally:
        await redis.config_set("hash-max-listpack-entries", 512)


async def crowded_buckets(
    client: Client, merchant: Merchant, service: InvoiceService, redis: aioredis.Redis
) -> None:
    created = [await new_invoice(client, merchant, f"crowd-{n}") for n in range(150)]
    store: InvoiceStore = service.store
    stored = await store.get_many([c["id"] for c in created])
    for invoice_id, s in stored.items():
        assert s.invoice.address is not None
        assert await store.id_by_token(s.invoice.token) == invoice_id
        assert await store.id_by_foreign_id(merchant.key, s.invoice.foreign_id) == invoice_id
    pairs = [("BTC", s.invoice.address.address) for s in stored.values() if s.invoice.address]
    assert await store.ids_by_address(pairs) == list(stored)
    buckets = [k async for k in redis.scan_iter(match=f"{keys.PREFIX}toks:*")]
    assert len(buckets) <= keys.partitions()
    assert sum([await redis.hlen(b) for b in buckets]) >= 150
    crowded = {keys.token_index(s.invoice.token).key for s in stored.values()}
    # Most of the 16 buckets hold more than 4 entries: hash tables (the rest listpacks).
    assert b"hashtable" in {await redis.object("encoding", b) for b in crowded}
    # A foreign id in a crowded bucket is still claimed once.
    status, _ = await merchant_post(
        client,
        merchant,
        "/api/v2/invoices/create",
        create_payload("crowd-7", sender_currency="BTC"),
    )
    assert status == 400
    assert await store.id_by_foreign_id(merchant.key, "crowd-150") is None


def test_index_entries_are_short_and_spread() -> None:
    """12-byte fields (a listpack entry stays small), INDEX_BUCKETS buckets per partition."""
    entries = [keys.token_index(f"token-{n}") for n in range(20_000)]
    assert {len(e.field) for e in entries} == {12}
    assert len({e.field for e in entries}) == len(entries)
    per_bucket: dict[str, int] = {}
    for e in entries:
        per_bucket[e.key] = per_bucket.get(e.key, 0) + 1
    assert len(per_bucket) > 0.99 * keys.INDEX_BUCKETS * keys.partitions()
    assert max(per_bucket.values()) < 3 * len(entries) / len(per_bucket)
    # The foreign-id claim shares the slot of the invoice drawn for it (create.lua).
    claim = keys.foreign_id_index("m", "order-1")
    assert keys.partition_tag(keys.foreign_id_partition("m", "order-1")) in claim.key
    assert keys.address_index("BTC", "bc1qx").key.startswith(keys.PREFIX + "addrs:{p")
