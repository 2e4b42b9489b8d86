"""Replica acknowledgements (spec §11): nothing is answered 200 or sent before the replicas hold it.

A real primary and replica on loopback (tests/replication.py); a replica that
stops answering is SIGSTOPped, like a hung host.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from receiver import appkeys
from receiver.app import create_app
from tests.replication import ReplicatedRedis
from tests.sink import Sink, running_sink
from tests.support import (
    PROCESSING_KEY,
    PROCESSING_SECRET,
    Clock,
    create_payload,
    deposit,
    drain,
    make_settings,
    merchant_post,
    signed_headers,
)
from worker.config import Settings
from worker.domain.money import fmt8
from worker.ingest.consumer import Ingest, ensure_group
from worker.mail.loop import Mailer
from worker.outbox.delivery import Deliverer
from worker.store import keys
from worker.store.connection import ReplicationTimeout, connect, replicated
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.streams import stream_backlog

# WAIT gives up after this long in these tests (milliseconds): short, the replica is stopped.
WAIT_MS = 300


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedRedis]:
    """A primary with one replica, no Sentinels."""
    group = ReplicatedRedis(Path(tmp_path_factory.mktemp("pair")), sentinel_count=0).start()
    yield group
    group.stop()


@pytest.fixture
async def primary(pair: ReplicatedRedis) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the flushed primary (no WAIT of its own)."""
    client = aioredis.Redis.from_url(pair.primary.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def ha_settings(pair: ReplicatedRedis) -> Settings:
    return make_settings(pair.primary.url, redis_min_replicas=1, redis_wait_timeout_ms=WAIT_MS)


@pytest.fixture
async def ha_client(
    primary: aioredis.Redis, ha_settings: Settings
) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(ha_settings))) as client:
        yield client


def test_sentinels_setting_is_read_as_host_port_pairs() -> None:
    """COINVOICE_REDIS_SENTINELS is host:port,host:port; the master name defaults to coinvoice."""
    settings = Settings(redis_sentinels=" 127.0.0.1:26379,sentinel-b:26380 ")
    assert settings.redis_sentinels == (("127.0.0.1", 26379), ("sentinel-b", 26380))
    assert settings.redis_sentinel_master == "coinvoice"
    assert (settings.redis_min_replicas, settings.redis_wait_timeout_ms) == (0, 1000)


@pytest.mark.parametrize("bad", ["127.0.0.1", "host:", "host:port", "host:70000"])
def test_sentinels_setting_refuses_what_is_not_host_port(bad: str) -> None:
    """A Sentinel address without a valid port is a start-up error, not a silent default."""
    with pytest.raises(ValueError, match="host:port"):
        Settings(redis_sentinels=bad)


async def test_processing_callback_is_503_until_a_replica_confirms(
    pair: ReplicatedRedis, primary: aioredis.Redis, ha_client: TestClient[Any, Any]
) -> None:
    """With min replicas 1, a hung replica turns the 200 into 503 unavailable; the retry is 200."""
    body = json.dumps(deposit("bc1qexample", "0.001")).encode()
    headers = signed_headers(PROCESSING_KEY, PROCESSING_SECRET, body)
    path = "/api/v2/processing/callbacks"
    assert (await ha_client.post(path, data=body, headers=headers)).status == 200
    pair.pause(pair.replicas[0])
    try:
        response = await ha_client.post(path, data=body, headers=headers)
        assert response.status == 503
        assert await response.json() == {"error": "Service unavailable", "code": "unavailable"}
        assert int(response.headers["Retry-After"]) >= 1
    finally:
        pair.resume(pair.replicas[0])
    assert (await ha_client.post(path, data=body, headers=headers)).status == 200
    # The unacknowledged append is in the stream too; applying it twice is a no-op.
    assert await stream_backlog(primary) == 3


