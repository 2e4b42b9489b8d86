"""Per-second request limits shared by every receiver process (spec §6).

A fixed one-second window counted in Redis, so the limit holds across all
receivers behind the load balancer: one INCR (and EXPIRE on the first hit)
per request, in one round trip.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from receiver.errors import rate_limited
from worker import keys

# A window's counter outlives its second briefly, then Redis drops it.
WINDOW_TTL_SECONDS = 2


async def check(redis: Redis, scope: str, who: str, limit: int) -> None:
    """Raise the 429 error when `who` exceeded `limit` requests in this second; 0 disables."""
    if limit <= 0:
        return
    second = int(time.time())
    key = keys.rate_limit(scope, who, second)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.incr(key)
        pipe.expire(key, WINDOW_TTL_SECONDS)  # (EXPIRE NX would need Redis 7)
        count, _ = await pipe.execute()
    if int(count) > limit:
        raise rate_limited(retry_after=1)
