"""Worker throughput: pre-queued processing updates applied by one (then two) worker processes.

Run: `.venv/bin/python bench/worker_throughput.py` (about 2 minutes; prints one JSON object).
A/B against other code: `… --before DIR`, where DIR is a checkout of it
(`git archive <commit> | tar -x -C DIR`): its workers run from DIR
(their working directory and PYTHONPATH), interleaved with this tree's in the same run.

For each run a fresh Redis (AOF, appendfsync always) gets INVOICES pending
invoices and UPDATES_PER_INVOICE updates each (mempool, 1 confirmation,
confirmed: every update changes its invoice and makes a merchant callback),
queued round-robin so that no batch holds two updates of one invoice.
Then the worker processes start, logging at the default level (info: one
JSON line per state change and per callback); the rate is measured from the
first to the last acknowledgement (the `entries` counter of cv:stats:ingest,
polled). The merchant's callbacks go to a sink process, so the workers
deliver as they would in production; `all_in_per_s` counts the time until
the last callback is delivered too.

The baseline is an arq worker tuned for throughput (bench/harness/noop_arq.py:
burst mode, `max_jobs` 100, `poll_delay` 0.01 s, no kept results, logging
off) draining NOOP_JOBS pre-queued no-op jobs on the same Redis settings, in
the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import json
import random
import time
from typing import Any

import redis.asyncio as aioredis

from bench.harness import fill, machine, stack
from bench.harness.machine import cpu_seconds
from tests.support import make_settings
from worker.app.runtime import invoice_service
from worker.domain.models import Merchant
from worker.ingest.consumer import ensure_group
from worker.ingest.enqueue import enqueue, queued
from worker.store import keys
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import free_port
from worker.store.schedules import count_due

INVOICES = 12_000
UPDATES_PER_INVOICE = 3  # 36,000 updates per run
NOOP_JOBS = 6_000
ENQUEUE_CHUNK = 1_000  # updates per XADD transaction while preparing
POLL_SECONDS = 0.01  # how often progress counters are read
RUN_TIMEOUT_SECONDS = 180.0
DRAIN_TIMEOUT_SECONDS = 120.0  # how long the outbox may take to empty after the last apply
NOOP_QUEUE = "bench:noop"
# arq waits on a Redis round trip per step of a job: on a busy machine it is slow.
NOOP_TIMEOUT_SECONDS = 180.0

GOAL_APPLIED_PER_S = 2_000
GOAL_RATIO_TO_NOOP_ARQ = 2.5


async def prepare_updates(redis: aioredis.Redis, redis_url: str, merchant: Merchant) -> int:
    """Invoices and their queued updates; how many updates are queued."""
    settings = make_settings(redis_url)
    service = invoice_service(redis, settings)
    await MerchantStore(redis).add(merchant)
    invoices = await fill.create_invoices(service, merchant, INVOICES, random.Random(1))
    updates = fill.round_robin(
        [fill.payment(inv, tx_id=inv.id * 10)[:UPDATES_PER_INVOICE] for inv in invoices]
    )
    await ensure_group(redis)
    payloads = [queued(u) for u in updates]
    for start in range(0, len(payloads), ENQUEUE_CHUNK):
        await enqueue(redis, payloads[start : start + ENQUEUE_CHUNK])
    return len(payloads)


async def measure_progress(
    read_done: Any, total: int, pids: list[int], seconds: float = RUN_TIMEOUT_SECONDS
) -> dict[str, Any]:
    """Poll `read_done()` until it reaches `total`: rate from the first to the last step."""
    deadline = time.monotonic() + seconds
    first: tuple[float, int] | None = None
    done = 0
    cpu_before = {pid: cpu_seconds(pid) for pid in pids}
    while time.monotonic() < deadline:
        done = await read_done()
        now = time.monotonic()
        if done and first is None:
            first = (now, done)
            cpu_before = {pid: cpu_seconds(pid) for pid in pids}
        if done >= total:
            break
        await asyncio.sleep(POLL_SECONDS)
    if first is None or done < total:
        raise RuntimeError(f"only {done} of {total} done in {seconds}s")
    elapsed = now - first[0]
    cpu = {str(pid): round(cpu_seconds(pid) - cpu_before[pid], 2) for pid in pids}
    return {
        "measured": done - first[1],
        "seconds": round(elapsed, 3),
        "per_s": round((done - first[1]) / elapsed),
        "cpu_seconds": cpu,
    }


async def outbox_drained(redis: aioredis.Redis) -> float | None:
    """Seconds until no callback is left to deliver (None: not within DRAIN_TIMEOUT_SECONDS)."""
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_TIMEOUT_SECONDS:
        if not await count_due(redis, keys.delivery_due, float("inf")):
            return round(time.monotonic() - started, 2)
        await asyncio.sleep(0.05)
    return None


# The log level of the measured workers: the default (every state change one JSON line).
WORKER_LOG_LEVEL = "info"


async def coinvoice_run(workers: int, code: Path | None = None) -> dict[str, Any]:
    """Queue the updates, start `workers` worker processes, measure applied/s.

    `code`: run the workers from that checkout instead of this one (A/B).
    """
    with stack.scratch_dir("wbench") as tmp, stack.redis_server(tmp) as server:
        redis = aioredis.Redis.from_url(server.url)
        port = free_port()
        merchant = make_merchant("Bench shop", f"http://127.0.0.1:{port}/callbacks")
        sink = stack.SinkProcess(tmp, merchant.secret, port=port).start()
        try:
            total = await prepare_updates(redis, server.url, merchant)
            env = stack.child_env(server.url)
            env["COINVOICE_LOG_LEVEL"] = WORKER_LOG_LEVEL
            if code is not None:
                env["PYTHONPATH"] = str(code)
            # `python -m` puts its working directory first on sys.path: the children start
            # in the checkout they run.
            with contextlib.chdir(code or Path.cwd()):
                children = [stack.worker(env, tmp, n) for n in range(workers)]

            async def entries() -> int:
                return int(await redis.hget(keys.INGEST_STATS, "entries") or 0)

            try:
                result = await measure_progress(entries, total, [c.pid for c in children])
                delivered_while_applying = len(sink.received())
                cpu_applied = sum(cpu_seconds(c.pid) for c in children)
                drained_after = await outbox_drained(redis)
                cpu_draining = sum(cpu_seconds(c.pid) for c in children) - cpu_applied
            finally:
                for child in children:
                    child.stop()
            raw_stats = await redis.hgetall(keys.INGEST_STATS)
            stats = {k.decode(): int(v) for k, v in raw_stats.items()}
            redis_cpu = cpu_seconds(server.process.pid) if server.process else None
            delivered = len(sink.received())
        finally:
            sink.stop()
            await redis.aclose()
    return {
        "workers": workers,
        "updates": total,
        "invoices": INVOICES,
        "applied": stats.get("applied", 0),
        "conflicts": stats.get("conflicts", 0),
        "callbacks_delivered_while_applying": delivered_while_applying,
        "callbacks_delivered_in_all": delivered,
        "outbox_drained_s_after_last_apply": drained_after,
        "applied_per_s": result["per_s"],
        "all_in_per_s": (
            round(result["measured"] / (result["seconds"] + drained_after))
            if drained_after is not None
            else None
        ),
        "measured_updates": result["measured"],
        "seconds": result["seconds"],
        "worker_cpu_seconds": result["cpu_seconds"],
        "worker_cpu_seconds_draining": round(cpu_draining, 2),
        # Worker CPU per update, its callback's delivery included: the machine's load
        # stretches the rates above, much less this.
        "worker_cpu_us_per_update_all_in": round(
            (sum(result["cpu_seconds"].values()) + cpu_draining) / result["measured"] * 1e6
        ),
        "redis_cpu_seconds_total": redis_cpu,
    }


async def noop_arq_run() -> dict[str, Any]:
    """NOOP_JOBS no-op arq jobs on one arq worker, same Redis settings: jobs/s."""
    from bench.harness import noop_arq

    with stack.scratch_dir("arqbench") as tmp, stack.redis_server(tmp) as server:
        redis = aioredis.Redis.from_url(server.url)
        try:
            await noop_arq.enqueue(server.url, NOOP_QUEUE, NOOP_JOBS)
            child = stack.python_module(
                "noop_arq", "--redis", server.url, "--queue", NOOP_QUEUE, log=tmp / "arq.log"
            )

            async def finished() -> int:
                return NOOP_JOBS - int(await redis.zcard(NOOP_QUEUE))

            try:
                result = await measure_progress(
                    finished, NOOP_JOBS, [child.pid], NOOP_TIMEOUT_SECONDS
                )
            finally:
                stack.stop(child)
        finally:
            await redis.aclose()
    return {
        "jobs": NOOP_JOBS,
        "jobs_per_s": result["per_s"],
        "seconds": result["seconds"],
        "worker_cpu_seconds": result["cpu_seconds"],
        "worker_cpu_us_per_job": round(
            sum(result["cpu_seconds"].values()) / result["measured"] * 1e6
        ),
    }


async def main(before: Path | None = None) -> dict[str, Any]:
    stack.quiet_logging()
    out: dict[str, Any] = {"benchmark": "worker_throughput", "machine": machine.describe()}
    out["settings"] = {
        "redis_appendfsync": "always",
        "redis_data": str(stack.SCRATCH_ROOT or "the system's temporary folder"),
        "log_level": WORKER_LOG_LEVEL,
        "batch": 256,
        "order": "round-robin: no two updates of one invoice in a batch",
        "callbacks": "delivered to a sink process during the run",
        "noop_arq": {
            "burst": True,
            "max_jobs": noop_arq_settings()[0],
            "poll_delay": noop_arq_settings()[1],
            "keep_result": 0,
            "logging": "off",
        },
    }
    if before is not None:
        out["before"] = {"code": str(before), "one_worker": await coinvoice_run(1, before)}
    one = await coinvoice_run(1)
    noop = await noop_arq_run()
    if before is not None:
        out["before"]["two_workers"] = await coinvoice_run(2, before)
    two = await coinvoice_run(2)
    out["one_worker"] = one
    out["noop_arq"] = noop
    out["two_workers"] = two
    out["ratio_to_noop_arq"] = round(one["applied_per_s"] / noop["jobs_per_s"], 2)
    out["ratio_all_in_to_noop_arq"] = (
        round(one["all_in_per_s"] / noop["jobs_per_s"], 2) if one["all_in_per_s"] else None
    )
    # The same comparison in CPU per unit of work (arq's µs per job over ours per update).
    out["cpu_ratio_to_noop_arq"] = round(
        noop["worker_cpu_us_per_job"] / one["worker_cpu_us_per_update_all_in"], 2
    )
    out["scaling_two_workers"] = round(two["applied_per_s"] / one["applied_per_s"], 2)
    if before is not None:
        b = out["before"]
        b["ratio_to_noop_arq"] = round(b["one_worker"]["applied_per_s"] / noop["jobs_per_s"], 2)
        b["ratio_all_in_to_noop_arq"] = (
            round(b["one_worker"]["all_in_per_s"] / noop["jobs_per_s"], 2)
            if b["one_worker"]["all_in_per_s"]
            else None
        )
        b["cpu_ratio_to_noop_arq"] = round(
            noop["worker_cpu_us_per_job"] / b["one_worker"]["worker_cpu_us_per_update_all_in"], 2
        )
        b["scaling_two_workers"] = round(
            b["two_workers"]["applied_per_s"] / b["one_worker"]["applied_per_s"], 2
        )
        out["speedup_one_worker"] = round(
            one["applied_per_s"] / b["one_worker"]["applied_per_s"], 2
        )
    out["goals"] = {
        "applied_per_s_ge_2000": one["applied_per_s"] >= GOAL_APPLIED_PER_S,
        "ratio_to_noop_arq_ge_2_5": out["ratio_to_noop_arq"] >= GOAL_RATIO_TO_NOOP_ARQ,
    }
    return out


def noop_arq_settings() -> tuple[int, float]:
    from bench.harness import noop_arq

    return noop_arq.MAX_JOBS, noop_arq.POLL_DELAY_SECONDS


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--before", type=Path, help="a checkout whose workers run too, for an A/B in one run"
    )
    cli = parser.parse_args()
    if cli.before is not None and not (cli.before / "worker" / "__init__.py").exists():
        parser.error(f"{cli.before} is not a coinvoice checkout")
    print(json.dumps(asyncio.run(main(cli.before and cli.before.resolve())), indent=2))
