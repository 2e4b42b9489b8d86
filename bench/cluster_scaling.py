"""One Redis vs a Redis Cluster: applied updates/s, receiver accepts/s, Redis CPU, memory/invoice.

Run: `.venv/bin/python bench/cluster_scaling.py` (about 2 minutes; prints one JSON object);
`--memory-only`: only the 1-worker runs, for the memory figures (about 40 s; one batch
from an empty store, so one-time per-master structures are divided by INVOICES);
`--marginal [--invoices 20000] [--backends redis,redis+replica,cluster,cluster-no-replicas]`:
the memory an invoice costs on each backend — two equal batches, memory read before and
after each (every master's MEMORY STATS, MEMORY USAGE and elements of every key, by kind),
the second batch's bytes per invoice being the marginal cost (about 90 s a backend).

For each backend — one redis-server, and a cluster of 3 masters + 3
replicas (tests/cluster.py: the same redis-server, `--cluster-enabled yes`,
joined by `redis-cli --cluster create --cluster-replicas 1`), all with AOF
`appendfsync always` — it measures:

* applied updates/s with 1 and with 2 worker processes (INVOICES invoices, two
  updates each, queued up front in round-robin order, callbacks delivered to
  a sink process meanwhile), with each master's CPU seconds during the run;
* receiver accepts/s: one receiver process, CONNECTIONS connections of signed
  processing callbacks (wrk when installed, else bench/harness/loadgen.py);
* memory per invoice: the sum of the masters' used_memory (less replication
  and client buffers) after the run, less before, over the invoices (each
  paid, its callbacks delivered, its ledger entries on the balance).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncio
import contextlib
import json
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from bench.harness import fill, machine, stack
from bench.harness.machine import cpu_seconds
from bench.receiver_throughput import Load, signed_bodies
from bench.worker_throughput import measure_progress, outbox_drained
from tests.cluster import LocalCluster
from tests.support import make_settings
from worker.app.runtime import invoice_service
from worker.config import Settings
from worker.ingest.consumer import ensure_group
from worker.ingest.enqueue import enqueue, queued
from worker.store import keys
from worker.store.connection import Client, connect
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer, free_port

INVOICES = 10_000
UPDATES_PER_INVOICE = 2
ENQUEUE_CHUNK = 1_000
CONNECTIONS = 32
RX_WARMUP_SECONDS = 2
RX_SECONDS = 8
RX_BODIES = 1_000
DRAIN_ROUNDS = 6  # outbox_drained waits DRAIN_TIMEOUT_SECONDS each


@dataclass
class Backend:
    """A running Redis deployment: how processes reach it, and its master processes."""

    name: str
    settings: Settings
    env: dict[str, str]
    master_pids: dict[str, int]


@contextlib.asynccontextmanager
async def backend(name: str, tmp: Path) -> AsyncIterator[Backend]:
    """One redis-server, or a 3+3 cluster with a small Redis for arq; AOF always everywhere."""
    if name in ("redis", "redis+replica"):
        with stack.redis_server(tmp / "redis") as server:
            assert server.process is not None
            replica = None
            if name == "redis+replica":
                replica = RedisServer(
                    data_dir=tmp / "replica",
                    appendfsync="always",
                    extra_args=("--replicaof", "127.0.0.1", str(server.port)),
                ).start()
                await _replica_online(server.port)
            try:
                yield Backend(
                    name,
                    make_settings(server.url),
                    stack.child_env(server.url),
                    {str(server.port): server.process.pid},
                )
            finally:
                if replica is not None:
                    replica.stop()
        return
    replicas = 0 if name == "cluster-no-replicas" else 1
    cluster = LocalCluster(tmp / "cluster", appendfsync="always", replicas=replicas).start()
    arq = RedisServer(data_dir=tmp / "arq").start()
    try:
        settings = make_settings(None, redis_cluster_nodes=cluster.startup_nodes)
        env = stack.child_env("")
        del env["COINVOICE_REDIS_URL"]
        env["COINVOICE_REDIS_CLUSTER_NODES"] = cluster.startup_nodes
        env["COINVOICE_ARQ_REDIS_URL"] = arq.url
        pids = {}
        for port in cluster.master_ports():
            process = cluster.node(port).process
            assert process is not None
            pids[str(port)] = process.pid
        yield Backend(name, settings, env, pids)
    finally:
        arq.stop()
        cluster.stop()


async def _replica_online(port: int) -> None:
    node = Client(port=port)
    try:
        for _ in range(300):
            info = await node.info("replication")
            if info.get("slave0", {}).get("state") == "online":
                return
            await asyncio.sleep(0.1)
    finally:
        await node.aclose()
    raise RuntimeError("the replica did not come online")


# used_memory less what depends on replicas and clients, not on the data (a master's
# replication backlog fills up to repl-backlog-size, 1 MiB, as it replicates).
_BUFFERS = ("mem_replication_backlog", "mem_clients_slaves", "mem_clients_normal", "mem_aof_buffer")


async def used_memory(redis: Client, backend: Backend) -> int:
    """Memory the data takes, summed over the masters: used_memory less the buffers that
    depend on replicas and clients, not on the data (a master's replication backlog
    fills up to repl-backlog-size, 1 MiB, as it replicates: 3 MiB over 3 masters)."""
    total = 0
    for port in backend.master_pids:
        node = Client(port=int(port))
        try:
            info = await node.info("memory")
        finally:
            await node.aclose()
        total += int(info["used_memory"]) - sum(
            int(info.get(name, 0))
            for name in (
                "mem_replication_backlog",
                "mem_clients_slaves",
                "mem_clients_normal",
                "mem_aof_buffer",
            )
        )
    return total


async def memory_stats(backend: Backend) -> dict[str, int]:
    """MEMORY STATS summed over the masters (the numeric top-level fields)."""
    total: dict[str, int] = {}
    for port in backend.master_pids:
        node = Client(port=int(port))
        try:
            stats = await node.memory_stats()
        finally:
            await node.aclose()
        for name, value in stats.items():
            if isinstance(value, int):
                total[name] = total.get(name, 0) + value
    return total


def key_kind(name: bytes) -> str:
    """A key's kind: its name up to the first hash tag or digit (`cv:inv:`, `cv:fids:`, …)."""
    text = name.decode(errors="replace")
    return re.split(r"[{\d]", text, maxsplit=1)[0]


