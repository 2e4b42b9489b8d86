"""Scripts queued on pipelines are plain EVALSHA; NOSCRIPT is answered by `scripts.execute`.

Each test empties Redis' script cache (SCRIPT FLUSH: what a restart or a
failover to a replica leaves) and checks that every queued call still runs
exactly once, and that no SCRIPT EXISTS is ever sent.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from redis.exceptions import NoScriptError, ResponseError

from receiver import appkeys
from tests.sink import running_sink
from tests.support import (
    create_payload,
    deposit,
    drain,
    make_settings,
    merchant_post,
    processing_post,
)
from worker.ingest.consumer import Ingest
from worker.outbox.delivery import Deliverer
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.connection import acknowledged
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer
from worker.store.schedules import claim_due
from worker.store.scripts import Scripts, execute

STREAM = keys.updates(0)


async def _calls(redis: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (`script|exists`, `evalsha`, …)."""
    stats: dict[str, Any] = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def _appends(scripts: Scripts, pipe: Any, n: int, tag: str) -> None:
    for i in range(n):
        await scripts.append(keys=[STREAM], args=[f"{tag}{i}"], client=pipe)


async def _payloads(redis: aioredis.Redis) -> list[bytes]:
    return [fields[b"u"] for _, fields in await redis.xrange(STREAM)]


async def test_a_pipeline_sends_no_script_exists(redis: aioredis.Redis) -> None:
    scripts = Scripts(redis)
    await redis.script_load(scripts.append.source)
    await redis.config_resetstat()
    for round_ in range(3):
        async with redis.pipeline(transaction=False) as pipe:
            await _appends(scripts, pipe, 4, f"r{round_}-")
            replies = await execute(pipe)
        assert all(isinstance(reply, list) and len(reply) == 1 for reply in replies)
    calls = await _calls(redis)
    assert calls.get("script|exists", 0) == 0
    assert calls.get("script|load", 0) == 0
    assert calls["evalsha"] == 12
    assert len(await _payloads(redis)) == 12


async def test_every_call_runs_once_after_the_cache_was_emptied(redis: aioredis.Redis) -> None:
    scripts = Scripts(redis)
    for round_ in range(3):
        await redis.script_flush()
        await redis.config_resetstat()
        async with redis.pipeline(transaction=False) as pipe:
            pipe.incr("plain")
            await _appends(scripts, pipe, 5, f"r{round_}-")
            pipe.incr("plain")
            replies = await execute(pipe)
        assert replies[0] == 2 * round_ + 1 and replies[-1] == 2 * round_ + 2
        assert all(isinstance(reply, list) and len(reply) == 1 for reply in replies[1:-1])
        calls = await _calls(redis)
        assert calls.get("script|exists", 0) == 0
        assert calls["script|load"] == 1  # once per script, not per call
        assert calls["evalsha"] == 10  # five failed, five sent again
    payloads = await _payloads(redis)
    assert payloads == [f"r{r}-{i}".encode() for r in range(3) for i in range(5)]
    assert int(await redis.get("plain")) == 6


async def test_only_the_calls_that_failed_are_sent_again(redis: aioredis.Redis) -> None:
    """Another client loading the script mid-pipeline: the calls after it ran; not again."""
    scripts = Scripts(redis)
    await redis.script_flush()
    async with redis.pipeline(transaction=False) as pipe:
        await _appends(scripts, pipe, 2, "before-")
        pipe.execute_command("SCRIPT LOAD", scripts.append.source)
        await _appends(scripts, pipe, 2, "after-")
        replies = await execute(pipe)
    assert len(replies) == 5
    assert sorted(await _payloads(redis)) == [b"after-0", b"after-1", b"before-0", b"before-1"]


async def test_a_trailing_wait_follows_the_calls_sent_again(redis: aioredis.Redis) -> None:
    scripts = Scripts(redis)
    await redis.script_flush()
    await redis.config_resetstat()
    async with redis.pipeline(transaction=False) as pipe:
        await _appends(scripts, pipe, 3, "w")
        replies = await acknowledged(redis, pipe)  # no replicas required: no WAIT
    assert len(replies) == 3
    async with redis.pipeline(transaction=False) as pipe:
        await redis.script_flush()
        await _appends(scripts, pipe, 2, "x")
        pipe.wait(0, 100)
        replies = await execute(pipe)
    assert len(replies) == 3 and replies[-1] == 0
    assert (await _calls(redis))["wait"] == 2  # the first WAIT did not cover the re-sent calls
    assert len(await _payloads(redis)) == 5


