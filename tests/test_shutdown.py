"""Graceful shutdown on SIGTERM within COINVOICE_SHUTDOWN_SECONDS (spec §11), real processes.

A receiver turns /health/ready to 503 at once, keeps serving through a short
drain, finishes the requests in flight, closes and exits 0. A worker stops
reading new batches, finishes what it holds, leaves the consumer group and
exits 0; a worker that died is removed from the group once others claimed
its pending entries.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests import processes
from tests.scenarios import Plan, create_plans, mismatches, reference
from tests.sink import Behaviour, running_sink
from tests.support import deposit, eventually, record_artifact
from worker.app.runtime import invoice_service
from worker.config import Settings
from worker.domain.models import Merchant
from worker.domain.money import fmt8
from worker.ingest.consumer import ensure_group
from worker.ingest.enqueue import Queued, enqueue, queued
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.codec import load_update
from worker.store.deliveries import delivery_log
from worker.store.invoices import parse_ledger_line
from worker.store.ledger import pending_entries
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer
from worker.store.streams import all_entries
from worker.store.streams import group_consumers as all_group_consumers

pytestmark = pytest.mark.slow

# The budget these tests give (COINVOICE_SHUTDOWN_SECONDS): a 1.5 s drain (a quarter),
# then 3.5 s for requests in flight (less a second for closing).
SHUTDOWN_SECONDS = 6.0
DRAIN_SECONDS = 1.5
# Redis holds writes this long, so a request stays in flight past the drain (seconds).
PAUSE_SECONDS = 3.0


async def status_of(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    """GET `url`: its status and Connection header (0 when nothing answers)."""
    try:
        async with session.get(url) as response:
            await response.read()
            return response.status, response.headers.get("Connection")
    except aiohttp.ClientError:
        return 0, None


def status_probe(session: aiohttp.ClientSession, url: str) -> Callable[[], Awaitable[int]]:
    """A probe for `support.eventually`: the status `url` answers (0: nothing listens)."""

    async def probe() -> int:
        return (await status_of(session, url))[0]

    return probe


async def test_receiver_drains_then_finishes_in_flight_requests_and_exits_0(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM: ready 503 at once, still serving; a request in flight completes; exit 0 in time."""
    env = processes.child_env(redis_server.url, COINVOICE_SHUTDOWN_SECONDS=str(SHUTDOWN_SECONDS))
    child, base = await processes.receiver(env, tmp_path)
    body = json.dumps(deposit("bc1qinflight", "0.1", tx_id=77)).encode()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            # Redis holds writes for a while: the callback's append stays in flight
            # past the drain (readiness PINGs are not writes and still answer).
            await redis.execute_command("CLIENT", "PAUSE", int(PAUSE_SECONDS * 1000), "WRITE")
            in_flight = asyncio.create_task(processes.post_update(session, base, body))
            await asyncio.sleep(0.2)
            signalled = time.monotonic()
            child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            # "At once": well before the first HAProxy check could notice anything else.
            await eventually(status_probe(session, base + "/health/ready"), 503, 0.5, 0.02)
            # Still serving during the drain, and asking clients to reconnect elsewhere.
            assert await status_of(session, base + "/health/live") == (200, "close")
            # The listener closes after the drain, while the callback is still in flight.
            await eventually(status_probe(session, base + "/health/live"), 0, SHUTDOWN_SECONDS)
            closed_after = time.monotonic() - signalled
            assert not in_flight.done()
            assert await in_flight == 200
        code = await asyncio.to_thread(child.process.wait, SHUTDOWN_SECONDS + 2)  # type: ignore[union-attr]
        stopped_after = time.monotonic() - signalled
    finally:
        child.kill()
    record_artifact(
        "shutdown",
        "receiver",
        {
            "budget_s": SHUTDOWN_SECONDS,
            "closed_after_s": closed_after,
            "exited_after_s": stopped_after,
        },
    )
    assert code == 0
    assert DRAIN_SECONDS - 0.1 <= closed_after < PAUSE_SECONDS
    assert stopped_after < SHUTDOWN_SECONDS + 1.0  # + the interpreter's own exit
    queued = [load_update(f[b"u"]).tx_id for _, f in await all_entries(redis)]
    assert queued == [77]


