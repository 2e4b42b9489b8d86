"""The same behaviour on one Redis and on a Redis Cluster (3 masters + 3 replicas on loopback).

Every test here runs twice, `[redis]` and `[cluster]`: the receiver app, the
stream consumer, the ledger poster, the callback deliverer and the mailer,
built from settings exactly as the processes build them
(COINVOICE_REDIS_URL, or COINVOICE_REDIS_CLUSTER_NODES), go through every
invoice type, racing creates, part payments, over- and underpayment, expiry,
cancel, callbacks with retries, e-mails and balances. On the cluster the
keys must have spread over all three masters.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.crc import key_slot

from receiver import appkeys
from receiver.app import create_app
from tests.cluster import LocalCluster
from tests.scenarios import body, create_plans, mismatches, reference
from tests.sink import Behaviour, Sink, running_sink
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
from worker.app.main import ArqRedisMissing, arq_redis_settings
from worker.config import Settings
from worker.domain.models import Merchant
from worker.domain.prices import Price
from worker.ingest.consumer import Ingest
from worker.mail.loop import Mailer
from worker.mail.transport import MaildirTransport
from worker.outbox.delivery import Deliverer
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.connection import Client as RedisClient
from worker.store.connection import ReplicationTimeout, connect, replicated
from worker.store.deliveries import delivery_log
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.rates import RatesLead, read_prices, source_health
from worker.store.redis_server import RedisServer

Client = TestClient[Any, Any]
SCHEDULE = (60, 300)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One real cluster for the session: 3 masters, each with a replica."""
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("cluster"))).start()
    yield cluster
    cluster.stop()


@dataclass
class Stack:
    """Receiver app, consumer, deliverer and mailer on one backend, with a test clock."""

    backend: str
    cluster: LocalCluster | None
    settings: Settings
    client: Client
    redis: RedisClient
    service: InvoiceService
    ingest: Ingest
    deliverer: Deliverer
    mailer: Mailer
    merchant: Merchant
    sink: Sink
    clock: Clock
    maildir: Path


@pytest.fixture(params=["redis", "cluster"])
async def stack(
    request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Stack]:
    """Everything a deployment runs, on one Redis or on the cluster (spec §11 settings)."""
    options: dict[str, Any] = {
        "callback_retry_schedule": SCHEDULE,
        "callback_timeout_seconds": 2,
        "maildir": tmp_path / "maildir",
    }
    cluster: LocalCluster | None = None
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        settings = make_settings(None, redis_cluster_nodes=cluster.startup_nodes, **options)
    else:
        settings = make_settings(redis_server.url, **options)
    redis = connect(settings)
    await redis.flushall()
    async for sink in running_sink():
        merchant = make_merchant("Shop", sink.url("/shop"))
        await MerchantStore(redis).add(merchant)
        async with TestClient(TestServer(create_app(settings))) as client:
            app_redis = client.server.app[appkeys.REDIS]
            service = client.server.app[appkeys.SERVICE]
            clock = Clock()
            service.clock = clock
            deliverer = Deliverer(app_redis, service.store, settings, clock=clock)
            await deliverer.start()
            mailer = Mailer(
                app_redis, service, settings, transport=MaildirTransport(tmp_path / "maildir")
            )
            try:
                yield Stack(
                    request.param,
                    cluster,
                    settings,
                    client,
                    app_redis,
                    service,
                    Ingest(app_redis, service, consumer="t", reclaim_idle_ms=0),
                    deliverer,
                    mailer,
                    merchant,
                    sink,
                    clock,
                    tmp_path / "maildir",
                )
            finally:
                await deliverer.close()
    await redis.aclose()


async def create(s: Stack, foreign_id: str, **fields: Any) -> tuple[int, Any]:
    return await merchant_post(
        s.client, s.merchant, "/api/v2/invoices/create", {**create_payload(foreign_id), **fields}
    )


async def created(s: Stack, foreign_id: str, **fields: Any) -> dict[str, Any]:
    """Create an invoice that must be accepted; its data."""
    status, answer = await create(s, foreign_id, **fields)
    assert status == 200, answer
    return answer["data"]  # type: ignore[no-any-return]


async def status_of(s: Stack, foreign_id: str) -> dict[str, Any]:
    status, data = await merchant_post(
        s.client, s.merchant, "/api/v2/invoices/status", {"foreign_id": foreign_id}
    )
    assert status == 200, data
    return data["data"]  # type: ignore[no-any-return]


