"""Slow clients: what 1,000 trickling connections from one address cost a receiver.

Run: `.venv/bin/python bench/slow_clients.py [CONNECTIONS]` (about 12 seconds; prints
one JSON object).

A `coinvoice receiver` with its default limits (a request head within 10 s,
64 connections per client address) gets CONNECTIONS connections from
127.0.0.1, each trickling a request head one byte per 5 s (slowloris).
Reported: how each connection was answered (429 at once for those over the
cap, 408 once the head timeout passed) and the descriptors the receiver
holds above its baseline, sampled each second until every connection ended.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncio
import json
import os
import subprocess
import tempfile
import time
from collections import Counter

from worker.store.redis_server import RedisServer, free_port

CONNECTIONS = 1000
# Seconds between two bytes of a trickled head, and the measurement's hard stop.
TRICKLE_SECONDS = 5.0
MAX_SECONDS = 60.0
HEAD = b"POST /api/v2/processing/callbacks HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"a" * 1000


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def slow_client(port: int, answers: Counter[str]) -> None:
    """Trickle the head until the receiver answers or closes; count how it ended."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        answers["connect_failed"] += 1
        return
    try:
        for byte in HEAD:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(200), TRICKLE_SECONDS)
            except TimeoutError:
                continue
            answers[data.split(b" ")[1].decode() if data else "closed"] += 1
            return
        answers["head_completed"] += 1
    except ConnectionError:
        answers["reset"] += 1
    finally:
        writer.close()


async def wait_listening(port: int) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return


async def main(connections: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(data_dir=Path(tmp) / "redis").start()
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COINVOICE_")},
            "COINVOICE_REDIS_URL": redis.url,
            "COINVOICE_PORT": str(port),
            "COINVOICE_LOG_LEVEL": "warning",
            "COINVOICE_LOG_FORMAT": "json",
        }
        receiver = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "receiver.commands.cli",
            "receiver",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_listening(port)
            await asyncio.sleep(0.5)  # the probe connection is gone
            baseline = descriptors(receiver.pid)
            answers: Counter[str] = Counter()
            started = time.monotonic()
            clients = [asyncio.create_task(slow_client(port, answers)) for _ in range(connections)]
            samples: list[tuple[float, int]] = []
            while time.monotonic() - started < MAX_SECONDS:
                samples.append(
                    (round(time.monotonic() - started, 1), descriptors(receiver.pid) - baseline)
                )
                if all(client.done() for client in clients):
                    break
                await asyncio.sleep(1)
            left = sum(not client.done() for client in clients)
            for client in clients:
                client.cancel()
            return {
                "connections": connections,
                "answers": dict(answers),
                "receiver_descriptors_above_baseline_by_second": samples,
                "connections_still_open_at_the_end": left,
            }
        finally:
            receiver.terminate()
            await receiver.wait()
            redis.stop()


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else CONNECTIONS
    print(json.dumps(asyncio.run(main(count))))
