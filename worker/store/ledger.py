"""Balances and the ledger, exactly once, although they live in another slot than invoices.

commit.lua records a transition's ledger entries in the ledger outbox of the
invoice's partition (a stream, same slot, same atomic step as the state
change). `post_ledger` then moves them onto each merchant's balances and
ledger with ledger_apply.lua, in the merchant's slot, and only then deletes
them from the outbox. Going through a partition's outbox oldest first, a
merchant's per-partition mark (the newest entry id applied) makes the move
idempotent: a crash between the two steps, or two workers posting the same
partition, applies every entry once (tests/test_ledger.py, under kill -9 in
tests/test_cluster.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from worker.store import keys
from worker.store.connection import acknowledged, replicated
from worker.store.scripts import Scripts

# Outbox entries taken per partition and round.
POST_BATCH = 512


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Pending:
    """Outbox entries read: per (partition, merchant) the ledger_apply.lua arguments, and the
    entry ids per partition."""

    calls: dict[tuple[int, str], list[str]]
    read: dict[int, list[str]]


async def read_outboxes(redis: Redis, limit: int = POST_BATCH) -> Pending:
    """The oldest `limit` entries of every partition's outbox, grouped per merchant, in order."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(keys.partitions()):
            pipe.xrange(keys.ledger_outbox(partition), "-", "+", count=limit)
        outboxes = await pipe.execute()
    pending = Pending({}, {})
    for partition, entries in enumerate(outboxes):
        for entry_id, fields in entries:
            merchant, ident = _text(fields[b"m"]), _text(entry_id)
            call = pending.calls.setdefault((partition, merchant), [])
            call.extend([ident, _text(fields[b"l"])])
            pending.read.setdefault(partition, []).append(ident)
    return pending


async def apply_entries(redis: Redis, scripts: Scripts, pending: Pending) -> None:
    """Add read entries to the balances and ledgers: one ledger_apply.lua call per merchant
    and partition (skipping what was applied before), then WAIT for the replicas."""
    async with redis.pipeline(transaction=False) as pipe:
        for (partition, merchant), args in pending.calls.items():
            await scripts.ledger_apply(
                keys=[keys.balance(merchant), keys.ledger(merchant), keys.ledger_applied(merchant)],
                args=[partition, *args],
                client=pipe,
            )
        await acknowledged(redis, pipe)


async def post_ledger(redis: Redis, scripts: Scripts, limit: int = POST_BATCH) -> int:
    """Move pending ledger entries of every partition onto the balances; how many were read.

    Three round trips for any number of partitions and merchants: read every
    outbox, apply per merchant and partition, delete what was read. Only
    entries the replicas hold go onto a balance: an entry a failover could
    still take back (with its state change, applied again later under a new
    id) must not; and the balances must be replicated before the entries go.
    """
    pending = await read_outboxes(redis, limit)
    if not pending.read:
        return 0
    await replicated(redis)
    await apply_entries(redis, scripts, pending)
    async with redis.pipeline(transaction=False) as pipe:
        for partition, ids in pending.read.items():
            pipe.xdel(keys.ledger_outbox(partition), *ids)
        await pipe.execute()
    return sum(len(ids) for ids in pending.read.values())


async def pending_entries(redis: Redis) -> int:
    """Ledger entries committed but not yet on the balances (a backlog for /metrics)."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(keys.partitions()):
            pipe.xlen(keys.ledger_outbox(partition))
        return sum(await pipe.execute())
