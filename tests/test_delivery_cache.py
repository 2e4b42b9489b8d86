"""The delivery loop's recent invoices (worker/store/invoices.py RecentInvoices).

A callback of a snapshot this process committed is rendered from memory only
when claim_due.lua saw exactly the bytes this process wrote; anything else
(another process's newer commit, a write a failover took back, a lost
compare-and-set) is read from Redis as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from receiver import appkeys
from tests.sink import Sink, running_sink
from tests.support import (
    create_payload,
    deposit,
    drain,
    make_settings,
    merchant_post,
    processing_post,
)
from worker.app.runtime import invoice_service
from worker.domain.models import Merchant
from worker.domain.snapshot import snapshot
from worker.ingest.consumer import Ingest
from worker.outbox.delivery import Deliverer
from worker.services.invoices import InvoiceService
from worker.store.codec import dump_invoice
from worker.store.invoices import RecentInvoices, Stored, digest
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer

Client = TestClient[Any, Any]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async for running in running_sink():
        yield running


@pytest.fixture
async def deliverer(
    client: Client, service: InvoiceService, redis_server: RedisServer
) -> AsyncIterator[Deliverer]:
    settings = make_settings(redis_server.url, callback_timeout_seconds=2)
    d = Deliverer(client.server.app[appkeys.REDIS], service.store, settings)
    await d.start()
    yield d
    await d.close()


@pytest.fixture
async def other(redis_server: RedisServer) -> AsyncIterator[InvoiceService]:
    """Another worker process's service: its own client, store and (empty) memory."""
    redis = aioredis.Redis.from_url(redis_server.url)
    yield invoice_service(redis, make_settings(redis_server.url))
    await redis.aclose()


class ReadsFromRedis:
    """Records the ids the deliverer's store reads back from Redis."""

    def __init__(self, deliverer: Deliverer) -> None:
        self.ids: list[int] = []
        store = deliverer.store
        get_many = store.get_many

        async def recorded(invoice_ids: Sequence[int]) -> dict[int, Stored]:
            self.ids += invoice_ids
            return await get_many(invoice_ids)

        store.get_many = recorded  # type: ignore[method-assign]


async def _invoice(client: Client, redis: aioredis.Redis, sink: Sink) -> tuple[Merchant, Any]:
    merchant = make_merchant("Shop", sink.url("/shop"))
    await MerchantStore(redis).add(merchant)
    _, created = await merchant_post(
        client,
        merchant,
        "/api/v2/invoices/create",
        create_payload("c1", sender_currency="BTC", type="good_until_expired"),
    )
    return merchant, created["data"]


async def _pay(client: Client, ingest: Ingest, invoice: Any, step: int) -> None:
    payment = deposit(
        invoice["address"], "0.00000001", tx_id=step, observed_at=invoice["fixed_at"] + step
    )
    assert (await processing_post(client, payment))[0] == 200
    await drain(ingest)


async def _deliver(deliverer: Deliverer, sink: Sink, n: int) -> dict[str, Any]:
    assert await deliverer.deliver_due() == 1
    await deliverer.wait_idle()
    got = await sink.wait_for(n)
    body: dict[str, Any] = got[-1].json
    return body


async def _rendered(service: InvoiceService, invoice_id: int) -> bytes:
    stored = await service.store.get(invoice_id)
    assert stored is not None
    return orjson.dumps(snapshot(stored.invoice))


async def test_a_snapshot_committed_here_is_not_read_back(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer, service: InvoiceService
) -> None:
    _, invoice = await _invoice(client, redis, sink)
    await _pay(client, Ingest(deliverer.redis, service, consumer="here"), invoice, 1)
    reads = ReadsFromRedis(deliverer)
    body = await _deliver(deliverer, sink, 1)
    assert reads.ids == []  # from memory
    assert body["sequence"] == 1
    # Byte for byte what the stored invoice renders.
    assert sink.received[-1].body == await _rendered(service, invoice["id"])


async def test_another_process_s_newer_commit_is_read_from_redis(
    client: Client,
    redis: aioredis.Redis,
    sink: Sink,
    deliverer: Deliverer,
    service: InvoiceService,
    other: InvoiceService,
) -> None:
    """This process remembers sequence 1; another committed 2: the merchant gets 2."""
    _, invoice = await _invoice(client, redis, sink)
    await _pay(client, Ingest(deliverer.redis, service, consumer="here"), invoice, 1)
    await _pay(client, Ingest(other.store.redis, other, consumer="there"), invoice, 2)
    assert deliverer.store.recent is not None and other.store.recent is None
    reads = ReadsFromRedis(deliverer)
    body = await _deliver(deliverer, sink, 1)
    assert body["sequence"] == 2
    assert reads.ids == [invoice["id"]]
    assert sink.received[-1].body == await _rendered(service, invoice["id"])
    # And back here: this process's commit (3) comes from memory again.
    await _pay(client, Ingest(deliverer.redis, service, consumer="here"), invoice, 3)
    reads.ids.clear()
    body = await _deliver(deliverer, sink, 2)
    assert body["sequence"] == 3 and reads.ids == []


async def test_the_same_version_with_other_bytes_is_not_used(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer, service: InvoiceService
) -> None:
    """A remembered write Redis does not hold (a failover took it back, another wrote that
    version): same id, same version, same sequence — other bytes, so it is read from Redis."""
    _, invoice = await _invoice(client, redis, sink)
    await _pay(client, Ingest(deliverer.redis, service, consumer="here"), invoice, 1)
    reads = ReadsFromRedis(deliverer)
    stored = await service.store.get(invoice["id"])
    assert stored is not None and deliverer.store.recent is not None
    lost = replace(stored.invoice, foreign_id="not-what-redis-holds")
    deliverer.store.recent.put(lost, stored.version, dump_invoice(lost))
    body = await _deliver(deliverer, sink, 1)
    assert body["foreign_id"] == "c1" and body["sequence"] == 1
    assert reads.ids == [invoice["id"]]


def test_the_memory_is_bounded_and_keeps_the_newest() -> None:
    recent = RecentInvoices(2)
    invoices: list[Any] = []
    for n in range(3):
        invoice: Any = type("I", (), {"id": n})()
        invoices.append(invoice)
        recent.put(invoice, 1, b"x%d" % n)
    assert recent.get(0, digest(1, b"x0")) is None  # the oldest went
    assert recent.get(2, digest(1, b"x2")) is invoices[2]
    assert recent.get(2, digest(2, b"x2")) is None  # another version: not it
    recent.put(invoices[1], 2, b"y")  # again: now the newest
    recent.put(invoices[0], 1, b"x0")
    assert recent.get(1, digest(2, b"y")) is invoices[1]
    assert recent.get(2, digest(1, b"x2")) is None
