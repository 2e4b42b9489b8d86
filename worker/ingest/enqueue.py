"""Appending processing updates to the `cv:updates` stream, concurrent requests sharing round trips.

Every accepted callback must be in the stream before its 200 (spec §8), so
each request waits for its own XADD. Sending each in its own MULTI costs a
Redis round trip and much of the receiver's CPU per request; instead the
requests that arrive while one round trip is in flight go together in the
next MULTI (all or none), and each gets its own entry ids back
(worker/store/batching.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from worker.domain.events import TransactionUpdate
from worker.store import keys
from worker.store.batching import GroupCommit
from worker.store.codec import dump_update

# Requests whose updates go into one MULTI at most; more wait for the next one.
MAX_BATCH = 256


async def enqueue(redis: Redis, payloads: Sequence[bytes]) -> list[str]:
    """Append updates to the stream in one MULTI (all or none); return their entry ids.

    A retry after a lost reply may append them twice; applying is idempotent.
    """
    async with redis.pipeline(transaction=True) as pipe:
        for payload in payloads:
            pipe.xadd(keys.UPDATES, {"u": payload})
        ids = await pipe.execute()
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


class Enqueuer:
    """Appends updates to the `cv:updates` stream for many concurrent requests at once."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._batches: GroupCommit[Sequence[bytes], list[str]] = GroupCommit(
            self._append, MAX_BATCH
        )

    async def enqueue(self, updates: Sequence[TransactionUpdate]) -> list[str]:
        """Append `updates` (all or none); return their entry ids once Redis has them."""
        return await self._batches.submit([dump_update(u) for u in updates])

    async def _append(self, groups: list[Sequence[bytes]]) -> list[list[str]]:
        ids = await enqueue(self.redis, [payload for group in groups for payload in group])
        out, start = [], 0
        for group in groups:
            out.append(ids[start : start + len(group)])
            start += len(group)
        return out
