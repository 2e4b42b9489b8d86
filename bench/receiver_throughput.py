"""Receiver throughput: signed processing callbacks at 32 connections, against a bare handler.

Run: `.venv/bin/python bench/receiver_throughput.py [--before DIR]` (about 1.5 minutes,
2 with --before; prints one JSON object). `--before DIR` measures the receiver of an
earlier checkout in the same rounds too (an A/B in one run on a noisy machine).

Servers, each a process of its own, measured one after the other in the
same run, twice (bare, bare on uvloop, receiver; then again) so that a noisy
moment of the shared machine shows as a spread instead of a wrong ratio:

* the coinvoice receiver (`python -m receiver.commands.cli receiver`) at the
  DEFAULT log level (info: the access log writes one JSON line per request)
  on its own Redis (AOF, appendfsync always): it checks the HMAC, validates,
  canonicalizes the address and appends the update before its 200;
* a bare aiohttp handler on the same route that only reads and parses the
  JSON, run as `web.run_app` runs by default (asyncio's event loop);
* the same bare handler on uvloop, the event loop the receiver runs on: the
  goal is judged against the stronger of the two baselines.

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

import argparse
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
    cpu = cpu_seconds(pid) - before
    result["server_cpu_share"] = round(cpu / MEASURE_SECONDS, 2)
    # CPU per answered request: less sensitive than the rate to a busy shared machine.
    result["server_cpu_us_per_request"] = round(cpu / max(result["requests"], 1) * 1e6, 1)
    return result


# The receiver's log level in the measurement: the default (worker/config.py).
RECEIVER_LOG_LEVEL = "info"
# The bare baselines: (name, bare_server arguments).
BARE_SERVERS = (("bare", ()), ("bare_uvloop", ("--uvloop",)))


def earlier_receiver(tree: Path, env: dict[str, str], log: Path) -> tuple[int, Any]:
    """The receiver of another checkout (`git archive <commit> | tar -x -C tree`), listening."""
    port = free_port()
    out = log.open("ab")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "receiver.commands.cli", "receiver"],
            cwd=tree,  # its own code first on sys.path, before the installed checkout
            env={**env, "COINVOICE_PORT": str(port), "COINVOICE_HOST": "127.0.0.1"},
            stdout=out,
            stderr=out,
        )
    finally:
        out.close()
    stack.wait_listening(port, process)
    return port, process


async def main(before_tree: Path | None = None) -> dict[str, Any]:
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
            "receiver_log_level": RECEIVER_LOG_LEVEL,
        }
        env = stack.child_env(server.url)
        env["COINVOICE_LOG_LEVEL"] = RECEIVER_LOG_LEVEL
        receiver, _, rx_port = await stack.receiver(env, tmp)
        bares = {}
        try:
            for name, args in BARE_SERVERS:
                port = free_port()
                bares[name] = (
                    port,
                    stack.python_module(
                        "bare_server", "--port", str(port), *args, log=tmp / f"{name}.log"
                    ),
                )
            for port, process in bares.values():
                stack.wait_listening(port, process)
            if before_tree is not None:
                bares["receiver_before"] = earlier_receiver(
                    before_tree, env, tmp / "receiver_before.log"
                )
                out["settings"]["receiver_before"] = str(before_tree)
            rounds = []
            for _ in range(ROUNDS):
                result = {
                    name: measure(load, port, proc.pid) for name, (port, proc) in bares.items()
                }
                result["receiver"] = measure(load, rx_port, receiver.pid)
                rounds.append(result)
        finally:
            for _, process in bares.values():
                stack.stop(process)
            receiver.stop()
    out["rounds"] = rounds
    out["summary"] = summarize(rounds)
    ratios = out["summary"]["ratio_to_stronger_bare_per_round"]
    p99 = out["summary"]["receiver_p99_ms_worst_round"]
    out["goals"] = {
        "ratio_ge_0_5": min(ratios) >= GOAL_RATIO_TO_BARE,
        "p99_lt_20_ms": p99 < GOAL_P99_MS,
    }
    return out


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Best rates, the ratio to each baseline per round, and the receiver's latency."""
    summary: dict[str, Any] = {
        "receiver_accepted_per_s": max(r["receiver"]["accepted_per_s"] for r in rounds),
    }
    for name, _ in BARE_SERVERS:
        summary[f"{name}_per_s"] = max(r[name]["accepted_per_s"] for r in rounds)
        summary[f"ratio_to_{name}_per_round"] = [
            round(r["receiver"]["accepted_per_s"] / r[name]["accepted_per_s"], 2) for r in rounds
        ]
    summary["ratio_to_stronger_bare_per_round"] = [
        round(
            r["receiver"]["accepted_per_s"]
            / max(r[name]["accepted_per_s"] for name, _ in BARE_SERVERS),
            2,
        )
        for r in rounds
    ]
    summary["cpu_ratio_bare_to_receiver_per_round"] = {
        name: [
            round(
                r[name]["server_cpu_us_per_request"] / r["receiver"]["server_cpu_us_per_request"], 2
            )
            for r in rounds
        ]
        for name, _ in BARE_SERVERS
    }
    if "receiver_before" in rounds[0]:
        summary["receiver_before_accepted_per_s"] = max(
            r["receiver_before"]["accepted_per_s"] for r in rounds
        )
        summary["after_to_before_per_round"] = [
            round(r["receiver"]["accepted_per_s"] / r["receiver_before"]["accepted_per_s"], 2)
            for r in rounds
        ]
        summary["before_ratio_to_stronger_bare_per_round"] = [
            round(
                r["receiver_before"]["accepted_per_s"]
                / max(r[name]["accepted_per_s"] for name, _ in BARE_SERVERS),
                2,
            )
            for r in rounds
        ]
    summary["receiver_p50_ms"] = min(r["receiver"]["p50_ms"] for r in rounds)
    summary["receiver_p99_ms_worst_round"] = max(r["receiver"]["p99_ms"] for r in rounds)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--before",
        type=Path,
        help="also measure, in the same rounds, the receiver of this earlier checkout "
        "(e.g. `git archive HEAD~3 | tar -x -C DIR`): an A/B in one run",
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.before)), indent=2))
