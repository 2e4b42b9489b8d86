"""The Lua scripts behind every check-then-write, each with a thin typed wrapper.

Scripts live in worker/store/lua/; `decimal.lua` is prepended to the ones that add
balances. redis-py's `Script` runs EVALSHA and falls back to EVAL after a
Redis restart emptied the script cache.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

# Scripts that need the fixed-point decimal routines of decimal.lua.
_NEEDS_DECIMAL = {"commit", "dec_add"}


@cache
def source(name: str) -> str:
    """The Lua source of `name`, with its prelude."""
    lua = resources.files("worker.store").joinpath("lua")
    body = lua.joinpath(f"{name}.lua").read_text()
    if name in _NEEDS_DECIMAL:
        body = lua.joinpath("decimal.lua").read_text() + "\n" + body
    return body


class Scripts:
    """The registered scripts of one Redis client."""

    def __init__(self, redis: Redis) -> None:
        self.create: AsyncScript = redis.register_script(source("create"))
        self.commit: AsyncScript = redis.register_script(source("commit"))
        self.dec_add: AsyncScript = redis.register_script(source("dec_add"))
        self.claim_due: AsyncScript = redis.register_script(source("claim_due"))
        self.delivery_done: AsyncScript = redis.register_script(source("delivery_done"))
        self.redeliver: AsyncScript = redis.register_script(source("redeliver"))
        self.append: AsyncScript = redis.register_script(source("append"))
        self.drop_consumer: AsyncScript = redis.register_script(source("drop_consumer"))
