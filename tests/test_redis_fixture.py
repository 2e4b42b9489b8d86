"""The test session's Redis is real and persistent."""

from __future__ import annotations

import redis.asyncio as aioredis

from worker.store.redis_server import RedisServer


async def test_redis_survives_a_crash_with_aof(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A write acknowledged before a SIGKILL is there after the restart (AOF always)."""
    await redis.set("cv:probe", "kept")
    redis_server.restart(kill=True)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.get("cv:probe") == b"kept"
    finally:
        await client.aclose()
