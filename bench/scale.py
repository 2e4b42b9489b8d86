"""Scale: Redis memory per invoice, and the cost of one update as live invoices grow.

Run: `.venv/bin/python bench/scale.py` (about 1.5 minutes; prints one JSON object);
`--million` adds a million invoices to the memory part, `--memory-only` skips part 2.

1. Memory. Confirmed invoices (1,000, then 100,000 in all: MEMORY_SIZES),
   each paid in two transactions (instalments: mempool, 1 confirmation,
   confirmed, twice; every merchant callback delivered once), written with the store's own scripts:
   the token and address lookups and create.lua, commit.lua with the final
   state and all its effects (callback outbox, ledger outbox), then
   delivery_done.lua per delivered callback. Reported: at each size the
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
What no marker can be replaced in is computed per invoice instead: the
stored invoice (deflated: the template's JSON with the markers replaced,
then deflated as the store does) and the lookups' buckets and fields
(digests of the invoice's foreign id, token and address). The identity is
as random as a real one (txids, addresses, tokens): a compressed invoice
must not be flattered by runs of zeros.
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
import hashlib
import json
import random
import re
import secrets
import time
from collections.abc import Callable, Sequence
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
from worker.store.codec import deflate_json, dump_invoice, dump_update, invoice_json
from worker.store.deliveries import Outcome, record_call
from worker.store.invoices import Stored
from worker.store.ledger import pending_entries, post_ledger
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.scripts import Scripts

MEMORY_SIZES = (1_000, 100_000)  # `--million` adds 1,000,000
SIZES = (1_000, 10_000, 100_000, 1_000_000)
SAMPLES = 300  # one-update batches timed at each size
BATCHES = 2  # full batches (256 updates) timed at each size
DELIVERY_MS = 3  # the duration recorded for each delivered callback
GOAL_BYTES_PER_INVOICE = 1536  # issue 14: 1.5 KiB all-in (it was 2 KiB)

# How an invoice's identity is spelled in a template; each is replaced per invoice.
ID = "987654321"  # the invoice id: also the address id, inside tx ids (id * 10 + n) and keys
TOKEN = "TOKENxTOKENxTOKENxTOKENxTOKENxTO"  # noqa: S105 - a marker, 32 characters like a token
ADDRESS = "bc1qADDRESSMARKER".ljust(42, "x")  # as long as a P2WPKH address
TXIDS = ("TXIDMARKER0".ljust(64, "x"), "TXIDMARKER1".ljust(64, "x"))  # the 2 txids, 64 hex
FOREIGN = "FOREIGNxMARKER"  # the foreign id's number (`order-{n}`): it decides the partition
# The partition tags in a template's keys, by the kind of key that carries them.
INVOICE_TAG = "{INVOICE-TAG}"  # the invoice's partition: the invoice and its schedules
FOREIGN_TAG = "{FOREIGN-TAG}"  # the foreign id's partition (the same, as ids are drawn)
ADDRESS_TAG = "{ADDRESS-TAG}"  # the deposit address's partition
_PARTITION_TAG = re.compile(r"\{p\d+(?:\.\d+)?\}")


# --------------------------------------------------------------------------- templates


_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def filler_address(n: int) -> str:
    """As long as a bech32 P2WPKH address (42 characters), as random-looking (it is
    stored deflated: a run of zeros would flatter the compression); never leaves Redis."""
    digest = hashlib.blake2b(n.to_bytes(8, "big"), digest_size=38).digest()
    return "bc1q" + "".join(_BECH32[b & 31] for b in digest)


def random_txid(invoice_id: int, n: int) -> str:
    """A txid as random as a real one (64 hex digits), the same for the same transaction."""
    return hashlib.sha256(f"{invoice_id}:{n}".encode()).hexdigest()


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
            TXIDS[0]: random_txid(invoice_id, 0),
            TXIDS[1]: random_txid(invoice_id, 1),
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


def evalsha(
    sha: str, call: tuple[Sequence[str], Sequence[str | int | bytes]], invoice: Invoice
) -> list[bulk.Arg]:
    """`bulk.evalsha` with the KEYS' partition tags as markers, and what no marker can be
    replaced in computed for each invoice: the stored `invoice` (deflated) and its
    lookups' buckets and fields (digests of its identity: `identity_indexes`)."""
    names, args = call
    stored = dump_invoice(invoice)
    computed: dict[str | bytes, bulk.Computed] = {
        stored: personalized(invoice),
        **identity_indexes(invoice),
    }
    marked_names = [computed.get(k) or marked_key(k) for k in names]
    marked_args = [computed.get(a, a) if isinstance(a, str | bytes) else a for a in args]
    assert any(callable(a) for a in marked_args), "the call stores no such invoice"
    return bulk.evalsha(sha, (marked_names, marked_args))  # type: ignore[arg-type]


