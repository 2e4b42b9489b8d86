"""Soak: a receiver, a worker and a merchant sink at a steady rate; does memory stay flat?

Run: `.venv/bin/python bench/soak.py` (10 minutes and a little; prints one JSON object),
or `make soak`. Flags: `--seconds` (default 600), `--rate` (processing callbacks per
second, default 300), `--log-level` (default: the product's default, info),
`--tracemalloc` (debug: the receiver and worker take tracemalloc snapshots and count
live objects per type every minute; the biggest growths between the first snapshot
after warm-up and the last are reported; slows both processes, so figures of such a run
are not comparable).

The bench process drives the product as merchants and the processing layer do: each
tenth of a second it creates rate / 30 invoices through the merchant API
(`/api/v2/invoices/create`, signed, EUR priced in BTC: the receiver derives a deposit
address each), and pays each invoice it created one, two and three seconds earlier
with a signed processing callback (mempool, 1 confirmation, confirmed): `rate`
callbacks per second once under way, every one changing its invoice, so every one
makes a merchant callback, delivered to the sink. Private Redis (AOF, appendfsync
always), default log level (JSON lines to files), as in production.

Every SAMPLE_SECONDS it records the receiver's, the worker's and the sink's resident
memory (VmRSS, /proc/PID/status) and CPU, Redis used_memory, and the backlog (updates
in the stream, ledger entries not yet posted, callbacks due). Afterwards it checks
that every accepted update was applied and every invoice's final state reached the
merchant, and reports per process: RSS in minute 1 and in the last minute (medians),
the least-squares slope after warm-up (KB/min) and a verdict.

Verdict rule ("flat"): after the warm-up (WARMUP_SECONDS), the fitted line's growth
over the measured window is below FLAT_GROWTH_KB or FLAT_GROWTH_SHARE of the median
RSS, whichever is larger. Anything else is "growing". A 10-minute window cannot see a
leak slower than that; the slope is reported so a longer run can be compared.
Redis grows by design (every invoice, its ledger row and callback log stay); its
growth is reported per invoice created.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import time
import tracemalloc
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis

from bench.harness import loadgen, machine, stack
from bench.harness.stats import summary_ms
from tests.scenarios import body as update_body
from tests.support import PROCESSING_KEY, PROCESSING_SECRET, signed_headers
from worker.domain.events import TransactionUpdate
from worker.domain.models import Compliance, Status, TxStatus
from worker.services.operations import backlog
from worker.store import keys
from worker.store.invoices import decode_stored
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import free_port

SECONDS = 600.0
RATE_PER_S = 300.0  # processing callbacks; a third as many invoices created
TICK_SECONDS = 0.1
SAMPLE_SECONDS = 5.0
WARMUP_SECONDS = 60.0
FLAT_GROWTH_KB = 1024.0
FLAT_GROWTH_SHARE = 0.01
# After the load: how long without a new callback at the sink before giving up.
SETTLE_SECONDS = 30.0
MAX_CONNECTIONS = 64
CREATE_PATH = "/api/v2/invoices/create"
PROCESSING_PATH = "/api/v2/processing/callbacks"
STEPS = ((TxStatus.NOT_CONFIRMED, 0), (TxStatus.NOT_CONFIRMED, 1), (TxStatus.CONFIRMED, 3))
MEMDEBUG = Path(__file__).resolve().parent / "harness" / "memdebug"


@dataclass
class Created:
    """An invoice the merchant API answered, with what paying it needs."""

    id: int
    address: str
    sender_amount: Decimal
    at: int


@dataclass
class Counts:
    create_sent: int = 0
    created: int = 0
    create_failed: int = 0
    updates_sent: int = 0
    updates_accepted: int = 0
    updates_refused: int = 0
    errors: int = 0
    # Invoices whose three updates were all accepted.
    fully_paid: set[int] = field(default_factory=set)


class Pool:
    """Keep-alive connections to the receiver, opened as needed up to MAX_CONNECTIONS."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[loadgen.Connection] = []
        self.opened = 0
        self.free = asyncio.Condition()
        # Requests sent again on a new connection: the idle one they took had been
        # closed by the receiver's keep-alive timeout (75 s) before a byte came back.
        self.stale_retries = 0

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """One request on a kept-alive connection, as an HTTP client sends it: a request
        on an idle connection the server had closed meanwhile (no byte of an answer) is
        sent once more on a new one, as aiohttp's client and browsers do; processing
        callbacks are idempotent, and the receiver never saw it."""
        async with self.free:
            while not self.idle and self.opened >= MAX_CONNECTIONS:
                await self.free.wait()
            conn = self.idle.pop() if self.idle else None
            if conn is None:
                self.opened += 1
        try:
            if conn is None:
                conn = await loadgen.Connection.open(self.port)
                answer = await conn.exchange(request)
            else:
                try:
                    answer = await conn.exchange(request)
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    if getattr(exc, "partial", b"") != b"":
                        raise
                    conn.close()
                    self.stale_retries += 1
                    conn = await loadgen.Connection.open(self.port)
                    answer = await conn.exchange(request)
        except BaseException:
            self.opened -= 1
            if conn is not None:
                conn.close()
            async with self.free:
                self.free.notify()
            raise
        async with self.free:
            self.idle.append(conn)
            self.free.notify()
        return answer

    def close(self) -> None:
        for conn in self.idle:
            conn.close()


