"""End to end: processing callback sent → receiver → worker applies → merchant sink has it.

Run: `.venv/bin/python bench/end_to_end.py` (about 30 seconds; prints one JSON object).

One receiver, one worker and a merchant sink, each its own process, on a
private Redis (AOF, appendfsync always), warning-level logs. The bench
process sends signed processing callbacks at a fixed RATE_PER_S (open loop:
each request is due at start + i / rate, latency counts from that moment).
Every update changes its invoice (mempool → 1 confirmation → confirmed), so
each one makes a new merchant callback with a sequence computed beforehand
with the state machine; an invoice's updates are INVOICES / RATE_PER_S
seconds apart, so no callback is merged into a later one. Latency is the
time from an update's due moment to the first arrival of its (invoice,
sequence) at the sink (both clocks are CLOCK_MONOTONIC of this machine).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncio
import json
import math
import random
import time
from typing import Any

import redis.asyncio as aioredis

from bench.harness import fill, loadgen, machine, stack
from bench.harness.stats import summary_ms
from tests.scenarios import body
from tests.support import PROCESSING_KEY, PROCESSING_SECRET, make_settings
from worker.app.runtime import invoice_service
from worker.domain import machine as state_machine
from worker.domain.events import TransactionUpdate
from worker.domain.models import Invoice
from worker.domain.signing import sign
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import free_port

RATE_PER_S = 500
SECONDS = 20
UPDATES = RATE_PER_S * SECONDS
SETTLE_TIMEOUT_SECONDS = 20.0  # how long the last callbacks may take to arrive
PATH = "/api/v2/processing/callbacks"
GOAL_P99_MS = 100.0


def expected_sequences(
    invoices: list[Invoice], updates: list[TransactionUpdate], policy: state_machine.Policy
) -> list[tuple[int, int]]:
    """For each update in send order: (invoice id, the sequence its callback will carry)."""
    by_address = {inv.address.address: inv for inv in invoices if inv.address}
    current = {inv.id: inv for inv in invoices}
    expected = []
    for update in updates:
        invoice = current[by_address[update.address].id]
        transition = state_machine.apply(invoice, update, policy)
        assert transition.callback is not None, "every update must make a callback"
        current[invoice.id] = transition.invoice
        expected.append((invoice.id, transition.invoice.sequence))
    return expected


def requests_for(updates: list[TransactionUpdate]) -> list[bytes]:
    headers = {"Content-Type": "application/json", "X-Processing-Key": PROCESSING_KEY}
    out = []
    for update in updates:
        payload = body(update)
        signed = {**headers, "X-Processing-Signature": sign(PROCESSING_SECRET, payload)}
        out.append(loadgen.build_request(PATH, payload, signed))
    return out


async def wait_for_sink(
    sink: stack.SinkProcess, wanted: set[tuple[int, int]]
) -> dict[tuple[int, int], float]:
    """First arrival time of each wanted (invoice, sequence), waiting up to the settle timeout."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    while True:
        arrived: dict[tuple[int, int], float] = {}
        for record in sink.received():
            key = (int(record["id"]), int(record["seq"]))  # type: ignore[call-overload]
            arrived.setdefault(key, float(record["t"]))  # type: ignore[arg-type]
        if wanted <= arrived.keys() or time.monotonic() > deadline:
            return arrived
        await asyncio.sleep(0.25)


async def main() -> dict[str, Any]:
    stack.quiet_logging()
    out: dict[str, Any] = {"benchmark": "end_to_end", "machine": machine.describe()}
    out["settings"] = {
        "rate_per_s": RATE_PER_S,
        "updates": UPDATES,
        "redis_appendfsync": "always",
        "log_level": "warning",
        "processes": "receiver, worker, sink: one each; the sender is the bench process",
    }
    with stack.scratch_dir("e2e") as tmp, stack.redis_server(tmp) as server:
        redis = aioredis.Redis.from_url(server.url)
        service = invoice_service(redis, make_settings(server.url))
        sink_port = free_port()
        merchant = make_merchant("Bench shop", f"http://127.0.0.1:{sink_port}/callbacks")
        await MerchantStore(redis).add(merchant)
        sink = stack.SinkProcess(tmp, merchant.secret, port=sink_port).start()
        count = math.ceil(UPDATES / 3)
        invoices = await fill.create_invoices(service, merchant, count, random.Random(3))
        updates = fill.round_robin([fill.payment(inv, tx_id=inv.id * 10) for inv in invoices])
        updates = updates[:UPDATES]
        expected = expected_sequences(invoices, updates, service.policy)
        requests = requests_for(updates)
        env = stack.child_env(server.url)
        receiver, _, port = await stack.receiver(env, tmp)
        worker = stack.worker(env, tmp)
        try:
            await asyncio.sleep(2.0)  # the worker's start-up (imports, consumer group)
            result, due = await loadgen.fixed_rate(port, requests, RATE_PER_S)
            arrived = await wait_for_sink(sink, set(expected))
        finally:
            receiver.stop()
            worker.stop()
            sink.stop()
            await redis.aclose()
        records = sink.received()
    latencies = [arrived[key] - due[i] for i, key in enumerate(expected) if key in arrived]
    accepted = sum(1 for status in result.status if status == 200)
    out["sent"] = len(requests)
    out["accepted"] = accepted
    out["callbacks_expected"] = len(expected)
    out["callbacks_received"] = len(latencies)
    out["callbacks_missing"] = len(expected) - len(latencies)
    out["bad_signatures"] = sum(1 for r in records if not r["signed"])
    out["send_to_sink"] = summary_ms(latencies)
    out["receiver_answer"] = summary_ms(result.latencies())
    p99 = out["send_to_sink"].get("p99_ms", math.inf)
    out["goals"] = {"p99_lt_100_ms": p99 < GOAL_P99_MS and out["callbacks_missing"] == 0}
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