async def test_a_second_signal_cuts_the_receivers_drain_short(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM then SIGINT (an impatient operator): the 5 s drain is skipped, exit 0 at once."""
    env = processes.child_env(redis_server.url, COINVOICE_SHUTDOWN_SECONDS="20")
    child, base = await processes.receiver(env, tmp_path)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            signalled = time.monotonic()
            child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            await eventually(status_probe(session, base + "/health/ready"), 503, 1.0, 0.02)
        child.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        code = await asyncio.to_thread(child.process.wait, 10)  # type: ignore[union-attr]
    finally:
        child.kill()
    assert code == 0
    assert time.monotonic() - signalled < 3.0


async def group_consumers(redis: aioredis.Redis) -> dict[str, int]:
    """The updates group's consumers and how many entries each holds unacknowledged."""
    return await all_group_consumers(redis)


async def planned_flow(
    service: InvoiceService, merchant: Merchant, rng: random.Random
) -> tuple[list[Plan], list[Queued]]:
    """100 invoices' planned updates as stream entries, topped up with 3,000 duplicates."""
    plans = await create_plans(service, merchant, 100, rng)
    updates = [u for plan in plans for u in plan.updates]
    return plans, [queued(u) for u in updates + rng.choices(updates, k=3000)]


async def test_worker_finishes_its_batch_leaves_the_group_and_exits_0(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    settings: Settings,
    merchant: Merchant,
    tmp_path: Path,
) -> None:
    """SIGTERM while updates flow: the batch in hand is applied, nothing left pending, exit 0."""
    rng = random.Random(11)
    service = invoice_service(redis, settings)
    plans, entries = await planned_flow(service, merchant, rng)
    rng.shuffle(entries)
    await ensure_group(redis)
    env = processes.child_env(redis_server.url, COINVOICE_SHUTDOWN_SECONDS=str(SHUTDOWN_SECONDS))
    first = processes.worker(env, tmp_path, 0)
    try:
        # Feed the stream in slices so the worker is busy with batches when it is stopped.
        half = len(entries) // 2
        for start in range(0, half, 256):
            await enqueue(redis, entries[start : min(start + 256, half)])
            await asyncio.sleep(0.02)

        async def applied_some() -> bool:
            return bool((await processes.ingest_stats(redis)).get("entries"))

        await eventually(applied_some, True)
        signalled = time.monotonic()
        first.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        await enqueue(redis, entries[half:])
        code = await asyncio.to_thread(first.process.wait, SHUTDOWN_SECONDS + 2)  # type: ignore[union-attr]
        stopped_after = time.monotonic() - signalled
        # It left the group, which it only does holding nothing: its batch was finished.
        left = await group_consumers(redis)
        assert processes.consumer_name(first) not in left, first.log_path.read_text()[-3000:]
        assert await redis.zscore(keys.WORKERS, processes.consumer_name(first)) is None
        second = processes.worker(env, tmp_path, 1)
        try:
            await processes.wait_applied(redis)
        finally:
            second.stop()
    finally:
        first.kill()
    stats = await processes.ingest_stats(redis)
    record_artifact(
        "shutdown",
        "worker-batch",
        {"exited_after_s": stopped_after, "entries": len(entries), **stats},
    )
    assert code == 0, first.log_path.read_text()[-3000:]
    assert stopped_after < SHUTDOWN_SECONDS + 1.0
    assert stats.get("reclaimed", 0) == 0  # nobody took over what the stopped worker held
    assert stats["entries"] == len(entries)
    assert await mismatches(redis, merchant, reference(plans, service.policy)) == []


async def test_worker_finishes_the_delivery_in_hand_before_exiting(
    redis: aioredis.Redis, redis_server: RedisServer, settings: Settings, tmp_path: Path
) -> None:
    """SIGTERM while a callback is on the wire: it is answered and recorded, then exit 0."""
    async for sink in running_sink():
        merchant = make_merchant("Shop", sink.url("/shop"))
        await MerchantStore(redis).add(merchant)
        sink.behaviour["/shop"] = Behaviour(delay=2.0)  # a slow merchant
        service = invoice_service(redis, settings)
        plans = await create_plans(service, merchant, 1, random.Random(1))
        invoice = await service.cancel(merchant.key, plans[0].invoice.foreign_id)
        env = processes.child_env(
            redis_server.url, COINVOICE_SHUTDOWN_SECONDS=str(SHUTDOWN_SECONDS)
        )
        child = processes.worker(env, tmp_path, 0)
        try:
            await sink.wait_for(1, seconds=20)
            signalled = time.monotonic()
            child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            code = await asyncio.to_thread(child.process.wait, SHUTDOWN_SECONDS + 2)  # type: ignore[union-attr]
            stopped_after = time.monotonic() - signalled
        finally:
            child.kill()
        record_artifact("shutdown", "worker-delivery", {"exited_after_s": stopped_after})
        assert code == 0
        assert 1.5 <= stopped_after < SHUTDOWN_SECONDS + 1.0
        assert len(sink.received) == 1
        log = await delivery_log(redis, invoice)
        assert log[-1]["state"] == "delivered"


async def test_a_killed_workers_consumer_is_removed_once_its_entries_are_claimed(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    settings: Settings,
    merchant: Merchant,
    tmp_path: Path,
) -> None:
    """SIGKILL a worker holding a batch: another claims and applies it, then removes it."""
    rng = random.Random(12)
    service = invoice_service(redis, settings)
    plans, entries = await planned_flow(service, merchant, rng)
    await ensure_group(redis)
    env = processes.child_env(redis_server.url)
    victim = processes.worker(env, tmp_path, 0)
    survivor: processes.Child | None = None
    try:

        async def beating() -> bool:
            return await redis.zscore(keys.WORKERS, processes.consumer_name(victim)) is not None

        await eventually(beating, True, seconds=20)
        await enqueue(redis, entries)
        held = await processes.kill_holding_entries(redis, victim, wait=True)
        assert held, "the worker was killed before it held a batch; nothing to claim"
        dead = processes.consumer_name(victim)
        assert (await group_consumers(redis))[dead] > 0
        survivor = processes.worker(env, tmp_path, 1)
        await processes.wait_applied(redis)

        async def dead_still_in_group() -> bool:
            return dead in await group_consumers(redis)

        # Stale heartbeat (10 s) plus one reclaim round (5 s).
        await eventually(dead_still_in_group, False, seconds=30)
    finally:
        victim.kill()
        if survivor is not None:
            survivor.stop()
    assert (await processes.ingest_stats(redis))["reclaimed"] >= 1
    assert await mismatches(redis, merchant, reference(plans, service.policy)) == []


async def posted_ledger(
    redis: aioredis.Redis, merchant: Merchant
) -> tuple[Counter[tuple[int, str, str]], dict[str, Decimal], dict[str, Decimal]]:
    """The merchant's ledger rows (invoice, kind, amount) → count, their sum per currency,
    and the balances."""
    rows = [parse_ledger_line(r) for r in await redis.lrange(keys.ledger(merchant.key), 0, -1)]
    sums: dict[str, Decimal] = {}
    for row in rows:
        sums[row.currency] = sums.get(row.currency, Decimal(0)) + row.amount
    raw = await redis.hgetall(keys.balance(merchant.key))
    balances = {k.decode(): Decimal(v.decode()) for k, v in raw.items()}
    return Counter((r.invoice_id, r.kind, fmt8(r.amount)) for r in rows), sums, balances


async def test_worker_posts_its_last_batchs_ledger_entries_before_exiting(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    settings: Settings,
    merchant: Merchant,
    tmp_path: Path,
) -> None:
    """SIGTERM while updates flow: the ledger entries the last batches committed (in the
    partition outboxes) are on the balances when the worker has exited, each once.

    The worker's ledger loop runs until the finishing loops are done, so whether entries
    are still waiting when it is cancelled depends on timing; the shutdown's drain posts
    whatever is left (its `ledger_drained` line counts them, kept as an artifact), and
    either way the outboxes must be empty once the worker is gone.
    """
    rng = random.Random(13)
    service = invoice_service(redis, settings)
    plans, entries = await planned_flow(service, merchant, rng)
    rng.shuffle(entries)  # payments complete all through the flow
    expected = reference(plans, service.policy)
    await ensure_group(redis)
    # Info level: the worker's `ledger_drained` line says how many it posted on the way out.
    env = processes.child_env(
        redis_server.url,
        COINVOICE_SHUTDOWN_SECONDS=str(SHUTDOWN_SECONDS),
        COINVOICE_LOG_LEVEL="info",
    )
    first = processes.worker(env, tmp_path, 0)

    async def feed() -> None:
        """Small slices, so the worker applies (and commits ledger entries) up to its stop."""
        for start in range(0, len(entries), 32):
            await enqueue(redis, entries[start : start + 32])
            await asyncio.sleep(0.02)  # about 2 s in all

    async def beating() -> bool:
        return await redis.zscore(keys.WORKERS, processes.consumer_name(first)) is not None

    await eventually(beating, True, seconds=20)  # started: the flow meets a running worker
    feeder = asyncio.create_task(feed())
    try:

        async def applied_some() -> bool:
            return bool((await processes.ingest_stats(redis)).get("entries"))

        await eventually(applied_some, True, seconds=20)
        await asyncio.sleep(0.5)  # into the flow: batches with payments completing
        first.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = await asyncio.to_thread(first.process.wait, SHUTDOWN_SECONDS + 2)  # type: ignore[union-attr]
        log_text = first.log_path.read_text()
        # Nothing else runs: what the outboxes lack now was posted by the stopped worker.
        left_in_outboxes = await pending_entries(redis)
        posted, sums, balances = await posted_ledger(redis, merchant)
        await feeder
        second = processes.worker(env, tmp_path, 1)
        try:
            await processes.wait_applied(redis)
        finally:
            second.stop()
    finally:
        feeder.cancel()
        first.kill()
    drained = [json.loads(line) for line in log_text.splitlines() if "ledger_drained" in line]
    record_artifact(
        "shutdown",
        "worker-ledger",
        {
            "posted_on_shutdown": drained[0]["entries"] if drained else None,
            "ledger_rows_at_exit": sum(posted.values()),
        },
    )
    assert code == 0, log_text[-3000:]
    assert drained, log_text[-3000:]
    assert left_in_outboxes == 0
    assert posted, "the worker applied no payment before it was stopped"
    assert not posted - expected.ledger, "an entry posted twice, or one nobody committed"
    assert balances == sums  # the balances are exactly the posted entries
    # The second worker applied the rest: everything once, as the reference model says.
    assert await mismatches(redis, merchant, expected) == []


# arq's close() closes its pool with redis-py's deprecated close().
@pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")
async def test_a_job_cancelled_by_the_stop_signal_does_not_skip_shutdown(
    settings: Settings,
) -> None:
    """arq gathers its cancelled job tasks without return_exceptions; ours still shuts down.

    The race seen under load: SIGTERM cancels the running `fire_timers` job and
    its CancelledError came out of `Worker.close` before `on_shutdown` ran.
    """
    from arq.connections import create_pool

    from worker.app.main import arq_redis_settings, build_worker

    worker = build_worker(settings)
    shut_down: list[bool] = []

    async def on_shutdown(ctx: object) -> None:
        shut_down.append(True)

    worker.on_shutdown = on_shutdown
    worker._pool = await create_pool(arq_redis_settings(settings))
    job = asyncio.create_task(asyncio.sleep(60))
    worker.tasks["fire_timers"] = job
    worker.handle_sig(signal.SIGTERM)  # what arq does on the signal: cancels the job

    await worker.close()

    assert job.cancelled()
    assert shut_down == [True]
