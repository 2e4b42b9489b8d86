"""The Redis client of every process: one Redis, Sentinel or a Cluster; replica acknowledgements.

`connect(settings)` is the only place a process builds its client (receiver,
worker, CLI); `arq_redis_settings` in worker/app/main.py gives arq the same
target. With Sentinels the client asks them for the current primary whenever
it (re)connects, so after a failover a process finds the new primary by
itself: a command on a dead or demoted primary fails with a connection error,
is retried with capped backoff, and the retry connects to whatever primary
the Sentinels name by then.

With COINVOICE_REDIS_CLUSTER_NODES the client is redis-py's RedisCluster
(`connect_cluster`): it learns the slot map from any node, sends each command
to its slot's master, follows MOVED after a failover or resharding, and runs
a pipeline as one pipeline per master. Every key name carries a hash tag
(worker/store/keys.py) so each Lua script touches one slot. The code uses
nothing a cluster refuses (MULTI across slots, multi-key commands across
slots): the cluster variant of the scenario tests proves it.

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

from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError, RedisClusterException, RedisError, TimeoutError

from worker.config import Settings
from worker.store import keys, scripts

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


# What a Redis outage, restart or failover raises: redis-py's errors, a cluster's slot map
# briefly missing a slot (SlotNotCoveredError is not a RedisError), socket errors. Loops
# back off and retry on these; the receiver answers 503.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)


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


class ClusterClient(RedisCluster):
    """redis-py's RedisCluster with the replica acknowledgements of `Client`."""

    min_replicas: int = 0
    wait_timeout_ms: int = 1000


def connect_cluster(nodes: Sequence[tuple[str, int]], *, max_connections: int = 256) -> Client:
    """A Redis Cluster client from any reachable nodes (COINVOICE_REDIS_CLUSTER_NODES).

    Typed as `Client`: RedisCluster offers the same command methods, and the
    code keeps to the commands a cluster can route (see the module docstring).
    """
    options = _options(max_connections)
    cluster = ClusterClient(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        max_connections=options["max_connections"],
        socket_connect_timeout=options["socket_connect_timeout"],
        health_check_interval=options["health_check_interval"],
        retry=options["retry"],
        retry_on_error=options["retry_on_error"],
        # A failover takes the cluster-node-timeout plus an election: keep retrying
        # through it (each retry re-reads the slot map) rather than fail at once.
        cluster_error_retry_attempts=REDIS_RETRIES,
    )
    return cast(Client, cluster)


def connect(settings: Settings, *, max_connections: int = 256) -> Client:
    """The client of every process: Cluster, Sentinel, else one Redis (spec §11)."""
    if settings.redis_cluster_nodes:
        client = connect_cluster(settings.redis_cluster_nodes, max_connections=max_connections)
    elif settings.redis_sentinels:
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
    keys.use_partitions(settings.stream_partitions)
    client.min_replicas = settings.redis_min_replicas
    client.wait_timeout_ms = settings.redis_wait_timeout_ms
    return client


def _required(redis: Redis) -> tuple[int, int]:
    """(replicas, timeout ms) a write through `redis` must reach before it counts."""
    if isinstance(redis, Client | ClusterClient):
        return redis.min_replicas, redis.wait_timeout_ms
    return 0, 0


def is_cluster(redis: Redis | RedisCluster) -> bool:
    """Is this a Redis Cluster client?"""
    return isinstance(redis, RedisCluster)


def _fence_key(cluster: RedisCluster, node: ClusterNode) -> str:
    """A key in a slot `node` serves: writing it moves that master's replication offset."""
    for n in range(100_000):
        key = f"{keys.FENCE}:{{f{n}}}"
        if cluster.nodes_manager.get_node_from_slot(key_slot(key.encode())).name == node.name:
            return key
    raise LookupError(f"{node.name} serves no slot")


async def _wait_cluster(cluster: RedisCluster, replicas: int, timeout_ms: int) -> None:
    """WAIT on every master: INCR a key it serves, then WAIT, on one connection per master.

    Every master is fenced, not only those a pipeline wrote to: one round trip
    to each, in parallel, covering every write any process made there before.
    """
    await cluster.initialize()  # a no-op once the slot map is known; a fresh client has none
    masters = cluster.get_primaries()
    async with cluster.pipeline() as pipe:
        for node in masters:
            pipe.execute_command("INCR", _fence_key(cluster, node))
            pipe.execute_command("WAIT", replicas, timeout_ms, target_nodes=node)
        results = await pipe.execute()
    confirmed = min(int(count) for count in results[1::2])
    if confirmed < replicas:
        raise ReplicationTimeout(replicas, confirmed)


async def acknowledged(redis: Redis, pipe: Pipeline) -> list[Any]:
    """Execute `pipe` (transaction=False) and WAIT for the replicas on its connection.

    A pipeline runs on one connection, so the WAIT appended to it counts the
    replicas holding exactly these writes (and everything before them).
    Returns the results of the queued commands; raises ReplicationTimeout
    when too few replicas confirmed.
    """
    replicas, timeout_ms = _required(redis)
    if replicas and is_cluster(redis):
        done = await scripts.execute(pipe)
        await _wait_cluster(cast(RedisCluster, redis), replicas, timeout_ms)
        return done
    if replicas:
        pipe.wait(replicas, timeout_ms)
    results = await scripts.execute(pipe)  # loads scripts a restart forgot (NOSCRIPT)
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
    replicas, timeout_ms = _required(redis)
    if replicas and is_cluster(redis):
        await _wait_cluster(cast(RedisCluster, redis), replicas, timeout_ms)
    elif replicas:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.incr(keys.FENCE)
            await acknowledged(redis, pipe)
