"""Merchant callbacks (spec §9) against a real HTTP endpoint: signatures, retries,
ordering, isolation, dead letters, the delivery log and the destination policy."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from receiver import appkeys
from tests.sink import Behaviour, Sink, running_sink
from tests.support import (
    Clock,
    create_payload,
    deposit,
    drain,
    make_settings,
    merchant_post,
    processing_post,
)
from worker.domain.models import Merchant
from worker.domain.signing import verify
from worker.ingest.consumer import Ingest
from worker.outbox.delivery import (
    PER_MERCHANT_IN_FLIGHT,
    Deliverer,
    DestinationRefused,
    check_destination,
)
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer

Client = TestClient[Any, Any]
SCHEDULE = (60, 300, 600)


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async for running in running_sink():
        yield running


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def deliverer(
    client: Client, service: InvoiceService, redis_server: RedisServer, clock: Clock
) -> AsyncIterator[Deliverer]:
    settings = make_settings(
        redis_server.url, callback_retry_schedule=SCHEDULE, callback_timeout_seconds=2
    )
    d = Deliverer(client.server.app[appkeys.REDIS], service.store, settings, clock=clock)
    await d.start()
    yield d
    await d.close()


async def shop(redis: aioredis.Redis, sink: Sink, path: str = "/shop", **options: Any) -> Merchant:
    merchant = make_merchant("Shop", sink.url(path), **options)
    await MerchantStore(redis).add(merchant)
    return merchant


async def cancelled_invoice(client: Client, merchant: Merchant, foreign_id: str) -> None:
    """An invoice with one snapshot to deliver (sequence 1: failed, cancelled)."""
    status, _ = await merchant_post(
        client, merchant, "/api/v2/invoices/create", create_payload(foreign_id)
    )
    assert status == 200
    status, _ = await merchant_post(client, merchant, f"/api/v2/invoices/{foreign_id}/cancel/", {})
    assert status == 200


async def deliver_once(deliverer: Deliverer) -> int:
    claimed = await deliverer.deliver_due()
    await deliverer.wait_idle()
    return claimed


async def test_callback_is_the_signed_snapshot(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer
) -> None:
    """The body is the §9 snapshot; X-Processing-Signature verifies over the exact bytes."""
    merchant = await shop(redis, sink)
    await cancelled_invoice(client, merchant, "f1")
    assert await deliver_once(deliverer) == 1
    (got,) = await sink.wait_for(1)
    assert verify(merchant.secret, got.body, got.headers["X-Processing-Signature"])
    assert got.headers["X-Processing-Key"] == merchant.key
    body = got.json
    assert (body["foreign_id"], body["status"], body["error"], body["sequence"]) == (
        "f1",
        "failed",
        "Cancelled by customer",
        1,
    )
    assert body["currency_received"] == {"currency": "EUR", "amount": "106.75000000"}
    assert "webhook-signature" not in got.headers  # only for merchants who asked for it
    assert await redis.zscore(keys.delivery_due_of(body["id"]), body["id"]) is None


async def test_standard_webhooks_headers_verify_with_the_official_library(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer, clock: Clock
) -> None:
    """With --standard-webhooks it verifies with `standardwebhooks`; the id survives retries."""
    merchant = await shop(redis, sink, standard_webhooks=True)
    sink.behaviour["/shop"] = Behaviour(statuses=[503])
    await cancelled_invoice(client, merchant, "sw")
    await deliver_once(deliverer)
    clock.advance(SCHEDULE[0])
    await deliver_once(deliverer)
    first, second = await sink.wait_for(2)
    assert merchant.standard_webhooks_secret is not None
    webhook = Webhook(merchant.standard_webhooks_secret)
    for got in (first, second):
        payload = webhook.verify(got.body, {k.lower(): v for k, v in got.headers.items()})
        assert payload["foreign_id"] == "sw"
    assert first.headers["webhook-id"] == second.headers["webhook-id"]


async def test_failure_is_retried_on_the_schedule(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer, clock: Clock
) -> None:
    """A non-2xx answer is retried after schedule[0], then schedule[1]; a 2xx ends it."""
    merchant = await shop(redis, sink)
    sink.behaviour["/shop"] = Behaviour(statuses=[500, 404])
    await cancelled_invoice(client, merchant, "retry")
    await deliver_once(deliverer)
    assert await deliver_once(deliverer) == 0  # not due before its time
    clock.advance(SCHEDULE[0] - 1)
    assert await deliver_once(deliverer) == 0
    clock.advance(1)
    assert await deliver_once(deliverer) == 1
    clock.advance(SCHEDULE[1])
    assert await deliver_once(deliverer) == 1
    assert [r.json["sequence"] for r in await sink.wait_for(3)] == [1, 1, 1]
    status, log = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks", {"foreign_id": "retry"}
    )
    assert status == 200
    (entry,) = log["data"]
    assert entry["state"] == "delivered"
    assert [a["status_code"] for a in entry["attempts"]] == [500, 404, 200]
    assert all(a["duration_ms"] >= 0 and a["at"] > 0 for a in entry["attempts"])


async def test_dead_letter_after_the_schedule_and_redeliver(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer, clock: Clock
) -> None:
    """1 + len(schedule) failures dead-letter the callback; redeliver brings it back."""
    merchant = await shop(redis, sink)
    sink.behaviour["/shop"] = Behaviour(statuses=[500] * (1 + len(SCHEDULE)))
    await cancelled_invoice(client, merchant, "dead")
    await deliver_once(deliverer)
    for delay in SCHEDULE:
        clock.advance(delay)
        assert await deliver_once(deliverer) == 1
    clock.advance(10 * max(SCHEDULE))
    assert await deliver_once(deliverer) == 0
    _, log = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks", {"foreign_id": "dead"}
    )
    assert log["data"][0]["state"] == "dead"
    assert len(log["data"][0]["attempts"]) == 1 + len(SCHEDULE)

    status, answer = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks/redeliver", {"foreign_id": "dead"}
    )
    assert (status, answer["data"]["sequence"]) == (200, 1)
    assert await deliver_once(deliverer) == 1
    received = await sink.wait_for(2 + len(SCHEDULE))
    assert received[-1].json["sequence"] == 1
    _, log = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks", {"foreign_id": "dead"}
    )
    assert log["data"][0]["state"] == "delivered"


async def test_redeliver_without_any_callback_is_refused(
    client: Client, redis: aioredis.Redis, sink: Sink
) -> None:
    """An invoice that never changed has nothing to redeliver: 400 with a clear code."""
    merchant = await shop(redis, sink)
    await merchant_post(client, merchant, "/api/v2/invoices/create", create_payload("fresh"))
    status, body = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks/redeliver", {"foreign_id": "fresh"}
    )
    assert status == 400
    assert body["errors"]["code"] == "nothing_to_redeliver"


async def test_a_retry_carries_the_newest_snapshot(
    client: Client,
    redis: aioredis.Redis,
    sink: Sink,
    deliverer: Deliverer,
    clock: Clock,
    service: InvoiceService,
) -> None:
    """A callback waiting for its retry is superseded: the next attempt carries the newest."""
    merchant = await shop(redis, sink)
    sink.behaviour["/shop"] = Behaviour(statuses=[500])
    _, created = await merchant_post(
        client, merchant, "/api/v2/invoices/create", create_payload("newest", sender_currency="BTC")
    )
    invoice = created["data"]
    ingest = Ingest(client.server.app[appkeys.REDIS], service, consumer="t")
    await processing_post(
        client,
        deposit(invoice["address"], "0.00000100", tx_id=1, observed_at=invoice["fixed_at"] + 1),
    )
    await drain(ingest)
    await deliver_once(deliverer)  # sequence 1 fails
    await processing_post(
        client,
        deposit(invoice["address"], "0.00000200", tx_id=2, observed_at=invoice["fixed_at"] + 2),
    )
    await drain(ingest)  # sequence 2 committed while 1 waits for its retry
    assert await deliver_once(deliverer) == 0  # the retry time is kept
    clock.advance(SCHEDULE[0])
    await deliver_once(deliverer)
    assert [r.json["sequence"] for r in await sink.wait_for(2)] == [1, 2]
    _, log = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks", {"foreign_id": "newest"}
    )
    assert [(e["sequence"], e["state"]) for e in log["data"]] == [
        (1, "superseded"),
        (2, "delivered"),
    ]


async def test_sequences_never_go_backwards(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer, service: InvoiceService
) -> None:
    """Many changes racing deliveries on two delivery loops: each invoice's sequences only grow."""
    merchant = await shop(redis, sink)
    sink.behaviour["/shop"] = Behaviour(delay=0.01)
    invoices = []
    for n in range(5):
        _, created = await merchant_post(
            client,
            merchant,
            "/api/v2/invoices/create",
            create_payload(f"o{n}", sender_currency="BTC", type="good_until_expired"),
        )
        invoices.append(created["data"])
    deliverer.clock = time.time  # real time: both loops run on their own
    other = Deliverer(deliverer.redis, deliverer.store, deliverer.settings)
    await other.start()
    loops = [asyncio.create_task(d.run()) for d in (deliverer, other)]
    ingest = Ingest(client.server.app[appkeys.REDIS], service, consumer="t")
    try:
        for step in range(1, 11):
            for n, inv in enumerate(invoices):
                await processing_post(
                    client,
                    deposit(
                        inv["address"],
                        "0.00000001",
                        tx_id=100 * n + step,
                        observed_at=inv["fixed_at"] + step,
                    ),
                )
            await drain(ingest)
            await asyncio.sleep(0.005)
        # Everyone ends with the final sequence, 10.
        everyone = {f"o{n}" for n in range(5)}
        async with asyncio.timeout(10), sink.arrived:
            await sink.arrived.wait_for(
                lambda: (
                    {r.json["foreign_id"] for r in sink.received if r.json["sequence"] == 10}
                    == everyone
                )
            )
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await other.close()
    by_invoice: dict[str, list[int]] = {}
    for got in sorted(sink.received, key=lambda r: r.at):
        by_invoice.setdefault(got.json["foreign_id"], []).append(got.json["sequence"])
    for sequences in by_invoice.values():
        assert sequences == sorted(sequences), sequences