async def usage_by_kind(backend: Backend) -> dict[str, dict[str, int]]:
    """MEMORY USAGE of every key, summed by kind over the masters, with the key counts."""
    out: dict[str, dict[str, int]] = {}
    for port in backend.master_pids:
        node = Client(port=int(port))
        try:
            async for name in node.scan_iter(count=1000):
                size = await node.memory_usage(name, samples=0)
                row = out.setdefault(key_kind(name), {"keys": 0, "bytes": 0})
                row["keys"] += 1
                row["bytes"] += int(size or 0)
        finally:
            await node.aclose()
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


# Elements of a key, by its type: what a stream or a schedule holds when memory is read.
_LENGTH = {b"stream": "XLEN", b"zset": "ZCARD", b"hash": "HLEN", b"list": "LLEN", b"set": "SCARD"}


async def _add_usage(node: Client, names: list[bytes], kinds: dict[str, dict[str, int]]) -> None:
    """Add the keys' MEMORY USAGE (every element), count and elements to their kinds' rows."""
    pipe = node.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
        pipe.type(name)
    replies = await pipe.execute()
    pipe = node.pipeline(transaction=False)
    for name, kind in zip(names, replies[1::2], strict=True):
        command = _LENGTH.get(kind if isinstance(kind, bytes) else kind.encode())
        pipe.execute_command(command or "STRLEN", name)
    lengths = await pipe.execute()
    for name, size, length in zip(names, replies[0::2], lengths, strict=True):
        row = kinds.setdefault(key_kind(name), {"keys": 0, "bytes": 0, "elements": 0})
        row["keys"] += 1
        row["bytes"] += int(size or 0)
        row["elements"] += int(length or 0)


