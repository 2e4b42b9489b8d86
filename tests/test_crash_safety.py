"""Exactly-once effects on at-least-once input, proven with real processes (issue: processing).

Receivers and workers run as separate processes against a real Redis; the
tests duplicate and shuffle updates, race several workers on the same
invoices, kill workers with SIGKILL mid-flow and crash Redis between accept
and apply, then compare everything with the reference model in
tests/scenarios.py. Each test writes what it observed to
test-artifacts/crash-safety.jsonl.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests import processes
from tests.scenarios import body, create_plans, mismatches, reference
from tests.sink import Behaviour, running_sink
from tests.support import create_payload, record_artifact, signed_headers
from worker.app.runtime import invoice_service
from worker.config import Settings
from worker.domain.models import Merchant
from worker.ingest.consumer import ensure_group
from worker.ingest.enqueue import Queued, enqueue, queued
from worker.store import keys
from worker.store.deliveries import delivery_log
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer

pytestmark = pytest.mark.slow


def record(test: str, observed: dict[str, Any]) -> None:
    """Keep what a run observed, for the closing notes and post-mortems."""
    record_artifact("crash-safety", test, observed)


async def test_duplicated_shuffled_updates_from_concurrent_senders(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    settings: Settings,
    merchant: Merchant,
    tmp_path: Path,
) -> None:
    """Each update sent 5 times, shuffled, by 16 senders: invoices, ledger, e-mails as if once."""
    rng = random.Random(5)
    service = invoice_service(redis, settings)
    plans = await create_plans(service, merchant, 40, rng)
    payloads = [body(u) for plan in plans for u in plan.updates for _ in range(5)]
    rng.shuffle(payloads)
    env = processes.child_env(redis_server.url)
    receiver, base = await processes.receiver(env, tmp_path)
    workers = [processes.worker(env, tmp_path, n) for n in range(2)]
    try:
        sent = await processes.send_all(base, payloads, concurrency=16)
        await processes.wait_applied(redis)
    finally:
        for child in [receiver, *workers]:
            child.stop()
    stats = await processes.ingest_stats(redis)
    distinct = sum(len(p.updates) for p in plans)
    record(
        "duplicates",
        {
            "sent": sent["sent"],
            "accepted": len(sent["accepted"]),
            "distinct_updates": distinct,
            **stats,
        },
    )
    assert len(sent["accepted"]) == len(payloads)
    assert await mismatches(redis, merchant, reference(plans, service.policy)) == []
    assert stats["entries"] == len(payloads)
    assert stats["applied"] <= distinct  # a duplicate never counts as a change


@pytest.mark.parametrize("n_workers", [2, 4])
async def test_concurrent_workers_lose_no_update(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    settings: Settings,
    merchant: Merchant,
    tmp_path: Path,
    n_workers: int,
) -> None:
    """N workers apply the same invoices' updates at once: no lost update, no double credit."""
    rng = random.Random(n_workers)
    service = invoice_service(redis, settings)
    plans = await create_plans(service, merchant, 30, rng)
    # Each invoice's updates interleaved with everyone else's, three copies each, queued up
    # front so the workers start together and race on the same invoices.
    payloads = [body(u) for plan in plans for u in plan.updates for _ in range(3)]
    rng.shuffle(payloads)
    await ensure_group(redis)
    for start in range(0, len(payloads), 100):
        await enqueue(redis, [_normalized(p) for p in payloads[start : start + 100]])
    env = processes.child_env(redis_server.url)
    workers = [processes.worker(env, tmp_path, n) for n in range(n_workers)]
    try:
        await processes.wait_applied(redis)
    finally:
        for child in workers:
            child.stop()
    stats = await processes.ingest_stats(redis)
    record(f"workers-{n_workers}", {"queued": len(payloads), **stats})
    assert await mismatches(redis, merchant, reference(plans, service.policy)) == []


def _normalized(payload: bytes) -> Queued:
    """What the receiver would enqueue for a processing callback body."""
    from receiver.api.processing import ProcessingCallback, updates_of

    callback = ProcessingCallback.model_validate_json(payload)
    (update,) = updates_of(callback, 0)
    return queued(update)


async def test_workers_killed_with_sigkill_while_updates_flow(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    settings: Settings,
    merchant: Merchant,
    tmp_path: Path,
) -> None:
    """2,000 updates while workers are SIGKILLed mid-batch: each accepted one takes effect once."""
    rng = random.Random(9)
    service = invoice_service(redis, settings)
    plans = await create_plans(service, merchant, 200, rng)
    payloads = [body(u) for plan in plans for u in plan.updates]
    payloads += rng.choices(payloads, k=2000 - len(payloads))  # duplicates top the flow up to 2,000
    rng.shuffle(payloads)
    env = processes.child_env(redis_server.url)
    receiver, base = await processes.receiver(env, tmp_path)
    workers = [processes.worker(env, tmp_path, n) for n in range(2)]
    kills = mid_batch = queued_directly = 0
    await ensure_group(redis)
    sending = asyncio.create_task(processes.send_all(base, payloads, concurrency=8))
    try:
        while not sending.done():
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            victim = rng.randrange(len(workers))
            # Every other kill waits until the victim holds a batch it has not acknowledged.
            if await processes.kill_holding_entries(redis, workers[victim], wait=kills % 2 == 0):
                mid_batch += 1
            kills += 1
            workers[victim] = processes.worker(env, tmp_path, 10 + kills)
        sent = await sending
        # Workers outpace one receiver, so a kill may not have found one holding a batch.
        # A backlog queued straight into the stream keeps them holding entries; kill then.
        surges = 0
        while mid_batch < 2 and surges < 5:
            surge = [_normalized(p) for p in rng.choices(payloads, k=512)]
            await enqueue(redis, surge)
            surges += 1
            queued_directly += len(surge)
            victim = rng.randrange(len(workers))
            if await processes.kill_holding_entries(redis, workers[victim], wait=True):
                mid_batch += 1
            kills += 1
            workers[victim] = processes.worker(env, tmp_path, 10 + kills)
        await processes.wait_applied(redis, seconds=90)
    finally:
        sending.cancel()
        for child in [receiver, *workers]:
            child.stop()
    stats = await processes.ingest_stats(redis)
    observed = {
        "sent": sent["sent"],
        "accepted": len(sent["accepted"]),
        "kills": kills,
        "kills_holding_unacknowledged_entries": mid_batch,
        "queued_directly": queued_directly,
        "distinct_updates": sum(len(p.updates) for p in plans),
        **stats,
    }
    record("sigkill", observed)
    assert kills >= 3 and mid_batch >= 1
    assert len(sent["accepted"]) == len(payloads)
    assert await mismatches(redis, merchant, reference(plans, service.policy)) == []
    # What the dead workers held was taken over and applied again (a no-op where it had
    # been applied); counters move only with an acknowledgement, so each entry counts once.
    assert stats["reclaimed"] >= 1
    assert stats["entries"] == len(payloads) + queued_directly