async def test_a_hanging_merchant_does_not_delay_others(
    client: Client,
    redis: aioredis.Redis,
    sink: Sink,
    redis_server: RedisServer,
    service: InvoiceService,
) -> None:
    """One merchant's endpoint hangs 30 s; another merchant's callbacks still arrive within 2 s."""
    slow = await shop(redis, sink, "/slow")
    fast = await shop(redis, sink, "/fast")
    sink.behaviour["/slow"] = Behaviour(delay=30)
    settings = make_settings(redis_server.url, callback_timeout_seconds=30)
    deliverer = Deliverer(client.server.app[appkeys.REDIS], service.store, settings)
    await deliverer.start()
    loop = asyncio.create_task(deliverer.run())
    try:
        for n in range(PER_MERCHANT_IN_FLIGHT + 10):
            await cancelled_invoice(client, slow, f"slow-{n}")
        await sink.wait_for(PER_MERCHANT_IN_FLIGHT, "/slow")  # its share is now hanging
        started = time.monotonic()
        for n in range(5):
            await cancelled_invoice(client, fast, f"fast-{n}")
        fast_received = await sink.wait_for(5, "/fast", seconds=5)
        delay = max(r.at for r in fast_received) - started
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await deliverer.close()
    assert delay < 2.0, f"fast merchant waited {delay:.2f}s"
    slow_attempts = [r for r in sink.received if r.path == "/slow"]
    assert len(slow_attempts) == PER_MERCHANT_IN_FLIGHT  # the per-merchant cap held


