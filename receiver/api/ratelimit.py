"""Per-second request limits shared by every receiver process (spec §6).

The counting lives in `worker.store.ratelimits`; this module turns a count
over the limit into the API's 429.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from receiver.api.errors import rate_limited
from worker.store.ratelimits import count_hit


async def check(redis: Redis, scope: str, who: str, limit: int) -> None:
    """Raise the 429 error when `who` exceeded `limit` requests in this second; 0 disables."""
    if limit <= 0:
        return
    if await count_hit(redis, scope, who, int(time.time())) > limit:
        raise rate_limited(retry_after=1)
