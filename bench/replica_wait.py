"""What waiting for a replica costs: processing callbacks with COINVOICE_REDIS_MIN_REPLICAS 0 vs 1.

Run: `.venv/bin/python bench/replica_wait.py` (about 1 minute; prints one JSON object).

One primary (AOF, appendfsync always) with one replica on loopback
(tests/replication.py), two receivers on it that differ only in
COINVOICE_REDIS_MIN_REPLICAS (0: answer after the XADD; 1: after the XADD and
a WAIT for the replica), measured one after the other, twice, in the same run:

* throughput and latency at CONNECTIONS connections (receiver_throughput.py's
  load: wrk when installed, else bench/harness/loadgen.py);
* the latency of one request at a time (SEQUENTIAL requests on one connection),
  which is what a lone processing layer waits for;
* Redis alone, without HTTP: REDIS_ROUND_TRIPS sequential `SET` pipelines
  with and without `WAIT 1`, the bare price of the replica's acknowledgement.

WAIT returns when the replica has *received* the write (its REPLCONF ACK
offset), not when it has fsynced it: Redis 7.0 has no WAITAOF.

On loopback the replica is microseconds away; across hosts every WAIT adds a
network round trip to it, so add that RTT to the one-at-a-time numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp

from bench.harness import machine, stack
from bench.receiver_throughput import BODIES, CONNECTIONS, MEASURE_SECONDS, PATH, Load, measure
from bench.receiver_throughput import signed_bodies as make_bodies
from tests.replication import ReplicatedRedis
from tests.support import PROCESSING_KEY
from worker.store.connection import connect_url

ROUNDS = 2
SEQUENTIAL = 300
REDIS_ROUND_TRIPS = 2000


async def one_at_a_time(port: int, bodies: list[tuple[bytes, str]]) -> dict[str, float]:
    """Latency percentiles of SEQUENTIAL requests sent one after another (milliseconds)."""
    latencies = []
    url = f"http://127.0.0.1:{port}{PATH}"
    async with aiohttp.ClientSession() as session:
        for payload, signature in bodies[:SEQUENTIAL]:
            headers = {
                "Content-Type": "application/json",
                "X-Processing-Key": PROCESSING_KEY,
                "X-Processing-Signature": signature,
            }
            started = time.perf_counter()
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append((time.perf_counter() - started) * 1000)
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50_ms": round(cuts[49], 3), "p99_ms": round(cuts[98], 3)}


async def redis_only(url: str) -> dict[str, float]:
    """p50/p99 of a SET pipeline, and of SET + WAIT 1, one at a time (microseconds)."""
    client = connect_url(url)
    out: dict[str, float] = {}
    try:
        for label, wait in (("set", False), ("set_wait_1", True)):
            latencies = []
            for n in range(REDIS_ROUND_TRIPS):
                started = time.perf_counter()
                async with client.pipeline(transaction=False) as pipe:
                    pipe.set("bench:wait", n)
                    if wait:
                        pipe.wait(1, 1000)
                    results = await pipe.execute()
                latencies.append((time.perf_counter() - started) * 1e6)
                assert not wait or results[-1] == 1, results
            cuts = statistics.quantiles(latencies, n=100)
            out[f"{label}_p50_us"], out[f"{label}_p99_us"] = round(cuts[49]), round(cuts[98])
    finally:
        await client.aclose()
    return out


async def main() -> dict[str, Any]:
    stack.quiet_logging()
    out: dict[str, Any] = {"benchmark": "replica_wait", "machine": machine.describe()}
    with stack.scratch_dir("waitbench") as tmp:
        group = ReplicatedRedis(tmp / "ha", replica_count=1, sentinel_count=0).start()
        try:
            bodies = make_bodies(BODIES)
            load = Load(tmp, bodies)
            out["settings"] = {
                "connections": CONNECTIONS,
                "load_generator": load.name,
                "measure_seconds": MEASURE_SECONDS,
                "sequential_requests": SEQUENTIAL,
                "replicas": 1,
                "redis_appendfsync": "always (primary and replica)",
            }
            out["redis_only"] = await redis_only(group.primary.url)
            receivers = {}
            for replicas in (0, 1):
                env = stack.child_env(group.primary.url, COINVOICE_REDIS_MIN_REPLICAS=str(replicas))
                child, _, port = await stack.receiver(env, tmp)
                receivers[replicas] = (child, port)
            rounds = []
            try:
                for _ in range(ROUNDS):
                    row = {}
                    for replicas, (child, port) in receivers.items():
                        result = measure(load, port, child.pid)
                        result["one_at_a_time"] = await one_at_a_time(port, bodies)
                        row[f"min_replicas_{replicas}"] = result
                    rounds.append(row)
            finally:
                for child, _ in receivers.values():
                    child.stop()
        finally:
            group.stop()
    out["rounds"] = rounds

    def best(key: str, field: str, pick: Any = max) -> Any:
        return pick(r[key][field] for r in rounds)

    out["summary"] = {
        "accepted_per_s": {k: best(k, "accepted_per_s") for k in rounds[0]},
        "p50_ms_at_connections": {k: best(k, "p50_ms", min) for k in rounds[0]},
        "p99_ms_at_connections": {k: best(k, "p99_ms", min) for k in rounds[0]},
        "one_at_a_time_p50_ms": {
            k: min(r[k]["one_at_a_time"]["p50_ms"] for r in rounds) for k in rounds[0]
        },
    }
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
