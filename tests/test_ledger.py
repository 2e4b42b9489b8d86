"""Cross-slot rules: one slot per script, and balances exactly once from the ledger outbox.

A merchant's balances live in its own hash slot, its invoices in their
partitions' slots; commit.lua records ledger entries in the invoice's
partition and `post_ledger` moves them onto the balances by entry id. These
tests prove the move is idempotent (a crash between its two steps, posters
racing) and that every script's keys share one slot, so all of it runs
unchanged on a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from decimal import Decimal

import redis.asyncio as aioredis
from redis.crc import key_slot

from tests.scenarios import create_plans, mismatches, reference
from tests.support import drain, make_settings, post_all
from worker.app.runtime import invoice_service
from worker.domain.machine import apply
from worker.domain.models import Merchant
from worker.ingest.consumer import Ingest
from worker.ingest.enqueue import enqueue, queued
from worker.outbox.ledger import LedgerPoster
from worker.store import keys
from worker.store.deliveries import Outcome, record_call
from worker.store.invoices import InvoiceStore
from worker.store.ledger import apply_entries, pending_entries, post_ledger, read_outboxes
from worker.store.redis_server import RedisServer
from worker.store.scripts import Scripts


def one_slot(names: list[str]) -> bool:
    return len({key_slot(name.encode()) for name in names}) == 1


async def paid_plans(redis: aioredis.Redis, url: str, merchant: Merchant, count: int) -> list:
    """`count` scenario invoices with their updates applied but their ledger not yet posted."""
    service = invoice_service(redis, make_settings(url))
    plans = await create_plans(service, merchant, count, random.Random(count))
    await enqueue(redis, [queued(u) for plan in plans for u in plan.updates])
    ingest = Ingest(redis, service, consumer="ledger-test")
    for partition in range(keys.partitions()):
        stream = keys.updates(partition)
        await redis.xgroup_create(stream, keys.UPDATES_GROUP, id="0", mkstream=True)
        response = await redis.xreadgroup(keys.UPDATES_GROUP, "t", {stream: ">"}, count=10_000)
        for _, entries in response:
            await ingest.process(partition, entries)
    return plans


async def test_every_scripts_keys_share_one_slot(
    redis: aioredis.Redis, redis_server: RedisServer, merchant: Merchant
) -> None:
    """create, commit, delivery_done, address_claim, ledger_apply, rates_*: each call's KEYS
    hash to one slot."""
    service = invoice_service(redis, make_settings(redis_server.url))
    plans = await create_plans(service, merchant, 5, random.Random(1))
    store: InvoiceStore = service.store
    for plan in plans:
        invoice = plan.invoice
        create_keys, _ = store.create_call(invoice)
        stored = await store.get(invoice.id)
        assert stored is not None
        transition = apply(invoice, plan.updates[-1], service.policy)
        commit_keys, _ = store.commit_call(stored, transition, 0)
        # A commit that issues a refund token too: its index key is written before, apart.
        issuing = replace(transition, invoice=replace(transition.invoice, refund_token="r" * 32))
        assert one_slot(store.commit_call(stored, issuing, 0)[0])
        assert keys.refund_token("r" * 32) not in store.commit_call(stored, issuing, 0)[0]
        done_keys, _ = record_call(invoice.id, 1, Outcome(200, "", 1, True), 0, (60,))
        assert one_slot(create_keys) and one_slot(commit_keys) and one_slot(done_keys)
        assert invoice.address is not None
        claim_keys, _ = store.address_claim_call(
            invoice.id, invoice.address.currency, invoice.address.address
        )
        assert one_slot(claim_keys)
        # …and the balances are in another slot than the invoice: hence the ledger outbox.
        assert key_slot(keys.balance(merchant.key).encode()) != key_slot(create_keys[2].encode())
    assert one_slot(
        [keys.balance("m"), keys.ledger("m"), keys.ledger_applied("m"), keys.merchant("m")]
    )
    assert one_slot([keys.address_pool("BTC"), keys.hd_index("BTC"), keys.ADDRESS_IDS])
    # rates_lead/rates_publish/rates_resign: the lease and the table (and the sources' health).
    assert one_slot([keys.RATES_LEADER, keys.RATES, keys.RATES_SOURCES])


async def test_posting_again_after_a_crash_before_the_delete_credits_once(
    redis: aioredis.Redis, redis_server: RedisServer, merchant: Merchant
) -> None:
    """The outbox entries stay after ledger_apply (crash before XDEL): a repost skips them."""
    plans = await paid_plans(redis, redis_server.url, merchant, 10)
    entries = await pending_entries(redis)
    assert entries > 0
    # The first two steps of post_ledger, then the worker dies before the XDEL.
    await apply_entries(redis, Scripts(redis), await read_outboxes(redis))
    assert await pending_entries(redis) == entries
    assert await post_ledger(redis, Scripts(redis)) == entries
    assert await pending_entries(redis) == 0
    service = invoice_service(redis, make_settings(redis_server.url))
    assert await mismatches(redis, merchant, reference(plans, service.policy)) == []


async def test_a_stopping_workers_drain_posts_what_waits_in_the_outboxes(
    redis: aioredis.Redis, redis_server: RedisServer, merchant: Merchant
) -> None:
    """`LedgerPoster.drain` (a worker's SIGTERM) posts every waiting entry once; again: none."""
    plans = await paid_plans(redis, redis_server.url, merchant, 10)
    entries = await pending_entries(redis)
    assert entries > 0
    poster = LedgerPoster(redis, Scripts(redis))
    assert await poster.drain(10.0) == entries
    assert await pending_entries(redis) == 0
    assert await poster.drain(10.0) == 0
    service = invoice_service(redis, make_settings(redis_server.url))
    assert await mismatches(redis, merchant, reference(plans, service.policy)) == []


async def test_racing_posters_credit_each_entry_once(
    redis: aioredis.Redis, redis_server: RedisServer, merchant: Merchant
) -> None:
    """Eight posters on the same outboxes at once: balances and ledger as if posted once."""
    plans = await paid_plans(redis, redis_server.url, merchant, 20)
    clients = [aioredis.Redis.from_url(redis_server.url) for _ in range(8)]
    try:
        await asyncio.gather(*(post_ledger(c, Scripts(c), limit=3) for c in clients))
        await post_all(redis)
    finally:
        for c in clients:
            await c.aclose()
    service = invoice_service(redis, make_settings(redis_server.url))
    assert await mismatches(redis, merchant, reference(plans, service.policy)) == []


async def test_balance_waits_for_the_ledger_step_then_is_exact(
    redis: aioredis.Redis, redis_server: RedisServer, merchant: Merchant
) -> None:
    """A commit leaves the balance alone; the ledger step adds exactly the invoice's credit."""
    plans = await paid_plans(redis, redis_server.url, merchant, 1)
    assert await redis.hgetall(keys.balance(merchant.key)) == {}
    await post_all(redis)
    service = invoice_service(redis, make_settings(redis_server.url))
    expected = reference(plans, service.policy).balances
    assert expected and all(isinstance(v, Decimal) for v in expected.values())
    assert await service.store.balances(merchant.key) == expected


async def test_drain_posts_what_ingest_committed(
    redis: aioredis.Redis, redis_server: RedisServer, merchant: Merchant
) -> None:
    """support.drain applies updates and posts their ledger entries (what workers do)."""
    service = invoice_service(redis, make_settings(redis_server.url))
    plans = await create_plans(service, merchant, 5, random.Random(9))
    await enqueue(redis, [queued(u) for plan in plans for u in plan.updates])
    await drain(Ingest(redis, service, consumer="drain"))
    assert await pending_entries(redis) == 0
    assert await mismatches(redis, merchant, reference(plans, service.policy)) == []