async def test_retry_days_later_needs_no_arq_job(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer, clock: Clock
) -> None:
    """The retry state lives in our own records: due two days later, it is delivered then."""
    merchant = await shop(redis, sink)
    sink.behaviour["/shop"] = Behaviour(statuses=[500])
    await cancelled_invoice(client, merchant, "later")
    deliverer.settings = make_settings(
        deliverer.settings.redis_url or "", callback_retry_schedule=(2 * 86_400,)
    )
    await deliver_once(deliverer)
    assert [k async for k in redis.scan_iter(match="arq:*")] == []
    clock.advance(2 * 86_400 - 1)
    assert await deliver_once(deliverer) == 0
    clock.advance(1)
    assert await deliver_once(deliverer) == 1
    assert [r.headers.get("X-Processing-Key") for r in await sink.wait_for(2)] == [merchant.key] * 2


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/cb",
        "http://10.1.2.3/cb",
        "http://192.168.0.10/cb",
        "http://169.254.169.254/latest",
        "http://[::1]:9/cb",
        "http://[::ffff:127.0.0.1]/cb",
        "ftp://example.com/cb",
    ],
)
def test_private_and_odd_destinations_are_refused(url: str) -> None:
    """Literal private, loopback, link-local and non-http destinations never get a request."""
    with pytest.raises(DestinationRefused):
        check_destination(url, allow_private=False)
    if url.startswith("http"):
        check_destination(url, allow_private=True)  # tests and demos may allow them


