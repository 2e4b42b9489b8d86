"""Scale: Redis memory per invoice, and the cost of one update as live invoices grow.

Run: `.venv/bin/python bench/scale.py` (about 1.5 minutes; prints one JSON object).

1. Memory. MEMORY_INVOICES confirmed invoices, each paid in two transactions
   (instalments: mempool, 1 confirmation, confirmed, twice; every merchant
   callback delivered once), written with the store's own scripts:
   the token and address lookups and create.lua, commit.lua with the final
   state and all its effects (callback outbox, ledger outbox), then
   delivery_done.lua per delivered callback. Reported: the
   INFO used_memory delta per invoice (everything, the merchant's ledger
   entries included) and MEMORY USAGE of each of an invoice's own keys.
2. Update cost. Pending invoices are added (create.lua) until 1,000 →
   10,000 → 100,000 → 1,000,000 are live; at each size a fresh in-process
   `Ingest` (the worker's code, cold caches) applies one update to each of
   SAMPLES random invoices never touched before, one batch each, then
   BATCHES full batches of random ones. Reported: per-update latency of the
   one-update batch (p50/p99), µs per update in full batches, and Redis' own
   µs per EVALSHA (INFO commandstats) at each size.

Invoices are loaded fast with bench/harness/bulk.py: the store computes its
script calls for a template invoice once, and each invoice's calls are the
template's with its identity (id, foreign id, token, address, txids) filled
in. Keys carry partition hash tags that depend on that identity (the
invoice's partition, its foreign id's, its address's: worker/store/keys.py),
so the template's tags are markers too, one per kind of key, and each
invoice's ids are drawn as `InvoiceStore.next_id` draws them: in its foreign
id's partition, from per-partition counters (kept here, stored at the end).
The ledger entries commit.lua leaves in the partitions' outboxes are posted
onto the merchant's balances and ledger (`post_ledger`) before memory is
read, as a worker does within a fraction of a second. Redis runs with AOF
and appendfsync always; automatic AOF rewrites are switched off for part 2
(a rewrite of a multi-GB dataset would land in the middle of a measurement
and say nothing about the cost of an update).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncio
import json
import random
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis

from bench.harness import bulk, fill, machine, stack
from bench.harness.stats import summary_ms
from tests.support import make_settings
from worker.app.runtime import invoice_service
from worker.domain import machine as state_machine
from worker.domain.events import TransactionUpdate
from worker.domain.machine import Transition
from worker.domain.models import DepositAddress, Invoice, Merchant, PaymentType
from worker.ingest.consumer import Ingest, ensure_group
from worker.services.invoices import InvoiceService
from worker.store import keys, scripts
from worker.store.codec import dump_update
from worker.store.deliveries import Outcome, record_call
from worker.store.invoices import Stored
from worker.store.ledger import pending_entries, post_ledger
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.scripts import Scripts

MEMORY_INVOICES = 100_000
SIZES = (1_000, 10_000, 100_000, 1_000_000)
SAMPLES = 300  # one-update batches timed at each size
BATCHES = 2  # full batches (256 updates) timed at each size
DELIVERY_MS = 3  # the duration recorded for each delivered callback
GOAL_BYTES_PER_INVOICE = 2048

# How an invoice's identity is spelled in a template; each is replaced per invoice.
ID = "987654321"  # the invoice id: also the address id, inside tx ids (id * 10 + n) and keys
TOKEN = "TOKENxTOKENxTOKENxTOKENxTOKENxTO"  # noqa: S105 - a marker, 32 characters like a token
ADDRESS = "bc1qADDRESSMARKER".ljust(42, "x")  # as long as a P2WPKH address
TXID = "TXIDMARKER"  # the first 10 of a txid's 64 hex digits
FOREIGN = "FOREIGNxMARKER"  # the foreign id's number (`order-{n}`): it decides the partition
# The partition tags in a template's keys, by the kind of key that carries them.
INVOICE_TAG = "{INVOICE-TAG}"  # the invoice's partition: the invoice and its schedules
FOREIGN_TAG = "{FOREIGN-TAG}"  # the foreign id's partition (the same, as ids are drawn)
ADDRESS_TAG = "{ADDRESS-TAG}"  # the deposit address's partition
_PARTITION_TAG = re.compile(r"\{p\d+(?:\.\d+)?\}")


# --------------------------------------------------------------------------- templates


def filler_address(n: int) -> str:
    """As long as a bech32 P2WPKH address (42 characters); never leaves Redis."""
    return f"bc1qfill{n:034d}"


class Ids:
    """Invoice ids as `InvoiceStore.next_id` draws them (in the foreign id's partition),
    counted here for speed; `store` writes the counters so the store's own draws follow."""

    def __init__(self, merchant: Merchant) -> None:
        self.merchant = merchant
        self.counters = [0] * keys.partitions()
        self.foreign: dict[int, int] = {}  # invoice id → the n of its foreign id `order-{n}`
        self.next_foreign = 0

    def draw(self, count: int) -> list[int]:
        """`count` new invoice ids, each for a new foreign id."""
        ids = []
        for _ in range(count):
            self.next_foreign += 1
            n = self.next_foreign
            partition = keys.foreign_id_partition(self.merchant.key, f"order-{n}")
            self.counters[partition] += 1
            invoice_id = self.counters[partition] * keys.partitions() + partition
            self.foreign[invoice_id] = n
            ids.append(invoice_id)
        return ids

    async def store(self, redis: aioredis.Redis) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for partition, n in enumerate(self.counters):
                pipe.set(keys.invoice_ids(partition), n)
            await pipe.execute()

    def identity(self, invoice_id: int) -> dict[str, str]:
        """The values that replace the markers for invoice `invoice_id`."""
        address = filler_address(invoice_id)
        foreign = f"order-{self.foreign[invoice_id]}"
        return {
            ADDRESS_TAG: keys.partition_tag(keys.address_partition("BTC", address)),
            FOREIGN_TAG: keys.partition_tag(keys.foreign_id_partition(self.merchant.key, foreign)),
            INVOICE_TAG: keys.partition_tag(keys.invoice_partition(invoice_id)),
            ADDRESS: address,
            TOKEN: secrets.token_urlsafe(24),
            TXID: f"{invoice_id:010d}",
            FOREIGN: str(self.foreign[invoice_id]),
            ID: str(invoice_id),
        }


def marked_key(key: str) -> str:
    """A template key with its partition tag replaced by the marker of its kind."""
    if key.startswith(keys.PREFIX + "addr:"):
        marker = ADDRESS_TAG
    elif key.startswith(keys.PREFIX + "fid:"):
        marker = FOREIGN_TAG
    else:
        marker = INVOICE_TAG
    return _PARTITION_TAG.sub(marker, key, count=1)


def evalsha(sha: str, call: tuple[Sequence[str], Sequence[str | int | bytes]]) -> list[str]:
    """`bulk.evalsha` with the KEYS' partition tags as markers."""
    names, args = call
    return bulk.evalsha(sha, ([marked_key(k) for k in names], args))


def lookups(invoice: Invoice) -> list[list[str]]:
    """The token and address-owner keys `InvoiceStore.create` writes before create.lua."""
    assert invoice.address is not None
    owner = keys.address(invoice.address.currency, invoice.address.address)
    return [
        ["SET", keys.token(invoice.token), ID, "NX"],
        ["SET", marked_key(owner), ID, "NX"],
    ]


def template_invoice(
    service: InvoiceService, merchant: Merchant, now: int, payment_type: PaymentType
) -> Invoice:
    """A new pending invoice whose identity is spelled with the markers."""
    invoice = fill.new_invoice(
        service, merchant, int(ID), f"order-{FOREIGN}", random.Random(1), now, payment_type
    )
    return replace(
        invoice,
        token=TOKEN,
        address=DepositAddress(int(ID), "BTC", ADDRESS),
    )


def marked_payment(
    invoice: Invoice, n: int, amount: Decimal, start: int
) -> list[TransactionUpdate]:
    """`fill.payment` for the invoice's transaction n, its txid spelled with the marker."""
    txid = TXID + str(n).rjust(54, "0")
    updates = fill.payment(invoice, int(ID) * 10 + n, amount, start)
    return [replace(u, txid=txid) for u in updates]


async def shas(redis: aioredis.Redis, *names: str) -> list[str]:
    """Load scripts (as the store does on first use); their SHA1s for EVALSHA."""
    return [str(await redis.script_load(scripts.source(name))) for name in names]


async def write_many(url: str, template: bulk.Template, ids: Ids, chosen: Sequence[int]) -> None:
    """The template's commands for every chosen id, down one raw connection."""
    connection = await bulk.BulkConnection.open(url)
    try:
        await connection.run(
            command for i in chosen for command in template.render(ids.identity(i))
        )
    finally:
        await connection.close()


async def used_memory(redis: aioredis.Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


# --------------------------------------------------------------------------- memory


async def confirmed_template(
    redis: aioredis.Redis, service: InvoiceService, merchant: Merchant, now: int
) -> tuple[bulk.Template, Transition]:
    """Every write that takes one invoice from new to confirmed by two payments with each
    callback delivered once: create, one commit with all the effects of the six updates,
    and a delivery record per sequence."""
    created = template_invoice(service, merchant, now, PaymentType.GOOD_UNTIL_EXPIRED)
    assert created.sender_amount is not None
    half = (created.sender_amount / 2).quantize(Decimal("0.00000001"))
    updates = marked_payment(created, 0, half, now + 1) + marked_payment(
        created, 1, created.sender_amount - half, now + 5
    )
    current, effects = created, []
    for update in updates:
        transition = state_machine.apply(current, update, service.policy)
        current = transition.invoice
        effects.extend(transition.effects)
    assert current.status.value == "confirmed" and len(current.transactions) == 2
    flow = Transition(current, tuple(effects))
    create_sha, commit_sha, done_sha = await shas(redis, "create", "commit", "delivery_done")
    schedule = make_settings("redis://unused").callback_retry_schedule
    delivered = Outcome(200, "", DELIVERY_MS, delivered=True)
    store = service.store
    commands = [
        *lookups(created),
        evalsha(create_sha, store.create_call(created)),
        evalsha(commit_sha, store.commit_call(Stored(created, 1), flow, now)),
        *(
            evalsha(done_sha, record_call(int(ID), seq, delivered, now, schedule))
            for seq in range(1, current.sequence + 1)
        ),
    ]
    return bulk.Template(commands), flow


async def key_sizes(redis: aioredis.Redis, invoice: Invoice) -> dict[str, int]:
    """MEMORY USAGE (exact: all samples) of each key that belongs to one invoice."""
    assert invoice.address is not None
    names = {
        "invoice": keys.invoice(invoice.id),
        "foreign_id": keys.foreign_id(invoice.merchant, invoice.foreign_id),
        "token": keys.token(invoice.token),
        "address_owner": keys.address(invoice.address.currency, invoice.address.address),
        "delivery": keys.delivery(invoice.id),
        "delivery_log": keys.delivery_log(invoice.id),
        "mails": keys.mails(invoice.id),
    }
    sizes = {}
    for name, key in names.items():
        size = await redis.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
        if size is not None:
            sizes[name] = int(size)
    return sizes


async def memory_part(redis: aioredis.Redis, service: InvoiceService, url: str) -> dict[str, Any]:
    merchant = make_merchant("Bench shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(redis).add(merchant)
    template, flow = await confirmed_template(redis, service, merchant, int(time.time()))
    ids = Ids(merchant)
    chosen = ids.draw(MEMORY_INVOICES)
    before = await used_memory(redis)
    started = time.monotonic()
    await write_many(url, template, ids, chosen)
    await ids.store(redis)
    # The ledger entries wait in the partitions' outboxes until a worker posts them.
    scripts_ = Scripts(redis)
    while await post_ledger(redis, scripts_):
        pass
    assert await pending_entries(redis) == 0
    built_s = time.monotonic() - started
    after = await used_memory(redis)
    stored = await service.store.get_many(random.Random(2).sample(chosen, 200))
    assert len(stored) == 200
    assert all(s.invoice.status.value == "confirmed" for s in stored.values())
    samples = [await key_sizes(redis, s.invoice) for s in stored.values()]
    per_key = {
        name: round(sum(s.get(name, 0) for s in samples) / len(samples)) for name in samples[0]
    }
    ledger = await redis.execute_command(
        "MEMORY", "USAGE", keys.ledger(merchant.key), "SAMPLES", "0"
    )
    sample = next(iter(stored.values())).invoice
    # The layout is the store's: each lookup finds its invoice, the balance is credited.
    assert await service.store.id_by_foreign_id(merchant.key, sample.foreign_id) == sample.id
    assert await service.store.id_by_token(sample.token) == sample.id
    assert await service.store.balances(merchant.key)
    per_invoice = (after - before) / MEMORY_INVOICES
    return {
        "invoices": MEMORY_INVOICES,
        "shape": "confirmed, 2 transactions, "
        f"{flow.invoice.sequence} callbacks delivered once each, 2 ledger entries",
        "built_in_s": round(built_s, 1),
        "used_memory_delta_bytes_per_invoice": round(per_invoice),
        "memory_usage_bytes_per_invoice_by_key": per_key,
        "memory_usage_bytes_per_invoice_keys_total": sum(per_key.values()),
        "merchant_ledger_bytes_per_invoice": round(int(ledger) / MEMORY_INVOICES),
        "stored_invoice_bytes": await redis.strlen(keys.invoice(sample.id)),
        "goal_under_2_kib": {
            "invoice_keys": sum(per_key.values()) < GOAL_BYTES_PER_INVOICE,
            "used_memory_delta": per_invoice < GOAL_BYTES_PER_INVOICE,
        },
    }


# --------------------------------------------------------------------------- update cost


def first_sighting(template: Invoice, invoice_id: int) -> TransactionUpdate:
    """The mempool sighting of a full payment to invoice `invoice_id` (made from the template)."""
    update = fill.payment(template, tx_id=invoice_id * 10)[0]
    return replace(update, address=filler_address(invoice_id))


async def evalsha_usec(redis: aioredis.Redis) -> tuple[int, int]:
    stats = await redis.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {})
    return int(entry.get("calls", 0)), int(entry.get("usec", 0))


def untouched(live: Sequence[int], count: int, touched: set[int], rng: random.Random) -> list[int]:
    """`count` random invoice ids among the live ones that no update has touched yet."""
    chosen: list[int] = []
    while len(chosen) < count:
        invoice_id = rng.choice(live)
        if invoice_id not in touched:
            touched.add(invoice_id)
            chosen.append(invoice_id)
    return chosen


def address_partition(invoice_id: int) -> int:
    """The updates partition of invoice `invoice_id`'s deposit address."""
    return keys.address_partition("BTC", filler_address(invoice_id))


async def measure_updates(
    redis: aioredis.Redis,
    service: InvoiceService,
    template: Invoice,
    live: Sequence[int],
    touched: set[int],
) -> dict[str, Any]:
    """Per-update cost with `live` invoices: one-update batches, then full batches."""
    ingest = Ingest(redis, service, consumer=f"bench-{len(live)}")
    rng = random.Random(len(live))
    chosen = untouched(live, SAMPLES + BATCHES * ingest.batch, touched, rng)
    single, batched = chosen[:SAMPLES], chosen[SAMPLES:]
    calls0, usec0 = await evalsha_usec(redis)
    latencies = []
    for invoice_id in single:
        entry = (b"0-1", {b"u": dump_update(first_sighting(template, invoice_id))})
        started = time.perf_counter()
        await ingest.process(address_partition(invoice_id), [entry])
        latencies.append(time.perf_counter() - started)
    calls1, usec1 = await evalsha_usec(redis)
    started = time.perf_counter()
    for n in range(BATCHES):
        part = batched[n * ingest.batch : (n + 1) * ingest.batch]
        entries = [(b"0-1", {b"u": dump_update(first_sighting(template, i))}) for i in part]
        # A worker's batch comes from one partition; the partition here only names the
        # stream the stand-in entry ids are acknowledged on (the cost is in the apply,
        # whose owners and invoices lie in many partitions either way).
        await ingest.process(address_partition(part[0]), entries)
    per_update_us = (time.perf_counter() - started) / len(batched) * 1e6
    assert ingest.stats.applied == len(chosen), ingest.stats
    return {
        "live_invoices": len(live),
        "one_update_batch": summary_ms(latencies),
        "full_batch_us_per_update": round(per_update_us),
        "redis_evalsha_us_per_call": round((usec1 - usec0) / max(1, calls1 - calls0), 1),
    }


async def update_cost_part(
    redis: aioredis.Redis, service: InvoiceService, url: str
) -> list[dict[str, Any]]:
    await redis.config_set("auto-aof-rewrite-percentage", 0)
    merchant = make_merchant("Bench shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(redis).add(merchant)
    template = template_invoice(service, merchant, int(time.time()), PaymentType.FILL_OR_KILL)
    (create_sha,) = await shas(redis, "create")
    creates = bulk.Template(
        [*lookups(template), evalsha(create_sha, service.store.create_call(template))]
    )
    await ensure_group(redis)
    touched: set[int] = set()
    ids = Ids(merchant)
    live: list[int] = []
    results = []
    for size in SIZES:
        started = time.monotonic()
        new = ids.draw(size - len(live))
        await write_many(url, creates, ids, new)
        await ids.store(redis)
        live += new
        result = await measure_updates(redis, service, template, live, touched)
        result["fill_s"] = round(time.monotonic() - started, 1)
        result["used_memory_mb"] = round(await used_memory(redis) / 2**20)
        results.append(result)
    return results


async def main() -> dict[str, Any]:
    stack.quiet_logging()
    out: dict[str, Any] = {"benchmark": "scale", "machine": machine.describe()}
    out["settings"] = {"redis_appendfsync": "always", "auto_aof_rewrite_in_part_2": "off"}
    with stack.scratch_dir("scale") as tmp:
        with stack.redis_server(tmp / "a") as server:
            redis = aioredis.Redis.from_url(server.url)
            service = invoice_service(redis, make_settings(server.url))
            out["memory"] = await memory_part(redis, service, server.url)
            await redis.aclose()
        with stack.redis_server(tmp / "b") as server:
            redis = aioredis.Redis.from_url(server.url)
            service = invoice_service(redis, make_settings(server.url))
            out["update_cost"] = await update_cost_part(redis, service, server.url)
            await redis.aclose()
    costs = [r["one_update_batch"]["p50_ms"] for r in out["update_cost"]]
    out["update_cost_p50_ratio_largest_to_smallest"] = round(costs[-1] / costs[0], 2)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
