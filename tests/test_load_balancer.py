"""Two receivers behind HAProxy (deploy/haproxy.cfg): losing one under load loses no client.

Real processes on loopback: the session's Redis, two `coinvoice receiver`
children and HAProxy running the shipped configuration. Clients create
invoices and report deposits through the balancer, retrying any refusal;
a receiver is then killed (SIGKILL) or stopped (SIGTERM) mid-load. Each test
writes what it observed to test-artifacts/load-balancer.jsonl.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests import processes
from tests.balancer import Balancer, Traffic
from tests.support import record_artifact
from worker.domain.models import Merchant
from worker.store import keys
from worker.store.codec import load_update
from worker.store.invoices import decode_stored
from worker.store.redis_server import RedisServer
from worker.store.streams import all_entries

pytestmark = pytest.mark.slow

# Concurrent clients through the balancer.
CLIENTS = 8
# Load before and after the receiver is lost (seconds).
BEFORE_SECONDS = 1.5
AFTER_SECONDS = 3.0
# The receivers' shutdown budget in these tests (COINVOICE_SHUTDOWN_SECONDS).
SHUTDOWN_SECONDS = 8


def record(test: str, observed: dict[str, Any]) -> None:
    """Keep what a run observed, for the closing notes and post-mortems."""
    record_artifact("load-balancer", test, observed)


@dataclass
class Pair:
    """Two ready receivers and the balancer in front of them."""

    receivers: list[processes.Child]
    balancer: Balancer


@pytest.fixture
async def pair(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Pair]:
    """receiver1 and receiver2 on free ports, HAProxy in front, both seen UP."""
    env = processes.child_env(
        redis_server.url,
        COINVOICE_SHUTDOWN_SECONDS=str(SHUTDOWN_SECONDS),
        COINVOICE_TRUST_FORWARDED="1",
    )
    children: list[processes.Child] = []
    balancer: Balancer | None = None
    try:
        addresses = []
        for name in ("receiver1", "receiver2"):
            child, base = await processes.receiver(env, tmp_path, name)
            children.append(child)
            addresses.append(base.removeprefix("http://"))
        balancer = Balancer(addresses, tmp_path).start()
        await balancer.wait_states({"receiver1": "UP", "receiver2": "UP"})
        yield Pair(children, balancer)
    finally:
        if balancer is not None:
            balancer.stop()
        for child in children:
            child.kill()


async def acknowledged_tx_ids(redis: aioredis.Redis) -> set[int]:
    """The transaction ids of every processing update queued in the stream."""
    entries = await all_entries(redis)
    return {load_update(fields[b"u"]).tx_id for _, fields in entries}


async def created_foreign_ids(redis: aioredis.Redis, merchant: Merchant) -> list[str]:
    """Every foreign id the merchant has an invoice for (one invoice each, unique by design)."""
    found = [key async for key in redis.scan_iter(f"{keys.PREFIX}inv:*")]
    invoices = [decode_stored(raw).invoice for raw in await redis.mget(found)] if found else []
    return [i.foreign_id for i in invoices if i.merchant == merchant.key]


async def run_losing_one(
    pair: Pair, merchant: Merchant, lose: str
) -> tuple[Traffic, float, int | None]:
    """Load through the balancer; `lose` receiver1 ("kill" or "term") mid-way.

    Returns the traffic, when receiver1 was lost, and its exit code (None if killed).
    """
    traffic = Traffic(pair.balancer.url, merchant)
    clients = asyncio.create_task(traffic.run(CLIENTS))
    await asyncio.sleep(BEFORE_SECONDS)
    lost_at = time.monotonic()
    victim = pair.receivers[0]
    exit_code: int | None = None
    if lose == "kill":
        victim.kill()
    else:
        exit_code = await asyncio.to_thread(victim.stop, SHUTDOWN_SECONDS + 5)
    await asyncio.sleep(max(0.0, AFTER_SECONDS - (time.monotonic() - lost_at)))
    traffic.stop.set()
    await asyncio.wait_for(clients, 30)
    return traffic, lost_at, exit_code


async def test_killing_a_receiver_under_load_keeps_clients_succeeding(
    pair: Pair, redis: aioredis.Redis, merchant: Merchant
) -> None:
    """SIGKILL one of two receivers mid-load: every operation succeeds, none is lost or doubled."""
    traffic, killed_at, _ = await run_losing_one(pair, merchant, "kill")

    await pair.balancer.wait_states({"receiver1": "DOWN", "receiver2": "UP"})
    after = [d for d in traffic.done if d.finished_at > killed_at]
    record(
        "sigkill",
        {
            "operations": len(traffic.done),
            "after_kill": len(after),
            "client_refusals": traffic.refusals,
        },
    )
    assert len(after) >= CLIENTS, "clients stopped succeeding once a receiver was killed"
    # HAProxy replays what the dead receiver never answered (retry-on, redispatch):
    # no client even saw a refusal.
    assert traffic.refusals == {}
    await assert_nothing_lost(redis, merchant, traffic)


async def assert_nothing_lost(redis: aioredis.Redis, merchant: Merchant, traffic: Traffic) -> None:
    """Every acknowledged deposit is queued; every invoice a client got exists, and no other."""
    assert {d.tx_id for d in traffic.done} <= await acknowledged_tx_ids(redis)
    created = await created_foreign_ids(redis, merchant)
    assert sorted(created) == sorted(d.foreign_id for d in traffic.done)


async def test_stopping_a_receiver_under_load_drains_it_without_a_refusal(
    pair: Pair, redis: aioredis.Redis, merchant: Merchant
) -> None:
    """SIGTERM one receiver mid-load: HAProxy takes it out while it drains; it exits 0."""
    traffic, stopped_at, exit_code = await run_losing_one(pair, merchant, "term")

    await pair.balancer.wait_states({"receiver1": "DOWN", "receiver2": "UP"})
    after = [d for d in traffic.done if d.finished_at > stopped_at]
    record(
        "sigterm",
        {
            "operations": len(traffic.done),
            "after_stop": len(after),
            "client_refusals": traffic.refusals,
            "exit_code": exit_code,
        },
    )
    assert exit_code == 0
    assert len(after) >= CLIENTS
    assert traffic.refusals == {}
    # Taken out by its failing readiness while it still served, not by a refused connection.
    log = (pair.balancer.work_dir / "haproxy.log").read_text()
    assert "receivers/receiver1 is DOWN, reason: Layer7 wrong status, code: 503" in log
    await assert_nothing_lost(redis, merchant, traffic)
