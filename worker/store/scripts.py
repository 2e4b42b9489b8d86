"""The Lua scripts behind every check-then-write, each with a thin typed wrapper.

Scripts live in worker/store/lua/; `decimal.lua` is prepended to the ones that add
balances. redis-py's `Script` runs EVALSHA and falls back to EVAL after a
Redis restart emptied the script cache. In a Redis Cluster pipeline redis-py
refuses EVALSHA (it could not load a missing script on the right node), so
there `Script` sends EVAL with the source: a master promoted by a failover
starts with an empty script cache, and EVAL needs none.

Every script's KEYS share one hash slot (worker/store/keys.py), so each runs
unchanged on one Redis and on a cluster (tests/test_ledger.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript

# Scripts that need the fixed-point decimal routines of decimal.lua.
_NEEDS_DECIMAL = {"ledger_apply", "dec_add"}


@cache
def source(name: str) -> str:
    """The Lua source of `name`, with its prelude."""
    lua = resources.files("worker.store").joinpath("lua")
    body = lua.joinpath(f"{name}.lua").read_text()
    if name in _NEEDS_DECIMAL:
        body = lua.joinpath("decimal.lua").read_text() + "\n" + body
    return body


class Script:
    """One registered script, callable directly or queued on any pipeline."""

    def __init__(self, redis: Redis, name: str) -> None:
        self.source = source(name)
        self._registered: AsyncScript = redis.register_script(self.source)

    async def __call__(
        self,
        keys: Sequence[str] = (),
        args: Sequence[str | int | float | bytes] = (),
        client: Redis | Pipeline | ClusterPipeline | None = None,
    ) -> Any:
        if isinstance(client, ClusterPipeline):
            return client.execute_command("EVAL", self.source, len(keys), *keys, *args)
        return await self._registered(keys=keys, args=args, client=cast(Redis, client))


class Scripts:
    """The registered scripts of one Redis client."""

    def __init__(self, redis: Redis) -> None:
        self.create = Script(redis, "create")
        self.address_claim = Script(redis, "address_claim")
        self.commit = Script(redis, "commit")
        self.ledger_apply = Script(redis, "ledger_apply")
        self.dec_add = Script(redis, "dec_add")
        self.claim_due = Script(redis, "claim_due")
        self.delivery_done = Script(redis, "delivery_done")
        self.redeliver = Script(redis, "redeliver")
        self.append = Script(redis, "append")
        self.drop_consumer = Script(redis, "drop_consumer")
