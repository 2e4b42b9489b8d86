"""Per-second request counters shared by every receiver process (spec §6).

A fixed one-second window counted in Redis, so a limit holds across all
receivers behind the load balancer: one INCR (and EXPIRE) per request, in one
round trip.
"""

from __future__ import annotations

from redis.asyncio import Redis

from worker.store import keys

# A window's counter outlives its second briefly, then Redis drops it.
WINDOW_TTL_SECONDS = 2


async def count_hit(redis: Redis, scope: str, who: str, second: int) -> int:
    """Count one request of `who` in `scope` during `second`; the count so far."""
    key = keys.rate_limit(scope, who, second)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.incr(key)
        pipe.expire(key, WINDOW_TTL_SECONDS)  # (EXPIRE NX would need Redis 7)
        count, _ = await pipe.execute()
    return int(count)
