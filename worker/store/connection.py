"""The Redis client: connection settings and a typing shim for redis-py's asyncio API.

redis-py annotates many commands (hashes, sets, lists) as `Awaitable[T] | T`
because one signature serves the sync and the async client; `awaited()`
narrows that for mypy --strict without `type: ignore` at every call.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

T = TypeVar("T")

# A command waits this long for a connection before it counts as failed.
REDIS_CONNECT_TIMEOUT_SECONDS = 2.0
# Idle connections are checked with PING after this many seconds.
REDIS_HEALTH_CHECK_SECONDS = 10
# Retries of a failed command: about 10 s in all, enough for a Redis restart.
REDIS_RETRIES = 12


async def awaited(value: Awaitable[T] | T) -> T:
    """Await a redis.asyncio command result typed for both clients."""
    return await cast(Awaitable[T], value)


def connect(url: str, *, max_connections: int = 256) -> Redis:
    """A client that rides out a Redis restart: commands retry with capped backoff."""
    client: Redis = Redis.from_url(
        url,
        max_connections=max_connections,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
        health_check_interval=REDIS_HEALTH_CHECK_SECONDS,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=REDIS_RETRIES),
        retry_on_error=[ConnectionError, TimeoutError],
    )
    return client
