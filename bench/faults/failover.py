"""Fault: lose the Redis primary, then a receiver, then stop a worker and a receiver, under load.

Run: `make failover` (three full runs) or `.venv/bin/python bench/faults/failover.py`
(one run, about a minute).

Real processes on loopback: a Redis primary (AOF, appendfsync always), one
replica and three Sentinels; two receivers behind HAProxy (deploy/haproxy.cfg,
run by tests/balancer.py) and two workers, in Sentinel mode with
COINVOICE_REDIS_MIN_REPLICAS=1; a merchant sink. A processing layer
sends the distinct updates of INVOICES payment scenarios at RATE_PER_S and a
merchant creates invoices at CREATES_PER_S; both retry every non-200 answer
like real clients. Meanwhile:

1. the primary gets SIGKILL; the Sentinels promote the replica; the old
   primary's host comes back (same port and AOF) and rejoins as a replica,
   without which no write could be confirmed by a replica again;
2. a receiver gets SIGKILL and is replaced on its port (a supervisor's restart);
3. a worker and a receiver get SIGTERM.

Checks (bench/faults/common.py): every acknowledged update applied, once (the
invoices, ledger and balances equal the reference model's); every
acknowledged create exists; every invoice's final snapshot delivered, no
invoice's sequences backwards. Reports the failover's unavailability window:
the longest time in which no request was acknowledged.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.faults import common
from receiver.api.errors import duplicate_foreign_id
from tests import processes
from tests.balancer import Balancer
from tests.replication import ReplicatedRedis
from tests.support import create_payload, signed_headers
from worker.domain.models import Merchant
from worker.store import keys
from worker.store.redis_server import free_port

INVOICES = 400
RATE_PER_S = 30
CREATES_PER_S = 10
RECEIVERS = 2
WORKERS = 2
# Seconds of steady load before the primary is killed, and between the later steps.
WARM_UP_SECONDS = 4.0
STEP_SECONDS = 3.0
# A failover (Sentinels' down-after 1 s plus the election) must finish within this (seconds).
FAILOVER_LIMIT_SECONDS = 30.0
# The restarted old primary must be a synced replica within this (seconds): Sentinel
# converts it only after it has reported itself a primary for 8 s (measured: 14-16 s).
REJOIN_LIMIT_SECONDS = 60.0
# What a retried create answers when an earlier attempt created the invoice.
DUPLICATE_FOREIGN_ID = duplicate_foreign_id().body


@dataclass
class Creates:
    """What the merchant's create loop did."""

    sent: int = 0
    acknowledged: list[str] = field(default_factory=list)
    refused_then_retried: int = 0
    acknowledged_at: list[float] = field(default_factory=list)


