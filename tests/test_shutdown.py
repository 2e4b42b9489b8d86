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
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests import processes
from tests.support import deposit
from worker.store import keys
from worker.store.codec import load_update
from worker.store.redis_server import RedisServer

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


async def wait_status(
    session: aiohttp.ClientSession, url: str, wanted: int, within: float
) -> float:
    """Poll `url` until it answers `wanted` (0: nothing listens any more); seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if (await status_of(session, url))[0] == wanted:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"{url} did not answer {wanted} within {within}s")


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
            await wait_status(session, base + "/health/ready", 503, within=0.5)
            # Still serving during the drain, and asking clients to reconnect elsewhere.
            assert await status_of(session, base + "/health/live") == (200, "close")
            # The listener closes after the drain, while the callback is still in flight.
            await wait_status(session, base + "/health/live", 0, within=SHUTDOWN_SECONDS)
            closed_after = time.monotonic() - signalled
            assert not in_flight.done()
            assert await in_flight == 200
        code = await asyncio.to_thread(child.process.wait, SHUTDOWN_SECONDS + 2)  # type: ignore[union-attr]
        stopped_after = time.monotonic() - signalled
    finally:
        child.kill()
    assert code == 0
    assert DRAIN_SECONDS - 0.1 <= closed_after < PAUSE_SECONDS
    assert stopped_after < SHUTDOWN_SECONDS + 1.0  # + the interpreter's own exit
    queued = [load_update(f[b"u"]).tx_id for _, f in await redis.xrange(keys.UPDATES)]
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
            await wait_status(session, base + "/health/ready", 503, within=1.0)
        child.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        code = await asyncio.to_thread(child.process.wait, 10)  # type: ignore[union-attr]
    finally:
        child.kill()
    assert code == 0
    assert time.monotonic() - signalled < 3.0
