"""Real coinvoice processes for the concurrency and crash tests.

Receivers and workers run as `python -m receiver.commands.cli …` children against the
test session's Redis; the helpers start them, wait for them, kill them
(-9 means a crash, not a shutdown) and wait until the system has applied
everything that was accepted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from tests.support import PROCESSING_KEY, PROCESSING_SECRET
from worker.domain.signing import sign
from worker.store import keys
from worker.store.ledger import pending_entries
from worker.store.redis_server import free_port
from worker.store.streams import stream_backlog

# How long a child may take to become ready (seconds).
START_TIMEOUT_SECONDS = 20.0


def child_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of a child: our Redis, test keys, JSON logs, fast reclaim and stop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COINVOICE_")}
    env.update(
        {
            "COINVOICE_REDIS_URL": redis_url,
            "COINVOICE_PROCESSING_KEY": PROCESSING_KEY,
            "COINVOICE_PROCESSING_SECRET": PROCESSING_SECRET,
            "COINVOICE_ALLOW_PRIVATE_CALLBACKS": "1",
            "COINVOICE_RATE_LIMIT_MERCHANT": "0",
            "COINVOICE_RATE_LIMIT_PUBLIC": "0",
            "COINVOICE_LOG_FORMAT": "json",
            "COINVOICE_LOG_LEVEL": "warning",
            "COINVOICE_RECLAIM_IDLE_SECONDS": "1",
            # Receivers drain a quarter of this after SIGTERM: short, no balancer here.
            "COINVOICE_SHUTDOWN_SECONDS": "3",
        }
    )
    env.update(extra)
    return env


@dataclass
class Child:
    """One child process, its output going to a log file for post-mortems."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "receiver.commands.cli", *self.args],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash at whatever point the process happens to be."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.process is not None
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def worker(env: dict[str, str], log_dir: Path, n: int = 0) -> Child:
    return Child(f"worker-{n}", ["worker"], env, log_dir / f"worker-{n}.log").start()


async def receiver(
    env: dict[str, str], log_dir: Path, name: str = "receiver", port: int | None = None
) -> tuple[Child, str]:
    """A receiver on `port` (default: a free one), ready; its base URL."""
    port = port or free_port()
    child = Child(
        name,
        ["receiver"],
        {**env, "COINVOICE_PORT": str(port), "COINVOICE_HOST": "127.0.0.1"},
        log_dir / f"{name}.log",
    ).start()
    base = f"http://127.0.0.1:{port}"
    await wait_ready(child, base)
    return child, base


async def wait_ready(child: Child, base: str) -> None:
    """Until the receiver at `base` answers /health/ready 200 (it must stay alive meanwhile)."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"receiver exited: {child.log_path.read_text()[-2000:]}")
            try:
                async with session.get(base + "/health/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("receiver did not become ready")


async def post_update(session: aiohttp.ClientSession, base: str, payload: bytes) -> int:
    """Send one signed processing callback; the HTTP status (0 on a network error)."""
    headers = {
        "Content-Type": "application/json",
        "X-Processing-Key": PROCESSING_KEY,
        "X-Processing-Signature": sign(PROCESSING_SECRET, payload),
    }
    try:
        async with session.post(
            base + "/api/v2/processing/callbacks", data=payload, headers=headers
        ) as r:
            await r.read()
            return r.status
    except (TimeoutError, aiohttp.ClientError):
        return 0


async def send_all(
    base: str, payloads: list[bytes], concurrency: int, retry: bool = True
) -> dict[str, Any]:
    """Send every payload with `concurrency` senders; retry refusals; count what happened."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    accepted: list[bytes] = []
    refused = 0

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal refused
        while not queue.empty():
            payload = queue.get_nowait()
            for _attempt in range(100):
                if await post_update(session, base, payload) == 200:
                    accepted.append(payload)
                    break
                refused += 1
                if not retry:
                    break
                await asyncio.sleep(0.05)

    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(sender(session) for _ in range(concurrency)))
    return {"sent": len(payloads), "accepted": accepted, "refused_then_retried": refused}


async def wait_applied(redis: aioredis.Redis, seconds: float = 60.0) -> None:
    """Until every queued update was applied and acknowledged.

    Workers delete an entry in the same pipeline that acknowledges it, after
    its effects are committed, so an empty stream means everything is applied;
    the ledger outboxes empty once those effects are on the balances.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await stream_backlog(redis) == 0 and await pending_entries(redis) == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"updates not applied in {seconds}s: {await stream_backlog(redis)} left,"
        f" {await pending_entries(redis)} ledger entries not posted"
    )


async def ingest_stats(redis: aioredis.Redis) -> dict[str, int]:
    raw = await redis.hgetall(keys.INGEST_STATS)
    return {k.decode(): int(v) for k, v in raw.items()}


def consumer_name(child: Child) -> str:
    """The stream consumer name a worker process uses (worker/app/main.py `worker_name`)."""
    return f"{socket.gethostname()}:{child.pid}"


async def kill_holding_entries(
    redis: aioredis.Redis, child: Child, wait: bool, seconds: float = 3.0
) -> bool:
    """SIGKILL a worker; with `wait`, as soon as it holds unacknowledged entries.

    Returns whether it still held unacknowledged entries when it died, i.e.
    it was killed between reading a batch and acknowledging it.
    """
    consumer = consumer_name(child)
    deadline = time.monotonic() + seconds
    while wait and time.monotonic() < deadline:
        if await _held(redis, consumer):
            break
        await asyncio.sleep(0.001)
    child.kill()
    return await _held(redis, consumer)


async def _held(redis: aioredis.Redis, consumer: str) -> bool:
    """Does `consumer` hold unacknowledged entries in any partition? (one round trip)"""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(keys.partitions()):
            pipe.xpending_range(
                keys.updates(partition), keys.UPDATES_GROUP, "-", "+", 1, consumername=consumer
            )
        replies = await pipe.execute(raise_on_error=False)
    # A partition without its group yet answers an error: nothing held there.
    return any(reply and not isinstance(reply, Exception) for reply in replies)