async def test_create_is_503_without_a_replica_and_its_retry_creates_nothing_twice(
    pair: ReplicatedRedis, primary: aioredis.Redis, ha_client: TestClient[Any, Any]
) -> None:
    """A create not confirmed by a replica is 503; the retry finds the foreign id taken."""
    merchant = make_merchant("Shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(primary).add(merchant)
    pair.pause(pair.replicas[0])
    try:
        status, body = await merchant_post(
            ha_client, merchant, "/api/v2/invoices/create", create_payload("ha-1")
        )
        assert (status, body["code"]) == (503, "unavailable")
        # Its retry may not even say "taken" while the replica could lose the invoice.
        status, body = await merchant_post(
            ha_client, merchant, "/api/v2/invoices/create", create_payload("ha-1")
        )
        assert (status, body["code"]) == (503, "unavailable")
    finally:
        pair.resume(pair.replicas[0])
    status, body = await merchant_post(
        ha_client, merchant, "/api/v2/invoices/create", create_payload("ha-1")
    )
    assert (status, body) == (
        400,
        {"errors": {"foreign_id": "The foreign id has already been taken."}},
    )
    assert len(await primary.keys("cv:inv:*")) == 1  # one invoice, though two ids were drawn


async def test_merchant_add_waits_for_the_replica(
    pair: ReplicatedRedis, primary: aioredis.Redis, ha_settings: Settings
) -> None:
    """`merchant add` through the process client raises ReplicationTimeout on a hung replica."""
    client = connect(ha_settings)
    try:
        await MerchantStore(client).add(make_merchant("A", "http://127.0.0.1:9/a"))
        pair.pause(pair.replicas[0])
        try:
            with pytest.raises(ReplicationTimeout) as raised:
                await MerchantStore(client).add(make_merchant("B", "http://127.0.0.1:9/b"))
            assert (raised.value.required, raised.value.confirmed) == (1, 0)
        finally:
            pair.resume(pair.replicas[0])
    finally:
        await client.aclose()


async def test_fence_covers_writes_of_other_connections(
    pair: ReplicatedRedis, primary: aioredis.Redis, ha_settings: Settings
) -> None:
    """`replicated()` returns only once the replica holds a write another client made."""
    client = connect(ha_settings)
    replica = aioredis.Redis.from_url(pair.replicas[0].url)
    try:
        pair.pause(pair.replicas[0])
        try:
            await primary.set("cv:test:seen", "1")  # another process's commit
            with pytest.raises(ReplicationTimeout):
                await replicated(client)
        finally:
            pair.resume(pair.replicas[0])
        await primary.set("cv:test:seen", "2")
        await replicated(client)
        assert await replica.get("cv:test:seen") == b"2"
    finally:
        await client.aclose()
        await replica.aclose()


async def test_without_min_replicas_nothing_waits(
    pair: ReplicatedRedis, primary: aioredis.Redis
) -> None:
    """The default (0 replicas) never WAITs: a hung replica changes nothing."""
    client = connect(make_settings(pair.primary.url))
    pair.pause(pair.replicas[0])
    try:
        await MerchantStore(client).add(make_merchant("A", "http://127.0.0.1:9/a"))
        await replicated(client)
    finally:
        pair.resume(pair.replicas[0])
        await client.aclose()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async for running in running_sink():
        yield running


async def test_no_callback_leaves_while_no_replica_confirms(
    pair: ReplicatedRedis,
    primary: aioredis.Redis,
    ha_client: TestClient[Any, Any],
    ha_settings: Settings,
    sink: Sink,
) -> None:
    """The delivery loop fences before posting: a hung replica holds the callback back."""
    merchant = make_merchant("Shop", sink.url("/shop"))
    await MerchantStore(primary).add(merchant)
    path = "/api/v2/invoices/create"
    assert (await merchant_post(ha_client, merchant, path, create_payload("cb-1")))[0] == 200
    cancel = "/api/v2/invoices/cb-1/cancel/"
    assert (await merchant_post(ha_client, merchant, cancel, {}))[0] == 200  # sequence 1
    app = ha_client.server.app
    clock = Clock()
    deliverer = Deliverer(app[appkeys.REDIS], app[appkeys.SERVICE].store, ha_settings, clock=clock)
    await deliverer.start()
    try:
        pair.pause(pair.replicas[0])
        try:
            with pytest.raises(ReplicationTimeout):
                await deliverer.deliver_due()
            await deliverer.wait_idle()
            assert sink.received == []
        finally:
            pair.resume(pair.replicas[0])
        clock.advance(60)  # past the lease the refused claim took
        assert await deliverer.deliver_due() == 1
        await deliverer.wait_idle()
        assert [r.json["sequence"] for r in sink.received] == [1]
    finally:
        await deliverer.close()


async def test_worker_batch_stays_pending_while_no_replica_confirms_its_commit(
    pair: ReplicatedRedis, primary: aioredis.Redis, ha_client: TestClient[Any, Any]
) -> None:
    """A commit the replica did not confirm is not acknowledged in the stream: applied again."""
    merchant = make_merchant("Shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(primary).add(merchant)
    payload = create_payload("wk-1", sender_currency="BTC")
    status, body = await merchant_post(ha_client, merchant, "/api/v2/invoices/create", payload)
    assert status == 200, body
    invoice = body["data"]
    update = deposit(invoice["address"], invoice["sender_amount"])
    raw = json.dumps(update).encode()
    headers = signed_headers(PROCESSING_KEY, PROCESSING_SECRET, raw)
    assert (
        await ha_client.post("/api/v2/processing/callbacks", data=raw, headers=headers)
    ).status == 200
    app = ha_client.server.app
    ingest = Ingest(app[appkeys.REDIS], app[appkeys.SERVICE], consumer="t", reclaim_idle_ms=0)
    await ensure_group(primary)
    partition = keys.address_partition("BTC", invoice["address"])
    entries = await ingest.read(partition, backlog=False)
    assert len(entries) == 1
    pair.pause(pair.replicas[0])
    try:
        with pytest.raises(ReplicationTimeout):
            await ingest.process(partition, entries)
    finally:
        pair.resume(pair.replicas[0])
    pending = await primary.xpending(keys.updates(partition), keys.UPDATES_GROUP)
    assert pending["pending"] == 1
    await ingest.process(partition, await ingest.read(partition, backlog=True))
    pending = await primary.xpending(keys.updates(partition), keys.UPDATES_GROUP)
    assert pending["pending"] == 0
    stored = await app[appkeys.SERVICE].store.get(invoice["id"])
    assert stored is not None and stored.invoice.status.value == "processing"


async def test_no_email_leaves_while_no_replica_confirms(
    pair: ReplicatedRedis,
    primary: aioredis.Redis,
    ha_client: TestClient[Any, Any],
    tmp_path: Path,
) -> None:
    """The mail loop fences before sending: a hung replica holds the e-mail back."""
    merchant = make_merchant("Shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(primary).add(merchant)
    payload = create_payload("mail-1", sender_currency="BTC", email_user="buyer@example.com")
    status, body = await merchant_post(ha_client, merchant, "/api/v2/invoices/create", payload)
    assert status == 200, body
    invoice = body["data"]
    app = ha_client.server.app
    service = app[appkeys.SERVICE]
    underpaid = fmt8(Decimal(invoice["sender_amount"]) / 2)
    update = deposit(
        invoice["address"], underpaid, status="confirmed", observed_at=invoice["fixed_at"] + 1
    )
    raw = json.dumps(update).encode()
    headers = signed_headers(PROCESSING_KEY, PROCESSING_SECRET, raw)
    assert (
        await ha_client.post("/api/v2/processing/callbacks", data=raw, headers=headers)
    ).status == 200
    # Half paid and confirmed: the invoice fails and a payback e-mail is due.
    await drain(Ingest(app[appkeys.REDIS], service, consumer="t", reclaim_idle_ms=0))
    settings = make_settings(pair.primary.url, redis_min_replicas=1, maildir=tmp_path / "mail")
    clock = Clock(ahead=3 * 86_400)
    mailer = Mailer(app[appkeys.REDIS], service, settings, clock=clock)
    pair.pause(pair.replicas[0])
    try:
        assert (await mailer.run_pass()).sent == 0
        assert mails(tmp_path / "mail") == []
    finally:
        pair.resume(pair.replicas[0])
    clock.advance(mailer.lease_seconds + 1)
    assert (await mailer.run_pass()).sent == 1
    assert len(mails(tmp_path / "mail")) == 1


def mails(maildir: Path) -> list[Path]:
    """The messages written to a Maildir."""
    return [path for path in maildir.rglob("*") if path.is_file()]


async def test_create_after_the_script_cache_was_emptied_waits_for_the_replica_once(
    primary: aioredis.Redis, ha_client: TestClient[Any, Any]
) -> None:
    """A fresh primary (or one just failed over to) has no scripts: the create's EVALSHA
    fails with NOSCRIPT, the script is loaded and the call sent again, and its WAIT still
    counts the replica (the deployment's first invoice)."""
    merchant = make_merchant("Shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(primary).add(merchant)
    await primary.script_flush()
    status, body = await merchant_post(
        ha_client, merchant, "/api/v2/invoices/create", create_payload("fresh-1")
    )
    assert status == 200, body
    assert len(await primary.keys("cv:inv:*")) == 1
