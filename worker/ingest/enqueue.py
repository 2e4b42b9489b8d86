"""Appending processing updates to the partitioned updates stream, requests sharing round trips.

Every accepted callback must be in the stream before its 200 (spec §8), so
each request waits for its own XADD. Sending each on its own costs a Redis
round trip and much of the receiver's CPU per request; instead the requests
that arrive while one round trip is in flight go together in the next
append (worker/store/batching.py), and each gets its own entry ids back.

An update goes to the partition of its deposit address (worker/store/streams.py).
On one Redis a flush is a single append_many.lua call over all its
partitions (all or none); on a cluster each partition's share is one
append.lua call (all or none), in one pipeline per node. A flush that fails
part-way answers every request in it with an error, and the caller's retry
appends again: applying is idempotent. With COINVOICE_REDIS_MIN_REPLICAS
the append is followed by WAIT, so the 200s leave only once the replicas hold
the entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import NoScriptError

from worker.domain.events import TransactionUpdate
from worker.store import keys
from worker.store.batching import GroupCommit
from worker.store.codec import dump_update
from worker.store.connection import acknowledged, is_cluster
from worker.store.scripts import Scripts, sha1, source

# append_many.lua, and its EVALSHA name (the SHA-1 of its source, as Redis computes it).
_APPEND_MANY = source("append_many")
_APPEND_MANY_SHA = sha1(_APPEND_MANY)

# Requests whose updates go into one append at most; more wait for the next one.
MAX_BATCH = 256

# An update ready to append: its partition and its encoded form.
Queued = tuple[int, bytes]


def queued(update: TransactionUpdate) -> Queued:
    """An update with the partition of its deposit address."""
    return keys.address_partition(update.currency, update.address), dump_update(update)


async def enqueue(
    redis: Redis, items: Sequence[Queued], scripts: Scripts | None = None
) -> list[str]:
    """Append updates to their partitions (all or none per partition); return their entry ids.

    Returns once the required replicas hold them (else ReplicationTimeout).
    A retry after a lost reply or a timeout may append them twice; applying
    is idempotent.
    """
    scripts = scripts or Scripts(redis)
    by_partition: dict[int, list[int]] = {}
    for index, (partition, _) in enumerate(items):
        by_partition.setdefault(partition, []).append(index)
    try:
        replies = await _append(redis, items, by_partition, scripts)
    except NoScriptError:
        # Redis restarted (or failed over) and forgot the script, so nothing was appended:
        # load it and append.
        await redis.script_load(_APPEND_MANY)
        replies = await _append(redis, items, by_partition, scripts)
    ids = [""] * len(items)
    for indexes, reply in zip(by_partition.values(), replies, strict=True):
        for index, entry_id in zip(indexes, reply, strict=True):
            ids[index] = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return ids


async def _append(
    redis: Redis, items: Sequence[Queued], by_partition: dict[int, list[int]], scripts: Scripts
) -> list[Any]:
    """The entry ids per partition, in `by_partition` order (after a WAIT, if required).

    On one Redis the whole flush is one append_many.lua call, a plain EVALSHA
    (redis-py's own script pipelining would first ask SCRIPT EXISTS, a round
    trip of its own). A Redis Cluster gets one append.lua call per partition
    (each partition's stream in its own slot), in one pipeline per node.
    """
    streams = [keys.updates(partition) for partition in by_partition]
    counts = [len(indexes) for indexes in by_partition.values()]
    payloads = [items[i][1] for indexes in by_partition.values() for i in indexes]
    if not is_cluster(redis) and not getattr(redis, "min_replicas", 0):
        # No WAIT to follow it on the same connection: a single command, without
        # building and parsing a pipeline (a few µs of every request's share).
        ids = await redis.execute_command(  # type: ignore[no-untyped-call]
            "EVALSHA", _APPEND_MANY_SHA, len(streams), *streams, *counts, *payloads
        )
    else:
        async with redis.pipeline(transaction=False) as pipe:
            if isinstance(pipe, ClusterPipeline):
                for partition, indexes in by_partition.items():
                    args = [items[i][1] for i in indexes]
                    await scripts.append(keys=[keys.updates(partition)], args=args, client=pipe)
                return await acknowledged(redis, pipe)
            pipe.execute_command(
                "EVALSHA", _APPEND_MANY_SHA, len(streams), *streams, *counts, *payloads
            )
            [ids] = await acknowledged(redis, pipe)
    replies, start = [], 0
    for count in counts:
        replies.append(ids[start : start + count])
        start += count
    return replies


class Enqueuer:
    """Appends updates to the updates stream for many concurrent requests at once."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._scripts = Scripts(redis)
        self._batches: GroupCommit[Sequence[Queued], list[str]] = GroupCommit(
            self._append, MAX_BATCH
        )

    async def enqueue(self, updates: Sequence[TransactionUpdate]) -> list[str]:
        """Append `updates`; return their entry ids once Redis has them."""
        return await self._batches.submit([queued(u) for u in updates])

    async def _append(self, groups: list[Sequence[Queued]]) -> list[list[str]]:
        items = [item for group in groups for item in group]
        ids = await enqueue(self.redis, items, self._scripts)
        out, start = [], 0
        for group in groups:
            out.append(ids[start : start + len(group)])
            start += len(group)
        return out
