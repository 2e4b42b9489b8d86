"""Claiming due work from schedules spread over the partitions (timers, callbacks, mails).

Each partition has its own callback-due and mail-due zset, in the slot of its
invoices (commit.lua writes them in the same step as the state change), so
no single key is hot and a cluster spreads them over its masters. A claim
asks every partition at once (one pipelined round trip, per node on a
cluster) with claim_due.lua's lease, sharing what the caller can take among
the partitions with due work in random order, so no partition starves another.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from redis.asyncio import Redis

from worker.store import keys
from worker.store.scripts import Script, execute

# A claim looks again this often at most when other workers took what it counted.
CLAIM_ROUNDS = 3


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def claim_due(
    redis: Redis,
    script: Script,
    schedule: Callable[[int], str],
    now: float,
    lease_end: float,
    limit: int,
) -> list[str]:
    """Lease up to `limit` due members of every partition's `schedule` until `lease_end`.

    A round is two round trips: count what is due per partition, then claim,
    sharing what is left of `limit` among the partitions in random order (no
    partition starves another, and nothing is claimed that the caller cannot
    take). Another worker may have claimed a partition's members between the
    two; then the next round (at most CLAIM_ROUNDS) looks again.
    """
    claimed: list[str] = []
    for _ in range(CLAIM_ROUNDS):
        left = limit - len(claimed)
        due = await _due_counts(redis, schedule, now)
        order = [p for p, n in enumerate(due) if n]
        if left <= 0 or not order:
            break
        random.shuffle(order)
        shares: dict[int, int] = {}
        for partition in order:
            if left <= 0:
                break
            shares[partition] = min(due[partition], left)
            left -= shares[partition]
        async with redis.pipeline(transaction=False) as pipe:
            for partition, share in shares.items():
                await script(keys=[schedule(partition)], args=[now, lease_end, share], client=pipe)
            replies = await execute(pipe)
        taken = [_text(member) for members in replies for member in members]
        claimed += taken
        if len(taken) == sum(shares.values()):
            break  # got every share: nothing was taken from under us
    return claimed


async def _due_counts(redis: Redis, schedule: Callable[[int], str], now: float) -> list[int]:
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(keys.partitions()):
            pipe.zcount(schedule(partition), "-inf", now)
        return [int(n) for n in await pipe.execute()]


async def count_due(redis: Redis, schedule: Callable[[int], str], now: float) -> int:
    """Members due by `now` over every partition's `schedule`."""
    return sum(await _due_counts(redis, schedule, now))