async def create_paced(
    base: str, merchant: Merchant, prefix: str, rate: float, stop: asyncio.Event
) -> Creates:
    """Create invoices at `rate` per second until `stop`, retrying every non-200 answer.

    A retry of a create that reached Redis but was not confirmed (503) finds
    its foreign id taken (400): the invoice exists, exactly once.
    """
    done = Creates()
    url = base + "/api/v2/invoices/create"

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        foreign_id = f"{prefix}-{n}"
        body = json.dumps(create_payload(foreign_id)).encode()
        headers = signed_headers(merchant.key, merchant.secret, body)
        for attempt in range(common.SEND_ATTEMPTS):
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    answer = await response.json(content_type=None)
                    status = response.status
            except (TimeoutError, aiohttp.ClientError, ValueError):
                status, answer = 0, None
            if status == 200 or (attempt and status == 400 and answer == DUPLICATE_FOREIGN_ID):
                done.acknowledged.append(foreign_id)
                done.acknowledged_at.append(time.monotonic())
                return
            done.refused_then_retried += 1
            await asyncio.sleep(min(1.0, common.SEND_RETRY_SECONDS * (1 + attempt // 10)))

    tasks: list[asyncio.Task[None]] = []
    start = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        while not stop.is_set():
            tasks.append(asyncio.create_task(one(session, done.sent)))
            done.sent += 1
            await common.stack.sleep_until(start + done.sent / rate)
        await asyncio.gather(*tasks)
    return done


def longest_gap(times: list[float], since: float) -> float:
    """The longest time without an acknowledgement, from `since` on (seconds)."""
    after = sorted(t for t in times if t >= since)
    if not after:
        return float("inf")
    before = [t for t in times if t < since]
    previous = max(before) if before else since
    gaps = [b - a for a, b in zip([previous, *after], after, strict=False)]
    return max(gaps)


def per_second(times: list[float], started: float) -> list[int]:
    """How many requests were acknowledged in each second of the run."""
    counts = [0] * (int(max(times, default=started) - started) + 1)
    for t in times:
        counts[int(t - started)] += 1
    return counts


async def new_primary(group: ReplicatedRedis, old: int) -> int:
    """The port of the primary the Sentinels promote after `old` died."""
    deadline = time.monotonic() + FAILOVER_LIMIT_SECONDS
    while time.monotonic() < deadline:
        port = await asyncio.to_thread(group.current_primary_port)
        if port is not None and port != old:
            return port
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no failover within {FAILOVER_LIMIT_SECONDS}s")


async def run(
    invoices: int = INVOICES,
    rate: float = RATE_PER_S,
    creates: float = CREATES_PER_S,
    warm_up: float = WARM_UP_SECONDS,
    step: float = STEP_SECONDS,
    seed: int = 41,
    replicas: int = 1,
) -> dict[str, Any]:
    """One full run; the report (`ok` false on any loss, double effect or missing callback)."""
    async with common.rig("failover", invoices, seed=seed, replicas=replicas) as rig:
        assert rig.group is not None
        ports = [free_port() for _ in range(RECEIVERS)]
        receivers = [
            (await processes.receiver(rig.env, rig.tmp, f"receiver-{n}", port))[0]
            for n, port in enumerate(ports)
        ]
        rig.children += receivers
        workers = [rig.worker(n) for n in range(WORKERS)]
        balancer = Balancer([f"127.0.0.1:{port}" for port in ports], rig.tmp).start()
        try:
            await balancer.wait_states({f"receiver{n + 1}": "UP" for n in range(RECEIVERS)})
            payloads = rig.payloads()
            random.Random(seed).shuffle(payloads)
            stop_creating = asyncio.Event()
            sending = asyncio.create_task(common.send_paced(balancer.url, payloads, rate))
            creating = asyncio.create_task(
                create_paced(balancer.url, rig.merchant, f"fo-{seed}", creates, stop_creating)
            )
            faults = await inflict(rig, rig.group, receivers, ports, workers, warm_up, step)
            sent = await sending
            stop_creating.set()
            created = await creating
        finally:
            balancer.stop()
        report = await common.verify(rig, sent)
        lost = [
            fid
            for fid in created.acknowledged
            if await rig.service.store.id_by_foreign_id(rig.merchant.key, fid) is None
        ]
        if lost:
            report["problems"].append(f"{len(lost)} acknowledged creates lost, e.g. {lost[:3]}")
        if created.sent != len(created.acknowledged):
            report["problems"].append(f"{created.sent - len(created.acknowledged)} creates unacked")
        acked = sent.acknowledged_at + created.acknowledged_at
        killed_at, started = faults.pop("primary_killed_at"), faults.pop("started_at")
        report.update(
            {
                "front": "haproxy (deploy/haproxy.cfg)",
                "replicas": replicas,
                "creates": {
                    "sent": created.sent,
                    "acknowledged": len(created.acknowledged),
                    "refused_then_retried": created.refused_then_retried,
                    "lost": len(lost),
                },
                "unavailable_seconds": round(longest_gap(acked, killed_at - 1.0), 3),
                **faults,
                "consumers_in_group": await consumers(rig),
                "acknowledged_per_second": per_second(acked, started),
            }
        )
        report["ok"] = not report["problems"]
        report["problem_count"] = len(report["problems"])
        return report


async def inflict(
    rig: common.Rig,
    group: ReplicatedRedis,
    receivers: list[processes.Child],
    ports: list[int],
    workers: list[processes.Child],
    warm_up: float,
    step: float,
) -> dict[str, Any]:
    """The faults, in order, while the load runs; when each happened."""
    timeline: dict[str, float] = {}
    started = time.monotonic()

    def mark(event: str) -> None:
        timeline[event] = round(time.monotonic() - started, 3)

    await asyncio.sleep(warm_up)
    old = group.primary
    killed_at = time.monotonic()
    old.stop(kill=True)
    mark("primary_killed")
    promoted = await new_primary(group, old.port)
    mark("replica_promoted")
    failover_seconds = time.monotonic() - killed_at
    await asyncio.to_thread(old.start)  # the host is back: it rejoins as a replica
    mark("old_primary_restarted")
    replicas = len(group.replicas)
    await asyncio.to_thread(group.wait_replicas, promoted, replicas, REJOIN_LIMIT_SECONDS)
    mark("old_primary_rejoined_as_replica")

    await asyncio.sleep(step)
    receivers[0].kill()
    mark("receiver_0_killed")
    replacement, _ = await processes.receiver(rig.env, rig.tmp, "receiver-0b", ports[0])
    rig.children.append(replacement)
    mark("receiver_0_replaced")

    await asyncio.sleep(step)
    mark("worker_0_and_receiver_1_terminated")
    exits = await asyncio.gather(
        asyncio.to_thread(workers[0].stop), asyncio.to_thread(receivers[1].stop)
    )
    mark("worker_0_and_receiver_1_exited")
    return {
        "failover_seconds": round(failover_seconds, 3),
        "exit_codes_after_sigterm": {"worker_0": exits[0], "receiver_1": exits[1]},
        "timeline_seconds": timeline,
        "primary_killed_at": killed_at,
        "started_at": started,
    }


async def consumers(rig: common.Rig) -> list[str]:
    """The stream's consumers at the end: the stopped worker has left the group."""
    names: set[str] = set()
    for partition in range(keys.partitions()):
        rows = await rig.redis.xinfo_consumers(keys.updates(partition), keys.UPDATES_GROUP)
        names.update(_text(row["name"]) for row in rows)
    return sorted(names)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="full runs, one report line each")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the primary")
    args = parser.parse_args()
    reports = []
    for n in range(args.runs):
        reports.append(asyncio.run(run(seed=41 + n, replicas=args.replicas)))
        print(json.dumps(reports[-1]), flush=True)
    sys.exit(0 if all(r["ok"] for r in reports) else 1)


if __name__ == "__main__":
    main()
