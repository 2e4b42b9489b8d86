"""Appending processing updates to the `cv:updates` stream, concurrent requests sharing round trips.

Every accepted callback must be in the stream before its 200 (spec §8), so
each request waits for its own XADD. Sending each in its own MULTI costs a
Redis round trip and much of the receiver's CPU per request; instead the
requests that arrive while one round trip is in flight go together in the
next append (append.lua, all or none), and each gets its own entry ids back
(worker/store/batching.py). With COINVOICE_REDIS_MIN_REPLICAS the append is
followed by WAIT on the same connection, so the 200s leave only once the
replicas hold the entries.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from worker.domain.events import TransactionUpdate
from worker.store import keys
from worker.store.batching import GroupCommit
from worker.store.codec import dump_update
from worker.store.connection import acknowledged
from worker.store.scripts import Scripts

# Requests whose updates go into one append at most; more wait for the next one.
MAX_BATCH = 256


async def enqueue(
    redis: Redis, payloads: Sequence[bytes], scripts: Scripts | None = None
) -> list[str]:
    """Append updates to the stream in one step (all or none); return their entry ids.

    Returns once the required replicas hold them (else ReplicationTimeout).
    A retry after a lost reply or a timeout may append them twice; applying
    is idempotent.
    """
    scripts = scripts or Scripts(redis)
    async with redis.pipeline(transaction=False) as pipe:
        await scripts.append(keys=[keys.UPDATES], args=list(payloads), client=pipe)
        [ids] = await acknowledged(redis, pipe)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


class Enqueuer:
    """Appends updates to the `cv:updates` stream for many concurrent requests at once."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._scripts = Scripts(redis)
        self._batches: GroupCommit[Sequence[bytes], list[str]] = GroupCommit(
            self._append, MAX_BATCH
        )

    async def enqueue(self, updates: Sequence[TransactionUpdate]) -> list[str]:
        """Append `updates` (all or none); return their entry ids once Redis has them."""
        return await self._batches.submit([dump_update(u) for u in updates])

    async def _append(self, groups: list[Sequence[bytes]]) -> list[list[str]]:
        payloads = [payload for group in groups for payload in group]
        ids = await enqueue(self.redis, payloads, self._scripts)
        out, start = [], 0
        for group in groups:
            out.append(ids[start : start + len(group)])
            start += len(group)
        return out