def identity_indexes(invoice: Invoice) -> dict[str | bytes, bulk.Computed]:
    """The template's lookup buckets and fields, each with how to compute an invoice's own."""
    merchant = invoice.merchant
    indexes: dict[str | bytes, bulk.Computed] = {}

    def add(template: keys.Index, own: Callable[[dict[str, str]], keys.Index]) -> None:
        indexes[template.key] = lambda values: own(values).key.encode()
        indexes[template.field] = lambda values: own(values).field

    add(
        keys.foreign_id_index(merchant, invoice.foreign_id),
        lambda v: keys.foreign_id_index(merchant, invoice.foreign_id.replace(FOREIGN, v[FOREIGN])),
    )
    add(keys.token_index(invoice.token), lambda v: keys.token_index(v[TOKEN]))
    if invoice.address is not None:
        currency = invoice.address.currency
        add(
            keys.address_index(currency, invoice.address.address),
            lambda v: keys.address_index(currency, v[ADDRESS]),
        )
    return indexes


def marked(
    call: tuple[Sequence[str], Sequence[str | int]],
) -> tuple[list[str], Sequence[str | int]]:
    """A script call's KEYS with their partition tags as markers."""
    names, args = call
    return [marked_key(k) for k in names], args


def personalized(invoice: Invoice) -> bulk.Computed:
    """The stored form of the template `invoice` with each invoice's values in it."""
    text = invoice_json(dump_invoice(invoice)).decode()

    def render(values: dict[str, str]) -> bytes:
        own = text
        for marker, value in values.items():
            own = own.replace(marker, value)
        return deflate_json(own.encode())

    return render


def lookups(invoice: Invoice) -> list[list[bulk.Arg]]:
    """The token and address-owner entries `InvoiceStore.create` writes before create.lua."""
    assert invoice.address is not None
    computed = identity_indexes(invoice)
    token = keys.token_index(invoice.token)
    owner = keys.address_index(invoice.address.currency, invoice.address.address)
    return [
        ["HSETNX", computed[token.key], computed[token.field], ID],
        ["HSETNX", computed[owner.key], computed[owner.field], ID],
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
    txid = TXIDS[n]
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
        evalsha(create_sha, store.create_call(created), created),
        evalsha(commit_sha, store.commit_call(Stored(created, 1), flow, now), current),
        *(
            bulk.evalsha(done_sha, marked(record_call(int(ID), seq, delivered, now, schedule)))
            for seq in range(1, current.sequence + 1)
        ),
    ]
    return bulk.Template(commands), flow


async def key_sizes(redis: aioredis.Redis, invoice: Invoice) -> dict[str, int]:
    """MEMORY USAGE (exact: all samples) of each key that belongs to one invoice."""
    names = {
        "invoice": keys.invoice(invoice.id),
        "delivery": keys.delivery(invoice.id),
        "mails": keys.mails(invoice.id),
    }
    sizes = {}
    for name, key in names.items():
        size = await redis.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
        if size is not None:
            sizes[name] = int(size)
    return sizes