def payment_request(invoice: Created, step: int) -> bytes:
    status, confirmations = STEPS[step]
    update = TransactionUpdate(
        tx_id=invoice.id * 10,
        currency="BTC",
        address=invoice.address,
        amount=invoice.sender_amount,
        txid=hashlib.sha256(str(invoice.id).encode()).hexdigest(),
        confirmations=confirmations,
        status=status,
        compliance=Compliance.CLEAR,
        observed_at=invoice.at + 1 + step,
    )
    payload = update_body(update)
    headers = signed_headers(PROCESSING_KEY, PROCESSING_SECRET, payload)
    return loadgen.build_request(PROCESSING_PATH, payload, headers)


class Load:
    """The merchants' and the processing layer's traffic, tick by tick."""

    def __init__(self, pool: Pool, merchant_key: str, merchant_secret: str, rate: float) -> None:
        self.pool = pool
        self.key, self.secret = merchant_key, merchant_secret
        self.per_tick = rate / 3 * TICK_SECONDS
        self.counts = Counts()
        self.by_tick: dict[int, list[Created]] = {}
        self.invoices: list[Created] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.start = time.monotonic()
        self.create_latencies: list[float] = []

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def create(self, n: int) -> None:
        payload = json.dumps(
            {
                "timer": True,
                "title": "Soak",
                "currency": "EUR",
                "amount": f"{10 + n % 990}.{n % 100:02d}",
                "foreign_id": f"soak-{n:09d}",
                "sender_currency": "BTC",
            }
        ).encode()
        request = loadgen.build_request(
            CREATE_PATH, payload, signed_headers(self.key, self.secret, payload)
        )
        self.counts.create_sent += 1
        sent = time.monotonic()
        try:
            status, answer = await self.pool.exchange(request)
            self.create_latencies.append(time.monotonic() - sent)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.counts.errors += 1
            return
        if status != 200:
            self.counts.create_failed += 1
            return
        doc = json.loads(answer)
        doc = doc.get("data", doc)
        invoice = Created(
            int(doc["id"]),
            doc["address"],
            Decimal(doc["sender_amount"]),
            int(doc.get("fixed_at") or time.time()),
        )
        self.counts.created += 1
        self.invoices.append(invoice)
        # Paid one, two and three seconds after the merchant had its answer.
        tick = int((time.monotonic() - self.start) / TICK_SECONDS) + 1
        self.by_tick.setdefault(tick, []).append(invoice)

    async def pay(self, invoice: Created, step: int, paid: list[int]) -> None:
        self.counts.updates_sent += 1
        try:
            status = (await self.pool.exchange(payment_request(invoice, step)))[0]
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.counts.errors += 1
            return
        if status == 200:
            self.counts.updates_accepted += 1
            paid[0] += 1
            if paid[0] == len(STEPS):
                self.counts.fully_paid.add(invoice.id)
        else:
            self.counts.updates_refused += 1

    async def run(self, seconds: float) -> None:
        start = self.start = time.monotonic()
        ticks_per_s = round(1 / TICK_SECONDS)
        owed = 0.0
        made = 0
        paid: dict[int, list[int]] = {}
        for tick in range(int(seconds / TICK_SECONDS)):
            await stack.sleep_until(start + tick * TICK_SECONDS)
            owed += self.per_tick
            while owed >= 1:
                owed -= 1
                self.spawn(self.create(made))
                made += 1
            for step in range(len(STEPS)):
                for invoice in self.by_tick.get(tick - (step + 1) * ticks_per_s, []):
                    self.spawn(self.pay(invoice, step, paid.setdefault(invoice.id, [0])))
            self.by_tick.pop(tick - len(STEPS) * ticks_per_s, None)
        # The last invoices still get their updates, one second apart.
        tick = int(seconds / TICK_SECONDS)
        while self.by_tick or self.tasks:
            await stack.sleep_until(start + tick * TICK_SECONDS)
            for step in range(len(STEPS)):
                for invoice in self.by_tick.get(tick - (step + 1) * ticks_per_s, []):
                    self.spawn(self.pay(invoice, step, paid.setdefault(invoice.id, [0])))
            self.by_tick.pop(tick - len(STEPS) * ticks_per_s, None)
            tick += 1


