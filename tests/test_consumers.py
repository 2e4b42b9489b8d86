"""Dead workers leave the updates stream's consumer group, and never with entries pending.

`XGROUP DELCONSUMER` forgets a consumer's pending entries, so a consumer is
removed only once its worker's heartbeat is stale and the others claimed what
it held (worker/ingest/consumer.py, drop_consumer.lua).
"""

from __future__ import annotations

import random
import time
from decimal import Decimal

import pytest
import redis.asyncio as aioredis

from tests.scenarios import create_plans
from worker.domain.events import TransactionUpdate
from worker.domain.models import Compliance, Merchant, TxStatus
from worker.ingest import consumer
from worker.ingest.consumer import Ingest, ensure_group
from worker.ingest.enqueue import enqueue, queued
from worker.services.invoices import InvoiceService
from worker.store import keys

# Every update here goes to one deposit address, hence one partition of the stream.
ADDRESS = "bc1qorphan"
PARTITION = keys.address_partition("BTC", ADDRESS)
STREAM = keys.updates(PARTITION)


async def consumers(redis: aioredis.Redis) -> dict[str, int]:
    """Consumer name → entries pending for it (in the partition of ADDRESS)."""
    found = await redis.xinfo_consumers(STREAM, keys.UPDATES_GROUP)
    return {info["name"].decode(): info["pending"] for info in found}


async def take(redis: aioredis.Redis, consumer: str, count: int) -> None:
    """A consumer in the group that read `count` new updates (it holds them pending)."""
    updates = [
        TransactionUpdate(
            tx_id=n,
            currency="BTC",
            address=ADDRESS,
            amount=Decimal("0.1"),
            txid=f"{n:064x}",
            confirmations=0,
            status=TxStatus.NOT_CONFIRMED,
            compliance=Compliance.CLEAR,
            observed_at=1_800_000_000,
        )
        for n in range(count)
    ]
    await enqueue(redis, [queued(u) for u in updates])
    await ensure_group(redis)
    await redis.xgroup_createconsumer(STREAM, keys.UPDATES_GROUP, consumer)
    if count:
        await redis.xreadgroup(keys.UPDATES_GROUP, consumer, {STREAM: ">"}, count=count)


async def test_a_dead_consumer_is_removed_only_once_its_entries_were_claimed(
    redis: aioredis.Redis, ingest: Ingest
) -> None:
    """A dead worker holding entries stays in the group until they are claimed and applied."""
    await take(redis, "dead-worker", 3)

    assert await ingest.forget_dead_consumers(PARTITION) == 0
    assert (await consumers(redis))["dead-worker"] == 3

    assert await ingest.reclaim(PARTITION) == 3
    assert await ingest.forget_dead_consumers(PARTITION) == 1
    assert "dead-worker" not in await consumers(redis)
    assert await redis.xlen(STREAM) == 0  # applied (kept as orphans) and acknowledged
    assert ingest.stats.orphans == 3


async def test_a_consumer_with_a_fresh_heartbeat_is_kept(
    redis: aioredis.Redis, ingest: Ingest
) -> None:
    """Idle but alive (heartbeat younger than dead_after_seconds): kept; stale: removed."""
    await take(redis, "alive", 0)
    await take(redis, "stale", 0)
    now = time.time()
    await redis.zadd(keys.WORKERS, {"alive": now, "stale": now - ingest.dead_after_seconds - 1})

    assert await ingest.forget_dead_consumers(PARTITION) == 1
    assert set(await consumers(redis)) == {"alive"}


async def test_a_stopping_worker_leaves_the_group_only_holding_nothing(
    redis: aioredis.Redis, ingest: Ingest
) -> None:
    """leave_group refuses while entries are pending for this worker, and succeeds after."""
    await take(redis, ingest.consumer, 2)
    await redis.zadd(keys.WORKERS, {ingest.consumer: time.time()})  # its own heartbeat

    assert await ingest.leave_group() is False
    assert (await consumers(redis))[ingest.consumer] == 2

    entries = await ingest.read(PARTITION, backlog=True)
    await ingest.process(PARTITION, entries)
    assert await ingest.leave_group() is True
    assert await consumers(redis) == {}


async def test_a_dropped_owner_cache_turns_no_update_into_an_orphan(
    ingest: Ingest,
    service: InvoiceService,
    merchant: Merchant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The address-owner cache is dropped whenever it fills; an owner it held when the batch
    was read still counts (bench/soak.py found 54 invoices whose update became an orphan)."""
    monkeypatch.setattr(consumer, "OWNER_CACHE_SIZE", 2)
    plans = await create_plans(service, merchant, 3, random.Random(5))
    first, second, third = (plan.updates[0] for plan in plans)
    assert await ingest._find_owners([first]) == [plans[0].invoice.id]  # now cached

    # One cached address and two new ones: the cache overflows and is dropped.
    owners = await ingest._find_owners([first, second, third])

    assert owners == [plan.invoice.id for plan in plans]
