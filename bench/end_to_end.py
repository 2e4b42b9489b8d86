"""End to end: processing callback sent → receiver → worker applies → merchant sink has it.

Run: `.venv/bin/python bench/end_to_end.py` (about a minute; prints one JSON object).
Flags: `--rate` (default 1,000/s), `--seconds` (default 20), `--log-level` (default: the
product's default, info, as in production), `--profile` (py-spy samples the receiver
and the worker during the send and the top functions of each are reported).

One receiver, one worker and a merchant sink, each its own process, on a
private Redis (AOF, appendfsync always), default log level (a JSON line per
state change, the access log on; the logs go to files). The bench
process sends signed processing callbacks at a fixed RATE_PER_S (open loop:
each request is due at start + i / rate, latency counts from that moment).
Every update changes its invoice (mempool → 1 confirmation → confirmed), so
each one makes a new merchant callback with a sequence computed beforehand
with the state machine; an invoice's updates are INVOICES / RATE_PER_S
seconds apart, so no callback is merged into a later one while the worker
keeps up. Latency is the time from an update's due moment to the first
arrival of its (invoice, sequence) at the sink, or of a later sequence of
that invoice when the worker fell behind and one callback carried both
(counted as `callbacks_superseded`); both clocks are CLOCK_MONOTONIC.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import datetime
import json
import math
import random
import subprocess
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

RATE_PER_S = 1000
SECONDS = 20
# The bench waits for the last callbacks while some keep arriving: until this long
# passes without a new one (then the missing ones are lost, not late)...
SETTLE_TIMEOUT_SECONDS = 20.0
# ...but no longer than this after the send ended (a backlog that large is a failure anyway).
SETTLE_CAP_SECONDS = 300.0
PATH = "/api/v2/processing/callbacks"
GOAL_P99_MS = 50.0
PY_SPY = Path(sys.executable).parent / "py-spy"
# Functions listed per process in a --profile run.
PROFILE_TOP = 12
# Frames left out of the inclusive list: the event loop's own, which every callback has.
PROFILE_SKIP = {"BaseEventLoop._run_once", "Handle._run", "BaseEventLoop.run_forever"}


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


def first_arrivals(
    records: list[dict[str, object]], wanted: set[tuple[int, int]]
) -> tuple[dict[tuple[int, int], float], int]:
    """When the merchant first knew each wanted (invoice, sequence), and how many of those
    came only inside a later sequence.

    A callback carries the invoice's newest snapshot: when two updates of an invoice are
    committed before its delivery, one callback (the later sequence) carries both (spec §9).
    So (invoice, s) counts as arrived at the first arrival of any sequence >= s.
    """
    by_invoice: dict[int, list[tuple[int, float]]] = {}
    for record in records:
        seq_t = (int(record["seq"]), float(record["t"]))  # type: ignore[call-overload,arg-type]
        by_invoice.setdefault(int(record["id"]), []).append(seq_t)  # type: ignore[call-overload]
    arrived: dict[tuple[int, int], float] = {}
    superseded = 0
    for invoice_id, seq in wanted:
        times = [t for s, t in by_invoice.get(invoice_id, []) if s >= seq]
        if times:
            arrived[(invoice_id, seq)] = min(times)
            exact = [t for s, t in by_invoice[invoice_id] if s == seq]
            superseded += not exact or min(exact) > min(times)
    return arrived, superseded


async def wait_for_sink(
    sink: stack.SinkProcess, wanted: set[tuple[int, int]]
) -> tuple[dict[tuple[int, int], float], int]:
    """`first_arrivals` once all arrived, or when SETTLE_TIMEOUT_SECONDS passed without a new
    callback (or SETTLE_CAP_SECONDS in all)."""
    cap = time.monotonic() + SETTLE_CAP_SECONDS
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    seen = 0
    while True:
        records = sink.received()
        if len(records) > seen:
            seen = len(records)
            deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        arrived, superseded = first_arrivals(records, wanted)
        if wanted <= arrived.keys() or time.monotonic() > min(deadline, cap):
            return arrived, superseded
        await asyncio.sleep(0.5)


def applied_times(log_path: Path, clock_offset: float) -> dict[tuple[int, int], float]:
    """When the worker committed each (invoice, sequence), from its `invoice_changed` lines,
    on the bench's monotonic clock (`clock_offset`: wall clock minus monotonic)."""
    applied: dict[tuple[int, int], float] = {}
    if not log_path.exists():
        return applied
    with log_path.open("rb") as lines:
        for line in lines:
            if b'"invoice_changed"' not in line:
                continue
            event = json.loads(line)
            wall = datetime.datetime.fromisoformat(event["timestamp"]).timestamp()
            applied[(int(event["invoice_id"]), int(event["sequence"]))] = wall - clock_offset
    return applied