def vm_rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class SinkCounter:
    """Counts the sink's JSONL lines incrementally (the file only grows)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def count(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.lines += data.count(b"\n", 0, end)
            self.offset += end
        return self.lines


async def sample_forever(
    redis: aioredis.Redis,
    pids: dict[str, int],
    load: Load,
    sink: SinkCounter,
    samples: list[dict[str, Any]],
    start: float,
) -> None:
    cpu_last = {name: machine.cpu_seconds(pid) for name, pid in pids.items()}
    t_last = time.monotonic()
    while True:
        await asyncio.sleep(SAMPLE_SECONDS)
        now = time.monotonic()
        cpu = {name: machine.cpu_seconds(pid) for name, pid in pids.items()}
        info = await redis.info("memory")
        samples.append(
            {
                "t_s": round(now - start, 1),
                "rss_kb": {name: vm_rss_kb(pid) for name, pid in pids.items()},
                "cpu_percent": {
                    name: round(100 * (cpu[name] - cpu_last[name]) / (now - t_last), 1)
                    for name in pids
                },
                "redis_used_memory": int(info["used_memory"]),
                "backlog": await backlog(redis, int(time.time())),
                "created": load.counts.created,
                "updates_accepted": load.counts.updates_accepted,
                "sink_callbacks": sink.count(),
            }
        )
        cpu_last, t_last = cpu, now


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def rss_report(samples: list[dict[str, Any]], name: str, seconds: float) -> dict[str, Any]:
    points = [(s["t_s"], s["rss_kb"][name]) for s in samples if s["rss_kb"][name] is not None]
    if not points:
        return {}
    first_minute = [v for t, v in points if t <= 60] or [points[0][1]]
    last_minute = [v for t, v in points if t > points[-1][0] - 60]
    after = [(t, v) for t, v in points if t > WARMUP_SECONDS]
    slope = slope_per_min(after)
    window_min = (after[-1][0] - after[0][0]) / 60 if len(after) > 1 else 0.0
    median = statistics.median(v for _, v in after) if after else points[-1][1]
    growth = slope * window_min
    allowed = max(FLAT_GROWTH_KB, FLAT_GROWTH_SHARE * median)
    return {
        "minute_1_median_kb": statistics.median(first_minute),
        "last_minute_median_kb": statistics.median(last_minute),
        "peak_kb": max(v for _, v in points),
        "slope_after_warmup_kb_per_min": round(slope, 1),
        "fitted_growth_after_warmup_kb": round(growth, 1),
        "allowed_growth_kb": round(allowed, 1),
        "verdict": "flat" if growth < allowed else "growing",
    }


async def final_check(
    redis: aioredis.Redis, load: Load, records: list[dict[str, object]]
) -> dict[str, Any]:
    """Every accepted update applied; every fully paid invoice confirmed, its last sequence
    at the sink; nothing signed wrong."""
    newest: dict[int, int] = {}
    for record in records:
        invoice_id, seq = int(record["id"]), int(record["seq"])  # type: ignore[call-overload]
        newest[invoice_id] = max(seq, newest.get(invoice_id, 0))
    statuses: dict[str, int] = {}
    not_delivered = 0
    not_confirmed = 0
    ids = [inv.id for inv in load.invoices]
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        async with redis.pipeline(transaction=False) as pipe:
            for invoice_id in chunk:
                pipe.get(keys.invoice(invoice_id))
            raw = await pipe.execute()
        for invoice_id, value in zip(chunk, raw, strict=True):
            invoice = decode_stored(value).invoice
            statuses[invoice.status.value] = statuses.get(invoice.status.value, 0) + 1
            if newest.get(invoice_id, 0) < invoice.sequence:
                not_delivered += 1
            if invoice_id in load.counts.fully_paid and invoice.status is not Status.CONFIRMED:
                not_confirmed += 1
    return {
        "invoices_by_status": statuses,
        "fully_paid_not_confirmed": not_confirmed,
        "last_sequence_not_at_sink": not_delivered,
        "bad_signatures": sum(1 for r in records if not r["signed"]),
        "backlog_at_end": await backlog(redis, int(time.time())),
    }


def tracemalloc_report(
    folder: Path, pids: dict[str, int], warmup: float, every: float
) -> dict[str, Any]:
    """Per process: the biggest growths by line and by object type, first snapshot taken
    after the warm-up against the last."""
    out: dict[str, Any] = {}
    for name, pid in pids.items():
        snaps = sorted(folder.glob(f"{pid}-*.snap"))
        types = sorted(folder.glob(f"{pid}-*.types.json"))
        if len(snaps) < 2:
            continue
        first_index = min(len(snaps) - 2, max(0, int(warmup // every)))
        first = tracemalloc.Snapshot.load(str(snaps[first_index]))
        last = tracemalloc.Snapshot.load(str(snaps[-1]))
        diff = first.compare_to(last, "lineno")
        growth = sorted(diff, key=lambda d: d.size_diff)  # compare_to(last) is first - last
        lines = [
            f"{-d.size_diff / 1024:+.1f} KiB {-d.count_diff:+d} blocks {d.traceback[0]}"
            for d in growth[:10]
        ]
        a = json.loads(types[first_index].read_text())["types"]
        b = json.loads(types[-1].read_text())["types"]
        type_growth = sorted(
            ((b.get(k, 0) - a.get(k, 0), k) for k in set(a) | set(b)), reverse=True
        )
        out[name] = {
            "snapshots": [snaps[first_index].name, snaps[-1].name],
            "traced_kb": [
                round(sum(s.size for s in first.statistics("filename")) / 1024),
                round(sum(s.size for s in last.statistics("filename")) / 1024),
            ],
            "top_growth_by_line": lines,
            "top_growth_by_type": [f"{n:+d} {k}" for n, k in type_growth[:10]],
        }
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    stack.quiet_logging()
    out: dict[str, Any] = {"benchmark": "soak", "machine": machine.describe()}
    out["settings"] = {
        "seconds": args.seconds,
        "rate_per_s": args.rate,
        "invoices_per_s": round(args.rate / 3, 1),
        "sample_seconds": SAMPLE_SECONDS,
        "warmup_seconds": WARMUP_SECONDS,
        "redis_appendfsync": "always",
        "log_level": args.log_level or "default (info)",
        "tracemalloc": args.tracemalloc,
        "processes": "receiver, worker, sink: one each; the load is the bench process",
        "flat_rule": (
            f"fitted growth after {WARMUP_SECONDS:.0f} s < max({FLAT_GROWTH_KB:.0f} KB,"
            f" {FLAT_GROWTH_SHARE:.0%} of median RSS)"
        ),
    }
    samples: list[dict[str, Any]] = []
    with stack.scratch_dir("soak") as tmp, stack.redis_server(tmp) as server:
        redis = aioredis.Redis.from_url(server.url)
        sink_port = free_port()
        merchant = make_merchant("Soak shop", f"http://127.0.0.1:{sink_port}/callbacks")
        await MerchantStore(redis).add(merchant)
        sink = stack.SinkProcess(tmp, merchant.secret, port=sink_port).start()
        debug: dict[str, str] = {}
        snapshots = tmp / "tracemalloc"
        if args.tracemalloc:
            snapshots.mkdir()
            debug = {
                "PYTHONPATH": os.pathsep.join([str(MEMDEBUG), os.environ.get("PYTHONPATH", "")]),
                "COINVOICE_BENCH_TRACEMALLOC": str(snapshots),
                "COINVOICE_BENCH_TRACEMALLOC_EVERY": str(args.snapshot_every),
            }
        env = stack.child_env(server.url, log_level=args.log_level, **debug)
        receiver, _, port = await stack.receiver(env, tmp)
        worker = stack.worker(env, tmp)
        pool = Pool(port)
        load = Load(pool, merchant.key, merchant.secret, args.rate)
        pids = {"receiver": receiver.pid, "worker": worker.pid, "sink": sink.pid}
        counter = SinkCounter(sink.records)
        try:
            await asyncio.sleep(2.0)  # the worker's start-up
            start = time.monotonic()
            sampler = asyncio.create_task(
                sample_forever(redis, pids, load, counter, samples, start)
            )
            await load.run(args.seconds)
            sent_s = time.monotonic() - start
            # Until the sink stops receiving (the backlog drained).
            seen, quiet_since = -1, time.monotonic()
            while time.monotonic() - quiet_since < SETTLE_SECONDS:
                now_seen = counter.count()
                waiting = await backlog(redis, int(time.time()))
                if now_seen != seen:
                    seen, quiet_since = now_seen, time.monotonic()
                elif not any(waiting[k] for k in ("updates", "callbacks_due", "ledger_entries")):
                    break  # nothing waits and nothing arrived for a second and a half
                await asyncio.sleep(1.5)
            sampler.cancel()
            out["tracemalloc"] = (
                tracemalloc_report(snapshots, pids, WARMUP_SECONDS, args.snapshot_every)
                if args.tracemalloc
                else None
            )
            records = sink.received()
            out["check"] = await final_check(redis, load, records)
        finally:
            pool.close()
            receiver.stop()
            worker.stop()
            sink.stop()
            await redis.aclose()
    counts = load.counts
    out["load_seconds"] = round(sent_s, 1)
    out["invoices"] = {
        "create_sent": counts.create_sent,
        "created": counts.created,
        "refused": counts.create_failed,
        "fully_paid": len(counts.fully_paid),
    }
    out["create_answer"] = summary_ms(load.create_latencies)
    out["callbacks"] = {
        "sent": counts.updates_sent,
        "accepted": counts.updates_accepted,
        "refused": counts.updates_refused,
        "network_errors": counts.errors,
        # Requests (creates and callbacks) sent again after a stale keep-alive connection.
        "stale_connection_retries": pool.stale_retries,
        "merchant_callbacks_received": len(records),
    }
    out["rss"] = {name: rss_report(samples, name, args.seconds) for name in pids}
    used = [(s["t_s"], s["redis_used_memory"]) for s in samples]
    after = [(t, v) for t, v in used if t > WARMUP_SECONDS]
    made = [(s["t_s"], s["created"]) for s in samples if s["t_s"] > WARMUP_SECONDS]
    per_invoice = slope_per_min(after) / slope_per_min(made) if len(made) > 1 else None
    out["redis_used_memory"] = {
        "minute_1_bytes": used[min(len(used) - 1, int(60 // SAMPLE_SECONDS))][1] if used else None,
        "last_bytes": used[-1][1] if used else None,
        "slope_after_warmup_kb_per_min": round(slope_per_min(after) / 1024, 1),
        "bytes_per_invoice_created": round(per_invoice) if per_invoice else None,
    }
    out["backlog_max"] = {
        key: max((s["backlog"][key] for s in samples), default=0)
        for key in ("updates", "ledger_entries", "callbacks_due")
    }
    check = out["check"]
    out["lost"] = (
        counts.updates_sent - counts.updates_accepted
        + check["fully_paid_not_confirmed"]
        + check["last_sequence_not_at_sink"]
    )  # fmt: skip
    out["samples"] = [
        {
            "t_s": s["t_s"],
            "rss_kb": s["rss_kb"],
            "cpu_percent": s["cpu_percent"],
            "redis_mb": round(s["redis_used_memory"] / 2**20, 1),
            "backlog": {k: v for k, v in s["backlog"].items() if v},
        }
        for s in samples[:: max(1, round(30 / SAMPLE_SECONDS))]
    ]  # every 30 s, to keep the JSON readable
    out["goals"] = {
        "rss_flat": all(r.get("verdict") == "flat" for n, r in out["rss"].items() if n != "sink"),
        "nothing_lost": out["lost"] == 0 and counts.errors == 0,
    }
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=SECONDS, help="how long the load runs")
    parser.add_argument("--rate", type=float, default=RATE_PER_S, help="callbacks per second")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=None,
        help="the processes' COINVOICE_LOG_LEVEL (default: the product's default, info)",
    )
    parser.add_argument(
        "--tracemalloc", action="store_true", help="debug: snapshots in the receiver and worker"
    )
    parser.add_argument(
        "--snapshot-every", type=float, default=60.0, help="seconds between --tracemalloc dumps"
    )
    return parser.parse_args()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse_args())), indent=2))
