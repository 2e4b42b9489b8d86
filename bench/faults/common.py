"""The rig every fault run shares: Redis, a merchant sink, invoices with a reference model,
paced senders, and the final check (invoices, ledger, e-mails and deliveries).

The reference is tests/scenarios.py: each invoice's distinct updates applied
once, in order, through the pure state machine. Deliveries are checked at
the merchant's sink: every invoice's final sequence arrived, signed, and no
invoice's sequences ever went backwards in arrival order (a repeat of the
same sequence is allowed: delivery is at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.harness import stack
from tests import processes
from tests.replication import ReplicatedRedis
from tests.scenarios import Plan, body, create_plans, mismatches, reference
from tests.support import make_settings
from worker.app.runtime import invoice_service
from worker.domain.models import Merchant
from worker.services.invoices import InvoiceService
from worker.store.connection import connect
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer, free_port

# Fast failure handling, so a run converges in seconds: a callback attempt gives up
# after 2 s and is retried after 1, 1, 1, 1, 2, … s; dead workers' updates are
# taken over after 1 s (tests/processes.py).
# The failover run: every process in Sentinel mode, one replica must hold each write.
HA_ENV = {"COINVOICE_REDIS_MIN_REPLICAS": "1", "COINVOICE_REDIS_WAIT_TIMEOUT_MS": "1000"}
FAULT_ENV = {
    "COINVOICE_CALLBACK_TIMEOUT_SECONDS": "2",
    "COINVOICE_CALLBACK_RETRY_SCHEDULE": "1,1,1,1,2,2,2,2,3,3,3,3,3",
}
# Attempts per payload before a sender gives up on it (50 ms apart at first).
SEND_ATTEMPTS = 400
SEND_RETRY_SECONDS = 0.05
# How long applying and delivering may take once the senders are done (seconds).
SETTLE_SECONDS = 60.0


@dataclass
class Rig:
    """One fault run's world."""

    name: str
    tmp: Path
    server: RedisServer
    redis: aioredis.Redis
    service: InvoiceService
    merchant: Merchant
    sink: stack.SinkProcess
    env: dict[str, str]
    plans: list[Plan]
    group: ReplicatedRedis | None = None
    children: list[processes.Child] = field(default_factory=list)

    def worker(self, n: int) -> processes.Child:
        child = stack.worker(self.env, self.tmp, n)
        self.children.append(child)
        return child

    async def receiver(self) -> str:
        child, base, _ = await stack.receiver(self.env, self.tmp)
        self.children.append(child)
        return base

    def payloads(self) -> list[bytes]:
        """Each distinct update's processing callback, once."""
        return [body(update) for plan in self.plans for update in plan.updates]


@contextlib.contextmanager
def _redis(tmp: Path, replicas: int) -> Iterator[tuple[RedisServer, ReplicatedRedis | None]]:
    """One Redis, or a primary with `replicas` replicas and three Sentinels (the failover run)."""
    if not replicas:
        with stack.redis_server(tmp) as server:
            yield server, None
        return
    group = ReplicatedRedis(tmp / "ha", replica_count=replicas, sentinel_count=3).start()
    try:
        yield group.primary, group
    finally:
        group.stop()


@contextlib.asynccontextmanager
async def rig(name: str, invoices: int, seed: int, replicas: int = 0) -> AsyncIterator[Rig]:
    """Redis (AOF, appendfsync always), a sink process, `invoices` invoices with plans.

    `replicas` > 0: Redis is a primary with that many replicas and three
    Sentinels (tests/replication.py), and every process, this one included,
    runs in Sentinel mode with one replica required for each write.
    """
    stack.quiet_logging()
    with stack.scratch_dir(name) as tmp, _redis(tmp, replicas) as (server, group):
        ha = {} if group is None else HA_ENV | {"COINVOICE_REDIS_SENTINELS": group.sentinel_setting}
        # This process runs on the same Redis settings as its children.
        settings = make_settings(
            server.url, **{k.removeprefix("COINVOICE_").lower(): v for k, v in ha.items()}
        )
        redis = connect(settings)  # rides out a Redis restart or failover, like the workers do
        port = free_port()
        merchant = make_merchant("Fault shop", f"http://127.0.0.1:{port}/callbacks")
        await MerchantStore(redis).add(merchant)
        sink = stack.SinkProcess(tmp, merchant.secret, port=port).start()
        service = invoice_service(redis, settings)
        plans = await create_plans(service, merchant, invoices, random.Random(seed), prefix=name)
        env = stack.child_env(server.url, COINVOICE_MAILDIR=str(tmp / "maildir"), **FAULT_ENV, **ha)
        world = Rig(name, tmp, server, redis, service, merchant, sink, env, plans, group=group)
        try:
            yield world
        finally:
            for child in world.children:
                child.stop()
            sink.stop()
            await redis.aclose()


