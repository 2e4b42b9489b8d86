"""Receiver throughput: signed processing callbacks at 32 connections, against a bare handler.

Run: `.venv/bin/python bench/receiver_throughput.py` (about 1 minute; prints one JSON object).

Two servers, each a process of its own, measured one after the other in
the same run, twice (bare, receiver, bare, receiver) so that a noisy moment
of the shared machine shows as a spread instead of a wrong ratio:

* the coinvoice receiver (`python -m receiver.commands.cli receiver`, warning-level
  logs) on its own Redis (AOF, appendfsync always): it checks the HMAC,
  validates, canonicalizes the address and XADDs the update before its 200;
* a bare aiohttp handler on the same route that only reads and parses the JSON.

The load is BODIES distinct signed callbacks (valid bech32 addresses, one
transaction each) sent in turn by `wrk` (one thread, CONNECTIONS keep-alive
connections: a C load generator that leaves the second core to the server
and Redis). Without wrk the bench falls back to bench/harness/loadgen.py in
its own process and says so. No worker runs: the stream just grows.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncio
import json
import random
import shutil
import subprocess
import time
from decimal import Decimal
from typing import Any

from bench.harness import fill, loadgen, machine, stack
from bench.harness.machine import cpu_seconds
from tests.scenarios import body
from tests.support import PROCESSING_KEY, PROCESSING_SECRET
from worker.domain.events import TransactionUpdate
from worker.domain.models import Compliance, TxStatus
from worker.domain.signing import sign
from worker.store.redis_server import free_port

PATH = "/api/v2/processing/callbacks"
BODIES = 1_000
CONNECTIONS = 32
WARMUP_SECONDS = 2
MEASURE_SECONDS = 10
ROUNDS = 2
WRK_TIMEOUT_SECONDS = 5

GOAL_RATIO_TO_BARE = 0.5
GOAL_P99_MS = 20.0


def signed_bodies(count: int) -> list[tuple[bytes, str]]:
    """`count` distinct §8 callbacks, each with its signature."""
    rng = random.Random(7)
    bodies = []
    for n in range(count):
        update = TransactionUpdate(
            tx_id=n + 1,
            currency="BTC",
            address=fill.btc_address(n, "rx"),
            amount=Decimal(rng.randint(10_000, 10_000_000)) / 10**8,
            txid=f"{n + 1:064x}",
            confirmations=rng.choice((0, 1, 3)),
            status=TxStatus.NOT_CONFIRMED,
            compliance=Compliance.CLEAR,
            observed_at=int(time.time()),
        )
        payload = body(update)
        bodies.append((payload, sign(PROCESSING_SECRET, payload)))
    return bodies


def wrk_script(bodies: list[tuple[bytes, str]], path: Path) -> Path:
    """A wrk Lua script cycling through the bodies, printing a JSON summary at the end."""
    entries = ",\n".join(
        f"{{{json.dumps(payload.decode())}, {json.dumps(signature)}}}"
        for payload, signature in bodies
    )
    path.write_text(
        f"""
