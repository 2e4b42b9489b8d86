"""Hypothesis against the real store: any duplication, order and batching of a payment's
updates ends in the same invoice, ledger and e-mails as applying each update once."""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.scenarios import KINDS, create_plans, mismatches, reference
from tests.support import make_settings, post_all
from worker.app.runtime import invoice_service
from worker.ingest.consumer import Ingest, ensure_group
from worker.ingest.enqueue import enqueue, queued
from worker.store import keys
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer
from worker.store.streams import stream_backlog


async def _run(
    url: str, kind_index: int, copies: list[int], seed: int, batches: list[int]
) -> list[str]:
    redis = aioredis.Redis.from_url(url)
    try:
        await redis.flushall()
        merchant = make_merchant("Shop", "http://127.0.0.1:9/cb")
        await MerchantStore(redis).add(merchant)
        service = invoice_service(redis, make_settings(url))
        # One invoice of the chosen kind (create_plans cycles through KINDS).
        plans = (await create_plans(service, merchant, kind_index + 1, random.Random(seed)))[-1:]
        updates = plans[0].updates
        sent = [u for u, n in zip(updates, copies, strict=False) for _ in range(n)] + updates[
            len(copies) :
        ]
        random.Random(seed).shuffle(sent)
        await ensure_group(redis)
        await enqueue(redis, [queued(u) for u in sent])
        ingest = Ingest(redis, service, consumer="prop")
        # One invoice, one deposit address: all its updates are in one partition.
        stream = keys.updates(keys.address_partition(sent[0].currency, sent[0].address))
        for size in [*batches, len(sent)]:
            response = await redis.xreadgroup(keys.UPDATES_GROUP, "prop", {stream: ">"}, count=size)
            entries = [e for _, batch in response for e in batch]
            if entries:
                await ingest.process(
                    keys.address_partition(sent[0].currency, sent[0].address), entries
                )
        assert await stream_backlog(redis) == 0
        await post_all(redis)
        return await mismatches(redis, merchant, reference(plans, service.policy))
    finally:
        await redis.aclose()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind_index=st.integers(0, len(KINDS) - 1),
    copies=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    batches=st.lists(st.integers(1, 8), max_size=6),
)
def test_any_duplication_order_and_batching_gives_the_reference(
    redis_server: RedisServer, kind_index: int, copies: list[int], seed: int, batches: list[int]
) -> None:
    """A payment's updates, each 1–5 times, shuffled, in random batches: same as each once."""
    assert asyncio.run(_run(redis_server.url, kind_index, copies, seed, batches)) == []