async def test_a_transaction_after_the_cache_was_emptied(redis: aioredis.Redis) -> None:
    scripts = Scripts(redis)
    await redis.script_flush()
    async with redis.pipeline(transaction=True) as pipe:
        await _appends(scripts, pipe, 3, "t")
        pipe.incr("plain")
        replies = await execute(pipe)
    assert len(replies) == 4 and replies[-1] == 1
    await redis.script_flush()
    async with redis.pipeline(transaction=True) as pipe:  # redis-py's own execute too
        await _appends(scripts, pipe, 2, "u")
        await pipe.execute()
    assert await _payloads(redis) == [b"t0", b"t1", b"t2", b"u0", b"u1"]


async def test_a_watched_transaction_after_the_cache_was_emptied(redis: aioredis.Redis) -> None:
    """WATCH runs a pipeline's commands at once until MULTI: redis-py's own handling."""
    scripts = Scripts(redis)
    await redis.script_flush()
    async with redis.pipeline(transaction=False) as pipe:
        await pipe.watch("guard")
        assert await scripts.append(keys=[STREAM], args=["watched"], client=pipe)
        await redis.script_flush()
        pipe.multi()
        await _appends(scripts, pipe, 1, "multi")
        replies = await execute(pipe)
    assert len(replies) == 1
    assert await _payloads(redis) == [b"watched", b"multi0"]


async def test_a_direct_call_after_the_cache_was_emptied(redis: aioredis.Redis) -> None:
    scripts = Scripts(redis)
    await redis.script_flush()
    assert await scripts.append(keys=[STREAM], args=["direct"])
    assert await _payloads(redis) == [b"direct"]


async def test_other_errors_are_raised_or_returned(redis: aioredis.Redis) -> None:
    scripts = Scripts(redis)
    await redis.script_flush()
    await redis.set("text", "x")
    async with redis.pipeline(transaction=False) as pipe:
        await _appends(scripts, pipe, 1, "a")
        pipe.incr("text")  # not an integer
        await _appends(scripts, pipe, 1, "b")
        with pytest.raises(ResponseError, match="Command # 2"):
            await execute(pipe)
    assert await _payloads(redis) == [b"a0", b"b0"]  # the others ran, once
    async with redis.pipeline(transaction=False) as pipe:
        pipe.execute_command("EVALSHA", "0" * 40, 0)  # no Script of ours: not loadable
        pipe.incr("text")
        replies = await execute(pipe, raise_on_error=False)
    assert isinstance(replies[0], NoScriptError) and isinstance(replies[1], ResponseError)


async def test_a_claim_after_the_cache_was_emptied(redis: aioredis.Redis) -> None:
    scripts = Scripts(redis)
    schedule = keys.delivery_due
    for partition in range(keys.partitions()):
        await redis.zadd(schedule(partition), {f"{partition}-a": 1, f"{partition}-b": 2})
    await redis.script_flush()
    claimed = await claim_due(redis, scripts.claim_due, schedule, 10, 100, 1000)
    assert len(claimed) == 2 * keys.partitions() == len(set(claimed))
    assert await claim_due(redis, scripts.claim_due, schedule, 10, 100, 1000) == []


async def test_the_worker_s_paths_after_the_cache_was_emptied(
    client: TestClient[Any, Any],
    redis: aioredis.Redis,
    service: InvoiceService,
    redis_server: RedisServer,
) -> None:
    """Create, batch commit (ingest), claim and attempt record, each after a SCRIPT FLUSH:
    every step applies once, and no SCRIPT EXISTS is sent."""
    async for sink in running_sink():
        merchant = make_merchant("Shop", sink.url("/shop"))
        await MerchantStore(redis).add(merchant)
        settings = make_settings(redis_server.url, callback_timeout_seconds=2)
        deliverer = Deliverer(client.server.app[appkeys.REDIS], service.store, settings)
        await deliverer.start()
        try:
            await redis.config_resetstat()
            await redis.script_flush()
            _, created = await merchant_post(
                client,
                merchant,
                "/api/v2/invoices/create",
                create_payload("f1", sender_currency="BTC", type="good_until_expired"),
            )
            invoice = created["data"]
            await redis.script_flush()
            payment = deposit(invoice["address"], "0.00000001", observed_at=invoice["fixed_at"])
            assert (await processing_post(client, payment))[0] == 200
            await drain(Ingest(deliverer.redis, service, consumer="t"))
            await redis.script_flush()
            assert await deliverer.deliver_due() == 1
            await redis.script_flush()
            await deliverer.wait_idle()
            [got] = await sink.wait_for(1)
        finally:
            await deliverer.close()
    assert got.json["sequence"] == 1
    stored = await service.store.get(invoice["id"])
    assert stored is not None and stored.version == 2 and len(stored.invoice.transactions) == 1
    assert await redis.hget(keys.delivery(invoice["id"]), "delivered") == b"1"
    assert await redis.zscore(keys.delivery_due_of(invoice["id"]), invoice["id"]) is None
    assert (await _calls(redis)).get("script|exists", 0) == 0