async def snapshot(backend: Backend, by_kind: bool) -> dict[str, Any]:
    """Per master: INFO memory, MEMORY STATS (db.0 flattened), key count; and, summed over
    the masters, MEMORY USAGE / keys / elements by key kind (every key, not only invoices')."""
    nodes: dict[str, Any] = {}
    kinds: dict[str, dict[str, int]] = {}
    for port in backend.master_pids:
        node = Client(port=int(port))
        try:
            info = await node.info("memory")
            stats = await node.memory_stats()
            flat = {k: v for k, v in stats.items() if isinstance(v, int)}
            for k, v in (stats.get("db.0") or {}).items():
                flat[f"db.0.{k}"] = int(v)
            nodes[port] = {
                "used_memory": int(info["used_memory"]),
                "data": int(info["used_memory"]) - sum(int(info.get(f, 0)) for f in _BUFFERS),
                "stats": flat,
            }
            if not by_kind:
                continue
            batch: list[bytes] = []
            async for name in node.scan_iter(count=1000):
                batch.append(name)
                if len(batch) >= 1000:
                    await _add_usage(node, batch, kinds)
                    batch = []
            if batch:
                await _add_usage(node, batch, kinds)
        finally:
            await node.aclose()
    return {"nodes": nodes, "kinds": kinds}


def per_invoice(after: dict[str, Any], before: dict[str, Any], invoices: int) -> dict[str, Any]:
    """after − before over the invoices: the masters' data memory, the MEMORY STATS fields
    that moved, and MEMORY USAGE by key kind (with keys and elements per invoice)."""

    def total(snap: dict[str, Any], field: str) -> int:
        return sum(n["stats"].get(field, 0) for n in snap["nodes"].values())

    fields = {f for n in after["nodes"].values() for f in n["stats"]}
    stats = {
        f: round((total(after, f) - total(before, f)) / invoices, 1)
        for f in sorted(fields)
        if total(after, f) != total(before, f) and f != "peak.allocated"
    }
    kinds = {}
    for kind in sorted(set(after["kinds"]) | set(before["kinds"])):
        a = after["kinds"].get(kind, {"keys": 0, "bytes": 0, "elements": 0})
        b = before["kinds"].get(kind, {"keys": 0, "bytes": 0, "elements": 0})
        kinds[kind] = {
            f: round((a[f] - b[f]) / invoices, 2) for f in ("bytes", "keys", "elements")
        } | {"total_bytes": a["bytes"], "total_elements": a["elements"]}
    data = sum(n["data"] for n in after["nodes"].values()) - sum(
        n["data"] for n in before["nodes"].values()
    )
    return {
        "bytes_per_invoice": round(data / invoices, 1),
        "memory_stats": stats,
        "memory_usage_by_kind": kinds,
        "keys_usage_sum": round(sum(k["bytes"] for k in kinds.values()), 1),
        # Each master's key table (entries + buckets, a power of two), at the end.
        "main_hashtable_bytes": {
            p: n["stats"].get("db.0.overhead.hashtable.main", 0) for p, n in after["nodes"].items()
        },
        "keys_per_master": {p: n["stats"].get("keys.count", 0) for p, n in after["nodes"].items()},
    }


