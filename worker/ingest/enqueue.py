"""Appending processing updates to the partitioned updates stream, requests sharing round trips.

Every accepted callback must be in the stream before its 200 (spec §8), so
each request waits for its own XADD. Sending each on its own costs a Redis
round trip and much of the receiver's CPU per request; instead the requests
that arrive while one round trip is in flight go together in the next
append (worker/store/batching.py), and each gets its own entry ids back.

An update goes to the partition of its deposit address (worker/store/streams.py).
Each partition's share is one append.lua call (all or none); a flush sends
one call per partition in one pipeline (per node on a cluster). A flush that
fails part-way answers every request in it with an error, and the caller's
retry appends again: applying is idempotent. With COINVOICE_REDIS_MIN_REPLICAS
the append is followed by WAIT, so the 200s leave only once the replicas hold
the entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import NoScriptError

from worker.domain.events import TransactionUpdate
from worker.store import keys
from worker.store.batching import GroupCommit
from worker.store.codec import dump_update
from worker.store.connection import acknowledged
from worker.store.scripts import Scripts, source

# EVALSHA's name of append.lua (SHA-1 of its source, as Redis computes it).
_APPEND_SHA = hashlib.sha1(source("append").encode()).hexdigest()  # noqa: S324 - Redis' own name

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
        # Redis restarted (or failed over) and forgot the script: load it, append again.
        # A partition whose call did run appends twice; applying is idempotent.
        await redis.script_load(scripts.append.source)
        replies = await _append(redis, items, by_partition, scripts)
    ids = [""] * len(items)
    for indexes, reply in zip(by_partition.values(), replies, strict=True):
        for index, entry_id in zip(indexes, reply, strict=True):
            ids[index] = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return ids


async def _append(
    redis: Redis, items: Sequence[Queued], by_partition: dict[int, list[int]], scripts: Scripts
) -> list[Any]:
    """One append.lua call per partition, in one pipeline (and its WAIT, if required).

    On one Redis each call is a plain EVALSHA: redis-py's own script pipelining
    would first ask SCRIPT EXISTS, a round trip of its own before every flush.
    """
    async with redis.pipeline(transaction=False) as pipe:
        for partition, indexes in by_partition.items():
            args = [items[i][1] for i in indexes]
            if isinstance(pipe, ClusterPipeline):
                await scripts.append(keys=[keys.updates(partition)], args=args, client=pipe)
            else:
                pipe.execute_command("EVALSHA", _APPEND_SHA, 1, keys.updates(partition), *args)
        return await acknowledged(redis, pipe)


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
