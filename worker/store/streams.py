"""The updates stream, in partitions: `cv:updates:{p}` per partition (spec §11).

A processing update goes to the partition of its deposit address
(`keys.address_partition`), so one invoice's updates stay in one partition,
in order. Every partition has the consumer group `cv:appliers`; each worker
reads every partition (worker/ingest/consumer.py), so workers share them and
a dead worker's pending entries are claimed by the others.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from worker.store import keys


async def ensure_group(redis: Redis, partition: int) -> None:
    """Create a partition's consumer group (and stream) unless it exists; from the start."""
    try:
        await redis.xgroup_create(
            keys.updates(partition), keys.UPDATES_GROUP, id="0", mkstream=True
        )
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def ensure_groups(redis: Redis) -> None:
    """Every partition's consumer group."""
    for partition in range(keys.partitions()):
        await ensure_group(redis, partition)


async def stream_backlog(redis: Redis) -> int:
    """Entries in every partition of the updates stream (applied ones are deleted)."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(keys.partitions()):
            pipe.xlen(keys.updates(partition))
        return sum(await pipe.execute())


async def all_entries(redis: Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of every partition still in the stream (operators, tests)."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(keys.partitions()):
            pipe.xrange(keys.updates(partition))
        return [entry for entries in await pipe.execute() for entry in entries]


async def group_consumers(redis: Redis) -> dict[str, int]:
    """Every consumer in any partition's group, with the entries it holds unacknowledged."""
    held: dict[str, int] = {}
    for partition in range(keys.partitions()):
        try:
            rows = await redis.xinfo_consumers(keys.updates(partition), keys.UPDATES_GROUP)
        except ResponseError:  # no group in this partition yet
            continue
        for row in rows:
            name = row["name"].decode() if isinstance(row["name"], bytes) else str(row["name"])
            held[name] = held.get(name, 0) + int(row["pending"])
    return held
