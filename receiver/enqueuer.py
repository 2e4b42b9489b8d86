"""Stream appends for processing callbacks, with concurrent requests sharing round trips.

Every accepted callback must be in the stream before its 200 (spec §8), so
each request waits for its own XADD. Sending each in its own MULTI costs a
Redis round trip and much of the receiver's CPU per request; instead the
requests that arrive while one round trip is in flight go together in the
next MULTI (all or none), and each gets its own entry ids back
(worker/batching.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from worker.batching import GroupCommit
from worker.ingest import enqueue

# Requests whose updates go into one MULTI at most; more wait for the next one.
MAX_BATCH = 256


class Enqueuer:
    """Appends updates to the `cv:updates` stream for many concurrent requests at once."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._batches: GroupCommit[Sequence[bytes], list[str]] = GroupCommit(
            self._append, MAX_BATCH
        )

    async def enqueue(self, payloads: Sequence[bytes]) -> list[str]:
        """Append `payloads` (all or none); return their entry ids once Redis has them."""
        return await self._batches.submit(payloads)

    async def _append(self, groups: list[Sequence[bytes]]) -> list[list[str]]:
        ids = await enqueue(self.redis, [payload for group in groups for payload in group])
        out, start = [], 0
        for group in groups:
            out.append(ids[start : start + len(group)])
            start += len(group)
        return out