async def memory_run(name: str, invoices: int) -> dict[str, Any]:
    """Two equal batches of `invoices` invoices, each paid (two updates), its callbacks
    delivered; memory read before, after the first and after the second batch. The second
    batch's bytes per invoice are the marginal cost (no one-time structures in it)."""
    with stack.scratch_dir(f"clmem-{name}") as tmp:
        async with backend(name, tmp) as b:
            redis = connect(b.settings)
            port = free_port()
            merchant = make_merchant("Bench shop", f"http://127.0.0.1:{port}/callbacks")
            sink = stack.SinkProcess(tmp, merchant.secret, port=port).start()
            snaps = []
            try:
                await MerchantStore(redis).add(merchant)
                await ensure_group(redis)
                service = invoice_service(redis, b.settings)
                snaps.append(await snapshot(b, by_kind=True))
                drained_all = True
                for batch, salt in enumerate(("", "b")):
                    created = await fill.create_invoices(
                        service, merchant, invoices, random.Random(batch + 1), salt=salt
                    )
                    updates = fill.round_robin(
                        [
                            fill.payment(i, tx_id=(batch * invoices + n) * 10)[:UPDATES_PER_INVOICE]
                            for n, i in enumerate(created, 1)
                        ]
                    )
                    items = [queued(u) for u in updates]
                    done = int(await redis.hget(keys.INGEST_STATS, "entries") or 0)
                    for start in range(0, len(items), ENQUEUE_CHUNK):
                        await enqueue(redis, items[start : start + ENQUEUE_CHUNK])
                    children = [stack.worker(b.env, tmp, 0)]

                    async def entries(done: int = done) -> int:
                        return int(await redis.hget(keys.INGEST_STATS, "entries") or 0) - done

                    try:
                        await measure_progress(entries, len(items), [c.pid for c in children])
                        drained = None
                        for _ in range(DRAIN_ROUNDS):
                            if (drained := await outbox_drained(redis)) is not None:
                                break
                        drained_all = drained_all and drained is not None
                    finally:
                        for child in children:
                            child.stop()
                    snaps.append(await snapshot(b, by_kind=True))
            finally:
                sink.stop()
                await redis.aclose()
    return {
        "backend": name,
        "invoices_per_batch": invoices,
        "callbacks_all_delivered": drained_all,
        "first_batch": per_invoice(snaps[1], snaps[0], invoices),
        "second_batch_marginal": per_invoice(snaps[2], snaps[1], invoices),
    }


async def workers_run(name: str, workers: int, by_kind: bool = False) -> dict[str, Any]:
    """Queue INVOICES × UPDATES_PER_INVOICE updates, start `workers` workers, measure."""
    with stack.scratch_dir(f"cl-{name}") as tmp:
        async with backend(name, tmp) as b:
            redis = connect(b.settings)
            port = free_port()
            merchant = make_merchant("Bench shop", f"http://127.0.0.1:{port}/callbacks")
            sink = stack.SinkProcess(tmp, merchant.secret, port=port).start()
            try:
                await MerchantStore(redis).add(merchant)
                service = invoice_service(redis, b.settings)
                before = await used_memory(redis, b)
                stats_before = await memory_stats(b)
                invoices = await fill.create_invoices(service, merchant, INVOICES, random.Random(1))
                updates = fill.round_robin(
                    [
                        fill.payment(i, tx_id=n * 10)[:UPDATES_PER_INVOICE]
                        for n, i in enumerate(invoices, 1)
                    ]
                )
                await ensure_group(redis)
                items = [queued(u) for u in updates]
                for start in range(0, len(items), ENQUEUE_CHUNK):
                    await enqueue(redis, items[start : start + ENQUEUE_CHUNK])
                children = [stack.worker(b.env, tmp, n) for n in range(workers)]

                async def entries() -> int:
                    return int(await redis.hget(keys.INGEST_STATS, "entries") or 0)

                cpu_before = {p: cpu_seconds(pid) for p, pid in b.master_pids.items()}
                try:
                    result = await measure_progress(entries, len(items), [c.pid for c in children])
                    redis_cpu = {
                        p: round(cpu_seconds(pid) - cpu_before[p], 2)
                        for p, pid in b.master_pids.items()
                    }
                    # Memory is compared with every callback delivered and recorded: an
                    # undelivered one is still in a due zset, its attempts not yet logged.
                    drained = None
                    for _ in range(DRAIN_ROUNDS):
                        if (drained := await outbox_drained(redis)) is not None:
                            break
                finally:
                    for child in children:
                        child.stop()
                after = await used_memory(redis, b)
                stats_after = await memory_stats(b)
                kinds = await usage_by_kind(b) if by_kind else None
                key_counts = (
                    {p: int(await Client(port=int(p)).dbsize()) for p in b.master_pids}
                    if name == "cluster"
                    else None
                )
            finally:
                sink.stop()
                await redis.aclose()
    return {
        "backend": name,
        "workers": workers,
        "updates": len(items),
        "applied_per_s": result["per_s"],
        "seconds": result["seconds"],
        "worker_cpu_seconds": result["cpu_seconds"],
        "redis_master_cpu_seconds": redis_cpu,
        "memory_bytes_per_invoice": round((after - before) / INVOICES),
        "callbacks_all_delivered": drained is not None,
        # Where it goes: MEMORY STATS after − before per invoice, summed over the masters.
        "memory_stats_bytes_per_invoice": {
            name: round((stats_after[name] - stats_before.get(name, 0)) / INVOICES, 1)
            for name in stats_after
            if stats_after[name] != stats_before.get(name, 0)
        },
        "keys_per_master": key_counts,
        **({"memory_usage_by_key_kind": kinds} if kinds is not None else {}),
    }


