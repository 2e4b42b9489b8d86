"""The Redis client of every process: one Redis or Sentinel, and replica acknowledgements.

`connect(settings)` is the only place a process builds its client (receiver,
worker, CLI); `arq_redis_settings` in worker/app/main.py gives arq the same
target. With Sentinels the client asks them for the current primary whenever
it (re)connects, so after a failover a process finds the new primary by
itself: a command on a dead or demoted primary fails with a connection error,
is retried with capped backoff, and the retry connects to whatever primary
the Sentinels name by then.

`acknowledged(redis, pipe)` runs a pipeline of writes followed by `WAIT`
on the same connection (WAIT counts the replicas that hold *this
connection's* writes) and raises `ReplicationTimeout` when fewer replicas
than `COINVOICE_REDIS_MIN_REPLICAS` confirm in time. The API answers that
with 503 `unavailable`; the caller's retry is harmless.

redis-py annotates many commands (hashes, sets, lists) as `Awaitable[T] | T`
because one signature serves the sync and the async client; `awaited()`
narrows that for mypy --strict without `type: ignore` at every call.
"""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, RedisError, TimeoutError

from worker.config import Settings
from worker.store import keys

T = TypeVar("T")

# A command waits this long for a connection before it counts as failed.
REDIS_CONNECT_TIMEOUT_SECONDS = 2.0
# A Sentinel that does not answer within this many seconds is skipped for the next one.
SENTINEL_TIMEOUT_SECONDS = 0.5
# Idle connections are checked with PING after this many seconds.
REDIS_HEALTH_CHECK_SECONDS = 10
# Retries of a failed command: about 10 s in all, enough for a Redis restart or
# a Sentinel failover (down-after-milliseconds plus the election).
REDIS_RETRIES = 12
# `coinvoice up` writes the embedded Redis URL here (in the data dir), so other commands find it.
REDIS_URL_FILE = "redis.url"


class RedisUrlMissing(RuntimeError):
    """Neither COINVOICE_REDIS_URL, Sentinels nor a running `coinvoice up` names a Redis."""


class ReplicationTimeout(RedisError):
    """Fewer replicas than required confirmed a write in time: a failover could lose it.

    The write may well be on the primary; it is not acknowledged, and the
    caller retries (every acknowledged write is idempotent on retry).
    """

    def __init__(self, required: int, confirmed: int) -> None:
        super().__init__(f"{confirmed} of {required} replicas confirmed the write")
        self.required = required
        self.confirmed = confirmed


class Client(Redis):
    """redis.asyncio.Redis carrying the replica acknowledgements its writes need.

    Kept on the client so every store that writes through it honours them
    without threading a setting through each constructor.
    """

    min_replicas: int = 0
    wait_timeout_ms: int = 1000
    # Sentinel mode: the clients talking to the Sentinels, closed with this one.
    sentinels: list[Redis] = []  # noqa: RUF012 - replaced per instance, never mutated

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.sentinels:
            await sentinel.aclose()


async def awaited(value: Awaitable[T] | T) -> T:
    """Await a redis.asyncio command result typed for both clients."""
    return await cast(Awaitable[T], value)


def redis_url(settings: Settings) -> str:
    """COINVOICE_REDIS_URL, else the embedded Redis of a running `coinvoice up`."""
    if settings.redis_url:
        return settings.redis_url
    state = Path(settings.data_dir) / REDIS_URL_FILE
    if state.exists():
        return state.read_text().strip()
    raise RedisUrlMissing(
        "COINVOICE_REDIS_URL is not set and no `coinvoice up` is running in this folder"
    )


def _options(max_connections: int) -> dict[str, Any]:
    """Connection options shared by both modes: commands ride out a restart or failover."""
    return {
        "max_connections": max_connections,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_SECONDS,
        "health_check_interval": REDIS_HEALTH_CHECK_SECONDS,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=REDIS_RETRIES),
        "retry_on_error": [ConnectionError, TimeoutError],
    }


def connect_url(url: str, *, max_connections: int = 256) -> Client:
    """A client of one Redis by URL (the embedded Redis, tests, benchmarks); no WAIT."""
    client: Client = Client.from_url(url, **_options(max_connections))
    return client


def connect(settings: Settings, *, max_connections: int = 256) -> Client:
    """The client of every process: Sentinel mode when Sentinels are set, else one Redis."""
    if settings.redis_sentinels:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            list(settings.redis_sentinels),
            sentinel_kwargs={
                "socket_timeout": SENTINEL_TIMEOUT_SECONDS,
                "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
            },
        )
        client = cast(
            Client,
            sentinel.master_for(
                settings.redis_sentinel_master, redis_class=Client, **_options(max_connections)
            ),
        )
        client.sentinels = list(sentinel.sentinels)
    else:
        client = connect_url(redis_url(settings), max_connections=max_connections)
    client.min_replicas = settings.redis_min_replicas
    client.wait_timeout_ms = settings.redis_wait_timeout_ms
    return client


def _required(redis: Redis) -> tuple[int, int]:
    """(replicas, timeout ms) a write through `redis` must reach before it counts."""
    if isinstance(redis, Client):
        return redis.min_replicas, redis.wait_timeout_ms
    return 0, 0


async def acknowledged(redis: Redis, pipe: Pipeline) -> list[Any]:
    """Execute `pipe` (transaction=False) and WAIT for the replicas on its connection.

    A pipeline runs on one connection, so the WAIT appended to it counts the
    replicas holding exactly these writes (and everything before them).
    Returns the results of the queued commands; raises ReplicationTimeout
    when too few replicas confirmed.
    """
    replicas, timeout_ms = _required(redis)
    if replicas:
        pipe.wait(replicas, timeout_ms)
    results: list[Any] = await pipe.execute()
    if replicas:
        confirmed = results.pop()
        if not isinstance(confirmed, int) or confirmed < replicas:
            raise ReplicationTimeout(replicas, confirmed if isinstance(confirmed, int) else 0)
    return results


async def replicated(redis: Redis) -> None:
    """Return once the replicas hold every write this process has seen (a fence).

    Before a callback or an e-mail leaves, the state it was rendered from
    must survive a failover, whichever process committed it. WAIT counts
    only the writes of its own connection, so a tiny write (INCR of
    `cv:fence`) issued after the reads carries the primary's replication
    offset past every commit they saw. A no-op without required replicas.
    """
    if _required(redis)[0]:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.incr(keys.FENCE)
            await acknowledged(redis, pipe)