async def test_redis_crash_between_accept_and_apply_loses_nothing(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    settings: Settings,
    merchant: Merchant,
    tmp_path: Path,
) -> None:
    """Updates answered 200 survive Redis SIGKILLs (AOF always) before and while workers apply."""
    rng = random.Random(11)
    service = invoice_service(redis, settings)
    plans = await create_plans(service, merchant, 60, rng)
    payloads = [body(u) for plan in plans for u in plan.updates]
    rng.shuffle(payloads)
    first, second = payloads[: len(payloads) // 2], payloads[len(payloads) // 2 :]
    env = processes.child_env(redis_server.url)
    receiver, base = await processes.receiver(env, tmp_path)
    workers: list[processes.Child] = []
    try:
        # Phase 1: accepted while no worker runs, then Redis crashes before anything is applied.
        sent_first = await processes.send_all(base, first, concurrency=8)
        redis_server.restart(kill=True)
        # Phase 2: a worker applies while more arrive and Redis crashes once more mid-flow.
        workers.append(processes.worker(env, tmp_path))
        sending = asyncio.create_task(processes.send_all(base, second, concurrency=8))
        await asyncio.sleep(0.5)
        redis_server.restart(kill=True)
        sent_second = await sending
        await processes.wait_applied(redis, seconds=60)
        assert receiver.alive() and all(w.alive() for w in workers)  # rode out both crashes
    finally:
        for child in [receiver, *workers]:
            child.stop()
    stats = await processes.ingest_stats(redis)
    accepted = len(sent_first["accepted"]) + len(sent_second["accepted"])
    record(
        "redis-restart",
        {
            "sent": len(payloads),
            "accepted": accepted,
            "refused_then_retried": sent_first["refused_then_retried"]
            + sent_second["refused_then_retried"],
            **stats,
        },
    )
    assert accepted == len(payloads)
    assert await mismatches(redis, merchant, reference(plans, service.policy)) == []


async def test_worker_killed_mid_delivery_delivers_later(
    redis: aioredis.Redis, redis_server: RedisServer, settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL while a callback is on the wire: another worker delivers it after the lease."""
    async for sink in running_sink():
        merchant = make_merchant("Shop", sink.url("/shop"))
        await MerchantStore(redis).add(merchant)
        sink.behaviour["/shop"] = Behaviour(delay=3600)  # the first request hangs
        service = invoice_service(redis, settings)
        plans = await create_plans(service, merchant, 1, random.Random(1))
        invoice = await service.cancel(merchant.key, plans[0].invoice.foreign_id)
        env = processes.child_env(redis_server.url, COINVOICE_CALLBACK_TIMEOUT_SECONDS="1")
        first = processes.worker(env, tmp_path, 0)
        try:
            await sink.wait_for(1, seconds=20)
            first.kill()  # mid-delivery: the request is open, nothing recorded
            sink.behaviour["/shop"] = Behaviour()
            second = processes.worker(env, tmp_path, 1)
            try:
                received = await sink.wait_for(2, seconds=30)
            finally:
                second.stop()
        finally:
            first.kill()
        assert [r.json["sequence"] for r in received[:2]] == [invoice.sequence] * 2
        log = await delivery_log(redis, invoice)
        assert log[-1]["state"] == "delivered"
        record("killed-mid-delivery", {"requests": len(received), "sequence": invoice.sequence})


async def test_racing_creates_across_receiver_processes(
    redis: aioredis.Redis, redis_server: RedisServer, merchant: Merchant, tmp_path: Path
) -> None:
    """50 identical creates spread over two receiver processes: one invoice, 49 refusals."""
    env = processes.child_env(redis_server.url)
    first, base_a = await processes.receiver(env, tmp_path)
    second, base_b = await processes.receiver(env, tmp_path)
    payload = json.dumps(create_payload("race", sender_currency="BTC")).encode()
    headers = signed_headers(merchant.key, merchant.secret, payload)

    async def create(session: aiohttp.ClientSession, base: str) -> int:
        async with session.post(
            base + "/api/v2/invoices/create", data=payload, headers=headers
        ) as r:
            return r.status

    try:
        async with aiohttp.ClientSession() as session:
            statuses = await asyncio.gather(
                *(create(session, (base_a, base_b)[n % 2]) for n in range(50))
            )
    finally:
        first.stop()
        second.stop()
    assert sorted(statuses) == [200] + [400] * 49
    assert len([k async for k in redis.scan_iter(match=f"{keys.PREFIX}inv:*")]) == 1