async def receiver_run(name: str) -> dict[str, Any]:
    """One receiver process on the backend: accepted callbacks/s and the masters' CPU."""
    with stack.scratch_dir(f"clrx-{name}") as tmp:
        async with backend(name, tmp) as b:
            load = Load(tmp, signed_bodies(RX_BODIES))
            receiver, _, rx_port = await stack.receiver(b.env, tmp)
            try:
                load.run(rx_port, RX_WARMUP_SECONDS)
                cpu_before = {p: cpu_seconds(pid) for p, pid in b.master_pids.items()}
                rx_before = cpu_seconds(receiver.pid)
                result = load.run(rx_port, RX_SECONDS)
                result["receiver_cpu_share"] = round(
                    (cpu_seconds(receiver.pid) - rx_before) / RX_SECONDS, 2
                )
                result["redis_master_cpu_share"] = {
                    p: round((cpu_seconds(pid) - cpu_before[p]) / RX_SECONDS, 2)
                    for p, pid in b.master_pids.items()
                }
                result["load_generator"] = load.name
            finally:
                receiver.stop()
    return {"backend": name, **result}


async def main(args: list[str]) -> dict[str, Any]:
    stack.quiet_logging()
    if "--marginal" in args:
        return await marginal_main(args)
    memory_only = "--memory-only" in args
    out: dict[str, Any] = {"benchmark": "cluster_scaling", "machine": machine.describe()}
    out["settings"] = {
        "invoices": INVOICES,
        "updates_per_invoice": UPDATES_PER_INVOICE,
        "partitions": keys.partitions(),
        "redis_appendfsync": "always",
        "cluster": "3 masters + 3 replicas on loopback",
    }
    runs = []
    for name in ("redis", "cluster"):
        for workers in (1,) if memory_only else (1, 2):
            runs.append(await workers_run(name, workers, by_kind=memory_only))
    out["workers"] = runs
    if not memory_only:
        out["receiver"] = [await receiver_run(name) for name in ("redis", "cluster")]
    single = next(r for r in runs if r["backend"] == "redis" and r["workers"] == 1)
    clustered = next(r for r in runs if r["backend"] == "cluster" and r["workers"] == 1)
    out["memory_cluster_vs_one_redis"] = round(
        clustered["memory_bytes_per_invoice"] / single["memory_bytes_per_invoice"], 3
    )
    return out


def _option(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


async def marginal_main(args: list[str]) -> dict[str, Any]:
    """`--marginal [--invoices N] [--backends a,b,…]`: memory_run on each backend."""
    invoices = int(_option(args, "--invoices", "20000"))
    if invoices < 1_000:  # measure_progress needs a batch that lasts a while
        raise SystemExit("--invoices: at least 1,000")
    names = _option(args, "--backends", "redis,cluster").split(",")
    out: dict[str, Any] = {"benchmark": "cluster_scaling --marginal", "machine": machine.describe()}
    out["settings"] = {
        "invoices_per_batch": invoices,
        "updates_per_invoice": UPDATES_PER_INVOICE,
        "partitions": keys.partitions(),
        "redis_appendfsync": "always",
    }
    runs = [await memory_run(name, invoices) for name in names]
    out["runs"] = runs
    base = runs[0]
    out["vs_" + base["backend"]] = {
        run["backend"]: {
            batch: round(run[batch]["bytes_per_invoice"] / base[batch]["bytes_per_invoice"], 3)
            for batch in ("first_batch", "second_batch_marginal")
        }
        for run in runs[1:]
    }
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1:])), indent=2))