async def index_sizes(redis: aioredis.Redis, invoices: int) -> dict[str, float]:
    """MEMORY USAGE of every bucket of each lookup, over the invoices (their share)."""
    out = {}
    for name, pattern in (("foreign_id", "fids:*"), ("token", "toks:*"), ("address", "addrs:*")):
        total = 0
        async for key in redis.scan_iter(match=keys.PREFIX + pattern, count=1000):
            total += int(await redis.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0"))
        out[name] = round(total / invoices, 1)
    return out


async def memory_part(
    redis: aioredis.Redis, service: InvoiceService, url: str, sizes: Sequence[int]
) -> dict[str, Any]:
    """Confirmed invoices added until each of `sizes` is stored; the per-invoice figures
    at each size (after − before over all the invoices stored so far)."""
    merchant = make_merchant("Bench shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(redis).add(merchant)
    template, flow = await confirmed_template(redis, service, merchant, int(time.time()))
    ids = Ids(merchant)
    scripts_ = Scripts(redis)
    before = await used_memory(redis)
    chosen: list[int] = []
    by_size = []
    started = time.monotonic()
    for size in sizes:
        new = ids.draw(size - len(chosen))
        chosen += new
        await write_many(url, template, ids, new)
        await ids.store(redis)
        # The ledger entries wait in the partitions' outboxes until a worker posts them.
        while await post_ledger(redis, scripts_):
            pass
        assert await pending_entries(redis) == 0
        after = await used_memory(redis)
        row = {
            "invoices": size,
            "built_in_s": round(time.monotonic() - started, 1),
            "used_memory_delta_bytes_per_invoice": round((after - before) / size),
            "keys_in_redis": int(await redis.dbsize()),
        }
        if by_size:
            # What each invoice added since the previous size: the all-in figure of the
            # smallest size also carries what the first invoices create once (the
            # partitions' streams and schedules, the merchant's ledger, the key table).
            previous = by_size[-1]
            row["marginal_bytes_per_invoice_since_previous_size"] = round(
                (after - previous["_used"]) / (size - previous["invoices"])
            )
        row["_used"] = after
        by_size.append(row)
    largest = by_size[-1]["used_memory_delta_bytes_per_invoice"]
    for row in by_size:
        del row["_used"]
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
    assert sample.address is not None
    assert await service.store.ids_by_address([("BTC", sample.address.address)]) == [sample.id]
    assert await service.store.balances(merchant.key)
    return {
        "shape": "confirmed, 2 transactions, "
        f"{flow.invoice.sequence} callbacks delivered once each, 2 ledger entries",
        "by_size": by_size,
        "memory_usage_bytes_per_invoice_by_key": per_key,
        "memory_usage_bytes_per_invoice_keys_total": sum(per_key.values()),
        "lookup_buckets_bytes_per_invoice": await index_sizes(redis, len(chosen)),
        "merchant_ledger_bytes_per_invoice": round(int(ledger) / len(chosen)),
        "stored_invoice_bytes": await redis.strlen(keys.invoice(sample.id)),
        "goal_bytes_per_invoice": GOAL_BYTES_PER_INVOICE,
        "goal_met_at_every_size": all(
            r["used_memory_delta_bytes_per_invoice"] <= GOAL_BYTES_PER_INVOICE for r in by_size
        ),
        "largest_size_bytes_per_invoice": largest,
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
        [*lookups(template), evalsha(create_sha, service.store.create_call(template), template)]
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


async def main(args: Sequence[str]) -> dict[str, Any]:
    stack.quiet_logging()
    sizes = (*MEMORY_SIZES, 1_000_000) if "--million" in args else MEMORY_SIZES
    out: dict[str, Any] = {"benchmark": "scale", "machine": machine.describe()}
    out["settings"] = {"redis_appendfsync": "always", "auto_aof_rewrite_in_part_2": "off"}
    with stack.scratch_dir("scale") as tmp:
        with stack.redis_server(tmp / "a") as server:
            redis = aioredis.Redis.from_url(server.url)
            service = invoice_service(redis, make_settings(server.url))
            out["memory"] = await memory_part(redis, service, server.url, sizes)
            await redis.aclose()
        if "--memory-only" in args:
            return out
        with stack.redis_server(tmp / "b") as server:
            redis = aioredis.Redis.from_url(server.url)
            service = invoice_service(redis, make_settings(server.url))
            out["update_cost"] = await update_cost_part(redis, service, server.url)
            await redis.aclose()
    costs = [r["one_update_batch"]["p50_ms"] for r in out["update_cost"]]
    out["update_cost_p50_ratio_largest_to_smallest"] = round(costs[-1] / costs[0], 2)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1:])), indent=2))