async def test_a_name_resolving_to_loopback_is_refused_and_dead_lettered(
    client: Client,
    redis: aioredis.Redis,
    redis_server: RedisServer,
    service: InvoiceService,
    sink: Sink,
) -> None:
    """localhost resolves to loopback: refused without a request, dead at once, redeliverable."""
    port = sink.url("/").split(":")[2].split("/")[0]
    merchant = make_merchant("Local", f"http://localhost:{port}/cb")
    await MerchantStore(redis).add(merchant)
    await cancelled_invoice(client, merchant, "local")
    settings = make_settings(redis_server.url, allow_private_callbacks=False)
    deliverer = Deliverer(client.server.app[appkeys.REDIS], service.store, settings)
    await deliverer.start()
    try:
        await deliver_once(deliverer)
    finally:
        await deliverer.close()
    assert sink.received == []
    _, log = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks", {"foreign_id": "local"}
    )
    (entry,) = log["data"]
    assert entry["state"] == "dead"
    assert "non-public" in entry["attempts"][0]["error"]


async def test_redirects_are_not_followed(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer
) -> None:
    """A 302 is a failed attempt; the redirect target never gets the callback."""
    merchant = await shop(redis, sink)
    sink.behaviour["/shop"] = Behaviour(redirect_to=sink.url("/elsewhere"))
    await cancelled_invoice(client, merchant, "redirect")
    await deliver_once(deliverer)
    await asyncio.sleep(0.1)
    assert [r.path for r in sink.received] == ["/shop"]
    _, log = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks", {"foreign_id": "redirect"}
    )
    assert log["data"][0]["attempts"][0]["status_code"] == 302
    assert log["data"][0]["state"] == "retrying"


async def test_an_endless_response_body_is_not_read(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer
) -> None:
    """A 200 with a body that never ends counts as delivered, and quickly (bounded read)."""
    merchant = await shop(redis, sink)
    sink.behaviour["/shop"] = Behaviour(endless_body=True)
    await cancelled_invoice(client, merchant, "endless")
    started = time.monotonic()
    await deliver_once(deliverer)
    assert time.monotonic() - started < 2.0
    _, log = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks", {"foreign_id": "endless"}
    )
    assert log["data"][0]["state"] == "delivered"


async def test_every_attempt_is_logged_without_secrets(
    client: Client, redis: aioredis.Redis, sink: Sink, deliverer: Deliverer
) -> None:
    """Each attempt logs merchant, invoice, sequence, status code, duration — no body, no secret."""
    merchant = await shop(redis, sink, standard_webhooks=True)
    await cancelled_invoice(client, merchant, "logged")
    with capture_logs() as logs:
        await deliver_once(deliverer)
    (event,) = [e for e in logs if e["event"].startswith("callback_")]
    assert event["event"] == "callback_delivered"
    assert event["merchant"] == merchant.key
    assert event["foreign_id"] == "logged"
    assert event["sequence"] == 1 and event["status_code"] == 200
    assert isinstance(event["duration_ms"], int)
    text = json.dumps(logs, default=str)
    assert merchant.secret not in text
    assert str(merchant.standard_webhooks_secret) not in text
    assert "currency_received" not in text