async def confirm(s: Stack, invoice: dict[str, Any], **fields: Any) -> dict[str, Any]:
    token = str(invoice["url"]).rsplit("/", 1)[1]
    response = await s.client.post(
        f"/api/v2/public/invoices/{token}/confirm",
        data=json.dumps(fields),
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 200, await response.text()
    return (await response.json())["data"]  # type: ignore[no-any-return]


async def process(s: Stack, payload: bytes) -> None:
    """POST a signed processing callback to the receiver; it must be accepted."""
    response = await s.client.post(
        "/api/v2/processing/callbacks",
        data=payload,
        headers=signed_headers(PROCESSING_KEY, PROCESSING_SECRET, payload),
    )
    assert response.status == 200, await response.text()


async def test_payment_scenarios_end_as_the_reference_and_spread_over_masters(
    stack: Stack,
) -> None:
    """Full, under-, over-, flagged and part payments, each update twice, shuffled: as once."""
    rng = random.Random(12)
    plans = await create_plans(stack.service, stack.merchant, 25, rng)
    payloads = [body(u) for plan in plans for u in plan.updates for _ in range(2)]
    rng.shuffle(payloads)
    await asyncio.gather(*(process(stack, p) for p in payloads))
    await drain(stack.ingest)
    expected = reference(plans, stack.service.policy)
    assert await mismatches(stack.redis, stack.merchant, expected) == []
    assert await stack.service.store.balances(stack.merchant.key) == expected.balances
    if stack.cluster is not None:
        counts = stack.cluster.key_counts()
        assert len(counts) == 3 and all(n > 0 for n in counts.values()), counts


async def test_racing_creates_make_one_invoice(stack: Stack) -> None:
    """Twenty identical creates at once: one 200, nineteen duplicates, one invoice."""
    results = await asyncio.gather(
        *(create(stack, "race", sender_currency="BTC") for _ in range(20))
    )
    assert sorted(status for status, _ in results) == [200] + [400] * 19
    created = next(data for status, data in results if status == 200)["data"]
    assert (await status_of(stack, "race"))["id"] == created["id"]


async def test_every_invoice_type_confirm_cancel_and_expiry(stack: Stack) -> None:
    """Type 1 and 2 get their address at confirm, type 3 at create; cancel; timer expiry."""
    one = await created(stack, "type1", timer=False)
    assert one["address"] is None
    confirmed = await confirm(stack, one, sender_currency="BTC", email="c@example.com")
    assert confirmed["address"]
    two = await created(stack, "type2")
    assert (await confirm(stack, two, sender_currency="LTC", email="d@example.com"))["address"]
    three = await created(stack, "type3", sender_currency="BTC")
    assert three["address"]
    # A deposit to the type-1 address reaches it: the owner key is in another slot.
    await process(stack, body_for(confirmed["address"], confirmed["sender_amount"], tx_id=31))
    await drain(stack.ingest)
    assert (await status_of(stack, "type1"))["status"] == "confirmed"
    # Credited less the 1 % fee, through the ledger outbox into the merchant's slot.
    assert await stack.service.store.balances(stack.merchant.key) == {
        "EUR": Decimal("105.68250000")
    }

    status, cancelled = await merchant_post(
        stack.client, stack.merchant, "/api/v2/invoices/type3/cancel/", {}
    )
    assert status == 200 and cancelled["data"]["status"] == "failed"
    assert (await status_of(stack, "type3"))["error"] == "Cancelled by customer"

    stack.clock.advance(stack.settings.timer_seconds + stack.settings.expiry_grace_seconds + 1)
    # type2 expires; type1 is paid and type3 cancelled already.
    assert await stack.service.fire_due_timers() == 1
    assert (await status_of(stack, "type2"))["status"] == "failed"


def body_for(address: str, amount: str, tx_id: int) -> bytes:
    """A confirmed deposit's processing callback body."""
    return json.dumps(deposit(address, amount, tx_id=tx_id, status="confirmed")).encode()


async def test_callbacks_retry_and_emails_are_sent(stack: Stack) -> None:
    """A callback refused once is retried on schedule; an underpayment e-mail is sent."""
    stack.sink.behaviour["/shop"] = Behaviour(statuses=[500])
    invoice = await created(stack, "mail", sender_currency="BTC", email_user="c@e.test")
    half = (Decimal(invoice["sender_amount"]) / 2).quantize(Decimal("0.00000001"))
    await process(stack, body_for(invoice["address"], str(half), tx_id=41))
    await drain(stack.ingest)
    assert await stack.deliverer.deliver_due() == 1
    await stack.deliverer.wait_idle()
    stack.clock.advance(SCHEDULE[0])
    assert await stack.deliverer.deliver_due() == 1
    await stack.deliverer.wait_idle()
    stored = await stack.service.by_foreign_id(stack.merchant.key, "mail")
    [attempts] = [row["attempts"] for row in await delivery_log(stack.redis, stored.invoice)]
    assert [a["status_code"] for a in attempts] == [500, 200]
    assert await stack.mailer.send_due() == 1
    assert len(list((stack.maildir / "new").iterdir())) == 1


async def test_refund_page_opens_by_its_token_and_not_by_a_leftover_key(stack: Stack) -> None:
    """The refund token's page opens; an index key its invoice does not hold (lost commit): 404."""
    invoice = await created(stack, "refund", sender_currency="BTC", email_user="c@e.test")
    half = (Decimal(invoice["sender_amount"]) / 2).quantize(Decimal("0.00000001"))
    await process(stack, body_for(invoice["address"], str(half), tx_id=43))
    await drain(stack.ingest)
    stored = await stack.service.by_foreign_id(stack.merchant.key, "refund")
    refund_token = stored.invoice.refund_token
    assert refund_token is not None
    assert (await stack.client.get(f"/refund/{refund_token}")).status == 200
    await stack.service.store.claim_refund_token(stored.invoice.id, "L" * 32)
    assert (await stack.client.get(f"/refund/{'L' * 32}")).status == 404


async def test_live_rates_lead_publish_and_resign(stack: Stack) -> None:
    """rates_lead, rates_publish (lease and table) and rates_resign run in one slot: {rates}."""
    lead, other = RatesLead(stack.redis, "w1"), RatesLead(stack.redis, "w2")
    assert await lead.take(10_000) and not await other.take(10_000)
    price = Price(Decimal("64012.5"), 1_795_703_443, ("bitstamp", "kraken"))
    assert await lead.publish({"BTC": price})
    assert not await other.publish({"BTC": price})  # not the leader: nothing written
    await lead.record_sources({"bitstamp": 1_795_703_443}, {"kraken": "timeout"})
    assert await read_prices(stack.redis) == {"BTC": price}
    [health] = await source_health(stack.redis, ["kraken"])
    assert health.errors == 1
    await lead.resign()
    assert await other.take(10_000)


# --------------------------------------------------------------------------- settings and layout


def test_cluster_nodes_and_partitions_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """COINVOICE_REDIS_CLUSTER_NODES is host:port pairs; COINVOICE_STREAM_PARTITIONS a count."""
    monkeypatch.setenv("COINVOICE_REDIS_CLUSTER_NODES", "10.0.0.1:7000, 10.0.0.2:7001")
    monkeypatch.setenv("COINVOICE_STREAM_PARTITIONS", "32")
    settings = Settings()
    assert settings.redis_cluster_nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert settings.stream_partitions == 32
    monkeypatch.delenv("COINVOICE_STREAM_PARTITIONS")
    assert Settings().stream_partitions == 16  # spec §11 default
    monkeypatch.setenv("COINVOICE_REDIS_CLUSTER_NODES", "10.0.0.1")
    with pytest.raises(ValueError, match="host:port"):
        Settings()


def test_cluster_mode_needs_a_redis_of_its_own_for_arq() -> None:
    """arq speaks to one Redis: cluster mode without COINVOICE_ARQ_REDIS_URL is refused."""
    nodes = "127.0.0.1:7000"
    with pytest.raises(ArqRedisMissing, match="COINVOICE_ARQ_REDIS_URL"):
        arq_redis_settings(make_settings(None, redis_cluster_nodes=nodes))
    settings = make_settings(None, redis_cluster_nodes=nodes, arq_redis_url="redis://10.0.0.9:6390")
    assert (arq_redis_settings(settings).host, arq_redis_settings(settings).port) == (
        "10.0.0.9",
        6390,
    )


@pytest.mark.parametrize("count", [1, 3, 16, 64])
def test_partition_tags_spread_evenly_over_the_slots(count: int) -> None:
    """Partition p's tag hashes into the p-th of `count` equal slot ranges (so, on masters)."""
    for partition in range(count):
        tag = keys._tag(partition, count)
        slot = key_slot(tag.encode())
        assert partition * 16384 // count <= slot < (partition + 1) * 16384 // count
    # With the default 16 and three masters over equal ranges, each master gets 5 or 6.
    per_master = [0, 0, 0]
    for partition in range(16):
        per_master[key_slot(keys._tag(partition, 16).encode()) * 3 // 16384] += 1
    assert sorted(per_master) == [5, 5, 6]


async def test_cluster_writes_wait_for_the_replica_of_every_master(
    redis_cluster: LocalCluster,
) -> None:
    """COINVOICE_REDIS_MIN_REPLICAS=1 on a cluster: a hung replica makes the WAIT fail (503)."""
    settings = make_settings(
        None,
        redis_cluster_nodes=redis_cluster.startup_nodes,
        redis_min_replicas=1,
        redis_wait_timeout_ms=300,
    )
    redis = connect(settings)
    masters = redis_cluster.master_ports()
    replica = next(node for node in redis_cluster.nodes if node.port not in masters)
    assert replica.process is not None
    try:
        await replicated(redis)  # every master's replica answers
        os.kill(replica.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ReplicationTimeout):
                await replicated(redis)
        finally:
            os.kill(replica.process.pid, signal.SIGCONT)
        await replicated(redis)
    finally:
        await redis.aclose()