@dataclass
class Sent:
    """What the senders did."""

    sent: int = 0
    acknowledged: int = 0
    refused_then_retried: int = 0
    given_up: int = 0
    # time.monotonic() of every 200, in order: the gaps show how long the service was down.
    acknowledged_at: list[float] = field(default_factory=list)


async def send_paced(
    base: str | Sequence[str], payloads: list[bytes], rate: float, concurrency: int = 16
) -> Sent:
    """Send each payload once (retrying refusals until a 200) at `rate` per second.

    Several bases (receivers without a load balancer): a retry goes to the next one.
    """
    bases = [base] if isinstance(base, str) else list(base)
    sent = Sent(sent=len(payloads))
    limit = asyncio.Semaphore(concurrency)
    start = time.monotonic()

    async def one(session: aiohttp.ClientSession, i: int, payload: bytes) -> None:
        await stack.sleep_until(start + i / rate)
        async with limit:
            for attempt in range(SEND_ATTEMPTS):
                target = bases[(i + attempt) % len(bases)]
                if await processes.post_update(session, target, payload) == 200:
                    sent.acknowledged += 1
                    sent.acknowledged_at.append(time.monotonic())
                    return
                sent.refused_then_retried += 1
                await asyncio.sleep(min(1.0, SEND_RETRY_SECONDS * (1 + attempt // 10)))
            sent.given_up += 1

    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, i, p) for i, p in enumerate(payloads)))
    return sent


async def deliveries(rig: Rig, seconds: float) -> tuple[dict[str, Any], list[str]]:
    """Wait until every invoice's final sequence reached the sink; check order and signatures."""
    stored = await rig.service.store.get_many([plan.invoice.id for plan in rig.plans])
    finals = {i: s.invoice.sequence for i, s in stored.items() if s.invoice.sequence}
    deadline = time.monotonic() + seconds
    while True:
        records = rig.sink.received()
        arrived = {(int(r["id"]), int(r["seq"])) for r in records}  # type: ignore[call-overload]
        missing = [i for i, seq in finals.items() if (i, seq) not in arrived]
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    problems = [f"invoice {i}: final sequence {finals[i]} never delivered" for i in missing]
    last: dict[int, int] = {}
    backwards = 0
    for record in records:
        invoice_id, seq = int(record["id"]), int(record["seq"])  # type: ignore[call-overload]
        if seq < last.get(invoice_id, 0):
            backwards += 1
            problems.append(f"invoice {invoice_id}: sequence {seq} after {last[invoice_id]}")
        last[invoice_id] = max(seq, last.get(invoice_id, 0))
    unsigned = sum(1 for r in records if not r["signed"])
    if unsigned:
        problems.append(f"{unsigned} callbacks with a bad signature")
    return {
        "callbacks_received": len(records),
        "distinct_snapshots_received": len(arrived),
        "invoices_with_callbacks": len(finals),
        "final_sequence_received": len(finals) - len(missing),
        "sequences_backwards": backwards,
        "bad_signatures": unsigned,
    }, problems


async def verify(rig: Rig, sent: Sent, **observed: Any) -> dict[str, Any]:
    """Everything applied and delivered exactly as the reference says; the report."""
    problems: list[str] = []
    if sent.acknowledged != sent.sent:
        problems.append(f"{sent.sent - sent.acknowledged} updates never acknowledged")
    try:
        await processes.wait_applied(rig.redis, SETTLE_SECONDS)
    except AssertionError as exc:  # reported with the rest, and the processes' logs
        problems.append(str(exc))
    problems += await mismatches(rig.redis, rig.merchant, reference(rig.plans, rig.service.policy))
    delivered, delivery_problems = await deliveries(rig, SETTLE_SECONDS)
    problems += delivery_problems
    stats = await processes.ingest_stats(rig.redis)
    if stats.get("entries", 0) < sent.acknowledged:
        problems.append(f"stream entries {stats.get('entries')} < acknowledged {sent.acknowledged}")
    return {
        "fault": rig.name,
        "invoices": len(rig.plans),
        "distinct_updates": sum(len(p.updates) for p in rig.plans),
        "sent": sent.sent,
        "acknowledged": sent.acknowledged,
        "refused_then_retried": sent.refused_then_retried,
        "applied": stats,
        "delivered": delivered,
        **observed,
        "problems": problems[:20],
        "problem_count": len(problems),
        "ok": not problems,
        **({"log_tails": log_tails(rig)} if problems else {}),
    }


def log_tails(rig: Rig, chars: int = 3000) -> dict[str, str]:
    """The end of each process's log, for a post-mortem of a failed run."""
    tails = {}
    for path in sorted(rig.tmp.glob("*.log")):
        tails[path.name] = path.read_text(errors="replace")[-chars:]
    return tails


def main(report: dict[str, Any]) -> None:
    """Print the report; exit 1 if anything was lost or doubled."""
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)
