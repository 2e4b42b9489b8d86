"""The Lua scripts behind every check-then-write, each with a thin typed wrapper.

Scripts live in worker/store/lua/; `decimal.lua` is prepended to the ones that add
balances. Called on a client, a `Script` runs EVALSHA and loads the script on
NOSCRIPT (a Redis restart or a failover emptied the script cache). Queued on a
pipeline (transaction=False) it is a plain `EVALSHA sha numkeys …`, and the
pipeline must be run with `execute` below: on NOSCRIPT it loads the script
and sends again only the calls that failed with it (NOSCRIPT means the script
did not run, so nothing runs twice). redis-py's own script pipelining would
ask SCRIPT EXISTS before every execute: a round trip each, ~3% of the
worker's CPU. A transactional (MULTI) pipeline keeps redis-py's way (load
before EXEC): a call re-sent after EXEC would not be in the transaction.
In a Redis Cluster pipeline redis-py refuses EVALSHA (it could not load a
missing script on the right node), so there `Script` sends EVAL with the
source: a master promoted by a failover starts with an empty script cache,
and EVAL needs none.

Every script's KEYS share one hash slot (worker/store/keys.py), so each runs
unchanged on one Redis and on a cluster (tests/test_ledger.py checks it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

# Scripts that need the fixed-point decimal routines of decimal.lua.
_NEEDS_DECIMAL = {"ledger_apply", "dec_add"}

# SHA1 → source of every script a `Script` was made for: what `execute` loads on NOSCRIPT.
_SOURCES: dict[str, str] = {}

# Rounds of "load, send the failed calls again" before a NOSCRIPT is the caller's
# (only a SCRIPT FLUSH racing each round could need a second).
_NOSCRIPT_ROUNDS = 3


@cache
def source(name: str) -> str:
    """The Lua source of `name`, with its prelude."""
    lua = resources.files("worker.store").joinpath("lua")
    body = lua.joinpath(f"{name}.lua").read_text()
    if name in _NEEDS_DECIMAL:
        body = lua.joinpath("decimal.lua").read_text() + "\n" + body
    return body


def sha1(text: str) -> str:
    """A script's name in Redis' script cache."""
    return hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis' name, not a secret


class Script:
    """One registered script, callable directly or queued on any pipeline."""

    def __init__(self, redis: Redis, name: str) -> None:
        self.source = source(name)
        self.sha = sha1(self.source)
        _SOURCES[self.sha] = self.source
        self._registered: AsyncScript = redis.register_script(self.source)

    async def __call__(
        self,
        keys: Sequence[str] = (),
        args: Sequence[str | int | float | bytes] = (),
        client: Redis | Pipeline | ClusterPipeline | None = None,
    ) -> Any:
        if isinstance(client, ClusterPipeline):
            return client.execute_command("EVAL", self.source, len(keys), *keys, *args)
        if isinstance(client, Pipeline) and not _transactional(client):
            # Run the pipeline with `execute` (below): it answers NOSCRIPT.
            return client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        return await self._registered(keys=keys, args=args, client=cast(Redis, client))


def _transactional(pipe: Pipeline) -> bool:
    """MULTI, or WATCH (its commands run at once): redis-py's own script handling."""
    return bool(pipe.is_transaction or pipe.explicit_transaction or pipe.watching)


async def execute(pipe: Pipeline | ClusterPipeline, *, raise_on_error: bool = True) -> list[Any]:
    """Run `pipe` like `pipe.execute`, loading scripts its EVALSHA calls found missing.

    The calls that failed with NOSCRIPT did not run: they are sent again, after
    SCRIPT LOAD, in one more round trip, so each queued call runs exactly once.
    They then run after the pipeline's other commands: callers queue script
    calls after anything they depend on (every caller does: lookups first).
    A pipeline ending in WAIT (`connection.acknowledged`) gets a WAIT after the
    re-sent calls too, and the smaller replica count of the two is its reply.
    """
    if isinstance(pipe, ClusterPipeline) or _transactional(pipe):
        done: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
        return done
    stack = list(pipe.command_stack)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    for _ in range(_NOSCRIPT_ROUNDS):
        missing = {
            n: sha
            for n, reply in enumerate(replies)
            if isinstance(reply, NoScriptError) and (sha := _sha(stack[n][0])) in _SOURCES
        }
        if not missing:
            break
        failed = list(missing)
        wait = stack[-1][0][0] == "WAIT"
        for sha in dict.fromkeys(missing.values()):
            pipe.execute_command("SCRIPT LOAD", _SOURCES[sha])
        loads = len(pipe.command_stack)
        for n in failed:
            args, options = stack[n]
            pipe.execute_command(*args, **options)
        if wait:
            pipe.execute_command(*stack[-1][0], **stack[-1][1])
        again: list[Any] = await pipe.execute(raise_on_error=False)
        for n, reply in zip(failed, again[loads : loads + len(failed)], strict=True):
            replies[n] = reply
        if wait:
            replies[-1] = _fewer(replies[-1], again[-1])
    if raise_on_error:
        for n, reply in enumerate(replies):
            if isinstance(reply, ResponseError):
                pipe.annotate_exception(reply, n + 1, stack[n][0])
                raise reply
    return replies


def _sha(args: tuple[Any, ...]) -> str | None:
    """The SHA1 of an EVALSHA call's arguments (None for any other command)."""
    if len(args) < 2 or str(args[0]).upper() != "EVALSHA":
        return None
    sha = args[1]
    return sha.decode() if isinstance(sha, bytes) else str(sha)


def _fewer(first: Any, second: Any) -> Any:
    """The smaller of two WAIT replies (an error wins: it counts as none)."""
    if not isinstance(first, int):
        return first
    if not isinstance(second, int):
        return second
    return min(first, second)


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