local bodies = {{
{entries}
}}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Processing-Key"] = "{PROCESSING_KEY}"
request = function()
  i = i % #bodies + 1
  wrk.headers["X-Processing-Signature"] = bodies[i][2]
  return wrk.format(nil, "{PATH}", nil, bodies[i][1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"requests":%d,"duration_us":%d,"non_2xx":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""
    )
    return path


def run_wrk(script: Path, port: int, seconds: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s",
            f"--timeout={WRK_TIMEOUT_SECONDS}s", "-s", str(script), f"http://127.0.0.1:{port}",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    summary = json.loads(out.strip().splitlines()[-1])
    seconds_run = summary["duration_us"] / 1e6
    ok = summary["requests"] - summary["non_2xx"] - summary["socket_errors"]
    return {
        "requests": summary["requests"],
        "errors": summary["non_2xx"] + summary["socket_errors"],
        "accepted_per_s": round(ok / seconds_run),
        "p50_ms": summary["p50_us"] / 1000,
        "p90_ms": summary["p90_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "max_ms": summary["max_us"] / 1000,
    }


def run_python_loadgen(requests_file: Path, port: int, seconds: int) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable, "-m", "bench.harness.loadgen", "--port", str(port),
            "--requests", str(requests_file), "--connections", str(CONNECTIONS),
            "--seconds", str(seconds),
        ],
        capture_output=True, text=True, check=True, cwd=stack.ROOT,
    ).stdout  # fmt: skip
    summary = json.loads(result)
    latency = summary["latency"]
    return {
        "requests": summary["requests"],
        "errors": summary["requests"] - summary["ok"],
        "accepted_per_s": round(summary["ok"] / summary["seconds"]),
        "p50_ms": latency["p50_ms"],
        "p90_ms": latency["p90_ms"],
        "p99_ms": latency["p99_ms"],
        "max_ms": latency["max_ms"],
    }


class Load:
    """Whichever load generator this machine has."""

    def __init__(self, tmp: Path, bodies: list[tuple[bytes, str]]) -> None:
        self.wrk = shutil.which("wrk") is not None
        self.script = wrk_script(bodies, tmp / "callbacks.lua")
        self.requests_file = tmp / "requests.json"
        headers = {"Content-Type": "application/json", "X-Processing-Key": PROCESSING_KEY}
        raw = [
            loadgen.build_request(PATH, payload, {**headers, "X-Processing-Signature": sig})
            for payload, sig in bodies
        ]
        self.requests_file.write_text(json.dumps([r.decode("latin-1") for r in raw]))

    @property
    def name(self) -> str:
        return "wrk -t1" if self.wrk else "bench/harness/loadgen.py (wrk not installed)"

    def run(self, port: int, seconds: int) -> dict[str, Any]:
        if self.wrk:
            return run_wrk(self.script, port, seconds)
        return run_python_loadgen(self.requests_file, port, seconds)


def measure(load: Load, port: int, pid: int) -> dict[str, Any]:
    """Warm up, then one measured run; with the server's CPU use during it."""
    load.run(port, WARMUP_SECONDS)
    before = cpu_seconds(pid)
    result = load.run(port, MEASURE_SECONDS)
    result["server_cpu_share"] = round((cpu_seconds(pid) - before) / MEASURE_SECONDS, 2)
    return result


async def main() -> dict[str, Any]:
    stack.quiet_logging()
    out: dict[str, Any] = {"benchmark": "receiver_throughput", "machine": machine.describe()}
    with stack.scratch_dir("rxbench") as tmp, stack.redis_server(tmp) as server:
        load = Load(tmp, signed_bodies(BODIES))
        out["settings"] = {
            "connections": CONNECTIONS,
            "load_generator": load.name,
            "distinct_bodies": BODIES,
            "measure_seconds": MEASURE_SECONDS,
            "redis_appendfsync": "always",
            "log_level": "warning",
        }
        receiver, _, rx_port = await stack.receiver(stack.child_env(server.url), tmp)
        bare_port = free_port()
        bare = stack.python_module("bare_server", "--port", str(bare_port), log=tmp / "bare.log")
        try:
            stack.wait_listening(bare_port, bare)
            rounds = []
            for _ in range(ROUNDS):
                rounds.append(
                    {
                        "bare": measure(load, bare_port, bare.pid),
                        "receiver": measure(load, rx_port, receiver.pid),
                    }
                )
        finally:
            stack.stop(bare)
            receiver.stop()
    out["rounds"] = rounds
    best_rx = max(r["receiver"]["accepted_per_s"] for r in rounds)
    best_bare = max(r["bare"]["accepted_per_s"] for r in rounds)
    ratios = [r["receiver"]["accepted_per_s"] / r["bare"]["accepted_per_s"] for r in rounds]
    p99 = max(r["receiver"]["p99_ms"] for r in rounds)
    out["summary"] = {
        "receiver_accepted_per_s": best_rx,
        "bare_per_s": best_bare,
        "ratio_per_round": [round(x, 2) for x in ratios],
        "receiver_p50_ms": min(r["receiver"]["p50_ms"] for r in rounds),
        "receiver_p99_ms_worst_round": p99,
    }
    out["goals"] = {
        "ratio_ge_0_5": min(ratios) >= GOAL_RATIO_TO_BARE,
        "p99_lt_20_ms": p99 < GOAL_P99_MS,
    }
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