def stages(
    expected: list[tuple[int, int]],
    due: list[float],
    applied: dict[tuple[int, int], float],
    arrived: dict[tuple[int, int], float],
) -> dict[str, dict[str, float]]:
    """Where the time went: due → committed by the worker (the receiver, the stream and the
    ingest), and committed → at the sink (the outbox: claim, read, post)."""
    ingest, outbox = [], []
    for i, key in enumerate(expected):
        if key in applied:
            ingest.append(applied[key] - due[i])
            if key in arrived:
                outbox.append(arrived[key] - applied[key])
    return {"due_to_committed": summary_ms(ingest), "committed_to_sink": summary_ms(outbox)}


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy record of `pid` for `seconds` (raw collapsed stacks, idle frames left out)."""
    return subprocess.Popen(
        [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(math.ceil(seconds)),
         "--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def profile_top(path: Path, top: int = PROFILE_TOP) -> dict[str, Any]:
    """From py-spy's collapsed stacks: samples, and the functions with the most samples
    anywhere on the stack (inclusive) and at its top (self), as percentages."""
    if not path.exists():
        return {"samples": 0}
    total = 0
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in
                  stack_text.split(";")]  # fmt: skip
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count

    def ranked(counts: dict[str, int]) -> list[str]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [f"{100 * n / total:.1f}% {name}" for name, n in best]

    loop = max(
        (n for f, n in inclusive.items() if f.startswith("BaseEventLoop._run_once")), default=0
    )
    for frame in list(inclusive):  # the event loop and what runs it (every sample has them)
        if (loop and inclusive[frame] >= loop) or frame.split(" ")[0] in PROFILE_SKIP:
            del inclusive[frame]
    return {"samples": total, "self": ranked(own), "inclusive": ranked(inclusive)}


async def main(
    rate: float = RATE_PER_S,
    seconds: float = SECONDS,
    log_level: str | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    stack.quiet_logging()
    updates_wanted = int(rate * seconds)
    out: dict[str, Any] = {"benchmark": "end_to_end", "machine": machine.describe()}
    out["settings"] = {
        "rate_per_s": rate,
        "updates": updates_wanted,
        "redis_appendfsync": "always",
        "log_level": log_level or "default (info)",
        "processes": "receiver, worker, sink: one each; the sender is the bench process",
        "profile": profile,
    }
    profiles: dict[str, Path] = {}
    with stack.scratch_dir("e2e") as tmp, stack.redis_server(tmp) as server:
        redis = aioredis.Redis.from_url(server.url)
        service = invoice_service(redis, make_settings(server.url))
        sink_port = free_port()
        merchant = make_merchant("Bench shop", f"http://127.0.0.1:{sink_port}/callbacks")
        await MerchantStore(redis).add(merchant)
        sink = stack.SinkProcess(tmp, merchant.secret, port=sink_port).start()
        count = math.ceil(updates_wanted / 3)
        invoices = await fill.create_invoices(service, merchant, count, random.Random(3))
        updates = fill.round_robin([fill.payment(inv, tx_id=inv.id * 10) for inv in invoices])
        updates = updates[:updates_wanted]
        expected = expected_sequences(invoices, updates, service.policy)
        requests = requests_for(updates)
        env = stack.child_env(server.url, log_level=log_level)
        receiver, _, port = await stack.receiver(env, tmp)
        worker = stack.worker(env, tmp)
        spies: list[subprocess.Popen[bytes]] = []
        try:
            await asyncio.sleep(2.0)  # the worker's start-up (imports, consumer group)
            pids = {"receiver": receiver.pid, "worker": worker.pid, "sink": sink.pid}
            cpu_before = {name: machine.cpu_seconds(pid) for name, pid in pids.items()}
            if profile:
                for name, child in (("receiver", receiver), ("worker", worker)):
                    profiles[name] = tmp / f"{name}.pyspy"
                    spies.append(start_profile(child.pid, seconds, profiles[name]))
            clock_offset = time.time() - time.monotonic()
            sent_at = time.monotonic()
            result, due = await loadgen.fixed_rate(port, requests, rate)
            send_s = time.monotonic() - sent_at
            cpu_sent = {name: machine.cpu_seconds(pid) for name, pid in pids.items()}
            arrived, superseded = await wait_for_sink(sink, set(expected))
            if arrived:
                out["last_arrival_after_send_s"] = round(max(arrived.values()) - due[-1], 2)
            # Busy share of one core while the bench sent: near 100 % is a saturated process.
            out["cpu_percent_during_send"] = {
                name: round(100 * (cpu_sent[name] - cpu_before[name]) / send_s, 1) for name in pids
            }
            for spy in spies:
                await asyncio.to_thread(spy.wait, 30)
            for name, path in profiles.items():
                out.setdefault("profile", {})[name] = profile_top(path)
        finally:
            receiver.stop()
            worker.stop()
            sink.stop()
            await redis.aclose()
        records = sink.received()
        applied = applied_times(tmp / "worker-0.log", clock_offset)
    latencies = [arrived[key] - due[i] for i, key in enumerate(expected) if key in arrived]
    accepted = sum(1 for status in result.status if status == 200)
    out["sent"] = len(requests)
    out["accepted"] = accepted
    out["callbacks_expected"] = len(expected)
    out["callbacks_received"] = len(latencies)
    out["callbacks_missing"] = len(expected) - len(latencies)
    # Arrived inside a later sequence's callback (merged: the worker was behind).
    out["callbacks_superseded"] = superseded
    out["bad_signatures"] = sum(1 for r in records if not r["signed"])
    out["send_to_sink"] = summary_ms(latencies)
    out["receiver_answer"] = summary_ms(result.latencies())
    out["stages"] = stages(expected, due, applied, arrived)
    p99 = out["send_to_sink"].get("p99_ms", math.inf)
    out["goals"] = {"p99_lt_50_ms": p99 < GOAL_P99_MS and out["callbacks_missing"] == 0}
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=RATE_PER_S, help="callbacks per second")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="how long to send")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=None,
        help="the processes' COINVOICE_LOG_LEVEL (default: the product's default, info)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the receiver and worker")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    result = asyncio.run(main(args.rate, args.seconds, args.log_level, args.profile))
    print(json.dumps(result, indent=2))
