"""The receiver's stream append (worker/ingest/enqueue.py) on one Redis."""

from __future__ import annotations

from decimal import Decimal

import redis.asyncio as aioredis

from worker.domain.events import TransactionUpdate
from worker.domain.models import Compliance, TxStatus
from worker.ingest.enqueue import enqueue, queued
from worker.store import keys
from worker.store.codec import dump_update


def _update(n: int) -> TransactionUpdate:
    return TransactionUpdate(
        tx_id=n,
        currency="BTC",
        address=f"address-{n}",
        amount=Decimal("0.001"),
        txid=f"{n:064x}",
        confirmations=0,
        status=TxStatus.NOT_CONFIRMED,
        compliance=Compliance.CLEAR,
        observed_at=1_700_000_000,
    )


async def _stored(redis: aioredis.Redis, update: TransactionUpdate, entry_id: str) -> bytes:
    stream = keys.updates(keys.address_partition(update.currency, update.address))
    [(_, fields)] = await redis.xrange(stream, entry_id, entry_id)
    return bytes(fields[b"u"])


async def test_each_update_gets_its_own_entry_in_its_partition(redis: aioredis.Redis) -> None:
    updates = [_update(n) for n in range(1, 41)]
    ids = await enqueue(redis, [queued(u) for u in updates])
    assert len(ids) == len(updates)
    for update, entry_id in zip(updates, ids, strict=True):
        assert await _stored(redis, update, entry_id) == dump_update(update)


async def test_appends_after_redis_forgot_its_scripts(redis: aioredis.Redis) -> None:
    """A restarted Redis has an empty script cache: the append loads the script again."""
    await enqueue(redis, [queued(_update(1))])
    await redis.script_flush()
    update = _update(2)
    [entry_id] = await enqueue(redis, [queued(update)])
    assert await _stored(redis, update, entry_id) == dump_update(update)
