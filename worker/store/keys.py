"""Every Redis key name coinvoice uses, built in one place.

The layout is documented in docs/architecture.md. All keys share the
``cv:`` prefix so one Redis can be shared with arq's own keys (``arq:*``).

Keys carry Redis Cluster hash tags (the part in braces decides the slot), so
every Lua script touches one slot and runs unchanged on one Redis and on a
cluster:

* **a partition** (``{p3}``-like tags, `partition_tag`): the updates stream of
  the deposit addresses that hash to it, and the invoices whose id falls in
  it, with everything commit.lua writes in one step — the invoice, its
  delivery state and log, its e-mails, and the partition's timers,
  callback-due and mail-due schedules and ledger outbox;
* **a merchant** (``{merchant key}``): its record, balances and ledger;
* **address allocation** (``{a}``): pools, HD counters and the address ids;
* **live rates** (``{rates}``): the rate table, its leader lease, the sources' health.

Lookups by random token (``cv:toks:…``, ``cv:rtok:…``) carry no tag: they spread
by themselves, and are written before the commit that makes them true.

The three lookups every invoice has — foreign id, public token, deposit
address → invoice id — are fields of *bucketed* hashes, not a key each
(`Index`): the field is 12 bytes of a BLAKE2b digest of the looked-up value,
the bucket comes from two more bytes of it. INDEX_BUCKETS buckets per
partition (the foreign ids' and addresses' buckets carry their partition's
tag, so create.lua claims a foreign id in the invoice's slot), as many for the
tokens. A bucket of up to 512 entries is one compact listpack in Redis
(hash-max-listpack-entries, 512 by default; the fields are short): ~25 bytes an entry instead of
a ~100-byte key, and far fewer keys (each key costs more in a cluster). Past
512 entries a bucket becomes a hash table, still no bigger than the keys
were. Versions before wrote one string key each (`foreign_id`, `token`,
`address`); the store still reads those (docs/operations.md).

The number of partitions (``COINVOICE_STREAM_PARTITIONS``) is part of the data
layout: an invoice's id says its partition (``id % partitions``), so it is set
once per deployment, before the first invoice, like a Kafka topic's.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

PREFIX = "cv:"
# The default number of partitions (spec §11: COINVOICE_STREAM_PARTITIONS).
DEFAULT_PARTITIONS = 16

ADDRESS_IDS = PREFIX + "{a}:address:ids"  # INCR counter: DepositAddress.id, global over currencies
UPDATES_GROUP = PREFIX + "appliers"  # the consumer group of every updates partition
ORPHANS = PREFIX + "orphans"  # hash "{tx id}:{state}" → deposit no invoice owns
UPDATES_PARKED = PREFIX + "updates:parked"  # hash → updates that could not be applied
INGEST_STATS = PREFIX + "stats:ingest"  # hash counter → value, summed over all workers
MERCHANTS = PREFIX + "merchants"  # set of merchant keys
WORKERS = PREFIX + "workers"  # zset worker name → last heartbeat (unix seconds)
# The rate table, its leader lease and the sources' health share the tag {rates}:
# rates_publish.lua checks the lease and writes the table in one step (one slot).
RATES = PREFIX + "{rates}"  # hash market symbol → "{price} {as of, unix s} {sources}"
RATES_LEADER = PREFIX + "{rates}:leader"  # string: the worker refreshing rates (a lease)
RATES_SOURCES = PREFIX + "{rates}:sources"  # hash "{source}:ok_at|errors|error" → value
# INCR counter a sender bumps before WAIT, so the WAIT covers every commit it has read.
FENCE = PREFIX + "fence"

_partitions = DEFAULT_PARTITIONS


def use_partitions(count: int) -> None:
    """Set the number of partitions from the settings (start-up, before any key is built)."""
    global _partitions
    if count < 1:
        raise ValueError("at least one partition")
    _partitions = count


def partitions() -> int:
    """How many partitions the data is laid out in."""
    return _partitions


@cache
def _tag(partition: int, count: int) -> str:
    """A short hash tag whose slot lies in the `partition`-th of `count` equal slot ranges.

    Redis Cluster hands out slots in contiguous ranges, so tags spread this way
    land on every master evenly instead of wherever CRC16 happens to put "0".."15".
    """
    low = partition * REDIS_CLUSTER_HASH_SLOTS // count
    high = (partition + 1) * REDIS_CLUSTER_HASH_SLOTS // count
    for n in range(1_000_000):
        tag = f"p{partition}" if n == 0 else f"p{partition}.{n}"
        if low <= key_slot(tag.encode()) < high:
            return "{" + tag + "}"
    raise RuntimeError(f"no tag for partition {partition} of {count}")  # unreachable


def partition_tag(partition: int) -> str:
    """The hash tag (with braces) of a partition."""
    return _tag(partition, _partitions)


def invoice_partition(invoice_id: int) -> int:
    """The partition an invoice lives in: its id says it (see `InvoiceStore.next_id`)."""
    return invoice_id % _partitions


def address_partition(currency: str, addr: str) -> int:
    """The updates partition of a deposit address: one address, one partition, in order."""
    return zlib.crc32(f"{currency}:{addr}".encode()) % _partitions


def foreign_id_partition(merchant_key: str, foreign: str) -> int:
    """The partition a new invoice is created in, so its foreign-id claim shares its slot."""
    return zlib.crc32(f"{merchant_key}\0{foreign}".encode()) % _partitions


# Buckets per partition of each bucketed lookup (see the module docstring): with the
# default 16 partitions 2,048 per lookup: ~490 entries each at 1,000,000 invoices, most
# still within Redis' default listpack limit of 512.
INDEX_BUCKETS = 128


@dataclass(frozen=True, slots=True)
class Index:
    """Where one lookup entry lives: a field of a bucketed hash."""

    key: str
    field: bytes


def _digest(kind: str, value: str) -> tuple[bytes, int]:
    """The entry's field (12 bytes) and its bucket number, from one digest of the value."""
    digest = hashlib.blake2b(value.encode(), digest_size=16, person=kind.encode()).digest()
    return digest[:12], int.from_bytes(digest[12:], "big") % INDEX_BUCKETS


def foreign_id_index(merchant_key: str, foreign: str) -> Index:
    """The foreign-id claim: in the foreign id's partition, like the invoice it names."""
    field, bucket = _digest("fid", f"{merchant_key}\0{foreign}")
    tag = partition_tag(foreign_id_partition(merchant_key, foreign))
    return Index(f"{PREFIX}fids:{tag}{bucket}", field)


def address_index(currency: str, addr: str) -> Index:
    """The deposit address's owner: in the address's updates partition."""
    field, bucket = _digest("addr", f"{currency}:{addr}")
    return Index(f"{PREFIX}addrs:{partition_tag(address_partition(currency, addr))}{bucket}", field)


def token_index(public_token: str) -> Index:
    """The public token's invoice; no tag (tokens are random, their buckets spread)."""
    field, bucket = _digest("tok", public_token)
    partition = zlib.crc32(public_token.encode()) % _partitions
    return Index(f"{PREFIX}toks:{partition}.{bucket}", field)


# ----------------------------------------------------------------- per partition


def invoice_ids(partition: int) -> str:
    """INCR counter n of a partition: its invoices get ids n × partitions + partition."""
    return f"{PREFIX}ids:{partition_tag(partition)}"


def updates(partition: int) -> str:
    """Stream of accepted processing callbacks of the partition's addresses."""
    return f"{PREFIX}updates:{partition_tag(partition)}"


def timers(partition: int) -> str:
    """Zset invoice id → unix second its timer fires."""
    return f"{PREFIX}timers:{partition_tag(partition)}"


def delivery_due(partition: int) -> str:
    """Zset invoice id → when its next callback attempt is due."""
    return f"{PREFIX}dlv:due:{partition_tag(partition)}"


def mail_due(partition: int) -> str:
    """Zset "{invoice id}:{cause}" → when the e-mail is due."""
    return f"{PREFIX}mail:due:{partition_tag(partition)}"


def ledger_outbox(partition: int) -> str:
    """Stream of ledger entries committed with their invoices, not yet on the balances."""
    return f"{PREFIX}ledger:out:{partition_tag(partition)}"


# ----------------------------------------------------------------- per invoice (its partition)


def invoice(invoice_id: int) -> str:
    return f"{PREFIX}inv:{partition_tag(invoice_partition(invoice_id))}{invoice_id}"


def foreign_id(merchant_key: str, foreign: str) -> str:
    """The foreign-id claim as versions before wrote it (one key; now `foreign_id_index`)."""
    tag = partition_tag(foreign_id_partition(merchant_key, foreign))
    return f"{PREFIX}fid:{tag}{merchant_key}:{foreign}"


def delivery(invoice_id: int) -> str:
    return f"{PREFIX}dlv:{partition_tag(invoice_partition(invoice_id))}{invoice_id}"


def delivery_log(invoice_id: int) -> str:
    """The attempt log as a list of its own: written before the log moved into `delivery`."""
    return f"{PREFIX}dlog:{partition_tag(invoice_partition(invoice_id))}{invoice_id}"


def mails(invoice_id: int) -> str:
    return f"{PREFIX}mails:{partition_tag(invoice_partition(invoice_id))}{invoice_id}"


def refund_token(token: str) -> str:
    """Refund page token → invoice id; written with the first refund/payback e-mail."""
    return f"{PREFIX}rtok:{token}"


def address(currency: str, addr: str) -> str:
    """Invoice id owning a deposit address, as versions before wrote it (now `address_index`)."""
    return f"{PREFIX}addr:{partition_tag(address_partition(currency, addr))}{currency}:{addr}"


def token(public_token: str) -> str:
    """Invoice id of a public token, as versions before wrote it (now `token_index`)."""
    return f"{PREFIX}tok:{public_token}"


# ----------------------------------------------------------------- per merchant


def merchant(key: str) -> str:
    return f"{PREFIX}merchant:{{{key}}}"


def balance(merchant_key: str) -> str:
    return f"{PREFIX}bal:{{{merchant_key}}}"


def ledger(merchant_key: str) -> str:
    return f"{PREFIX}ledger:{{{merchant_key}}}"


def ledger_applied(merchant_key: str) -> str:
    """Hash partition → newest ledger-outbox entry id already on the merchant's balances."""
    return f"{PREFIX}ledger:applied:{{{merchant_key}}}"


# ----------------------------------------------------------------- address allocation


def hd_index(currency: str) -> str:
    return f"{PREFIX}{{a}}:hd:{currency}"


def address_pool(currency: str) -> str:
    return f"{PREFIX}{{a}}:pool:{currency}"


def address_pool_known(currency: str) -> str:
    """Set of every address ever loaded into the pool, so a reload never pushes one twice."""
    return f"{PREFIX}{{a}}:pool-known:{currency}"


def seen_signature(merchant_key: str, digest: str) -> str:
    """A timestamped request's signature, remembered while its timestamp is in the window."""
    return f"{PREFIX}seen:{merchant_key}:{digest}"


def rate_limit(scope: str, who: str, second: int) -> str:
    return f"{PREFIX}rl:{scope}:{who}:{second}"


# ----------------------------------------------------------------- an invoice's schedules


def timers_of(invoice_id: int) -> str:
    """The timers zset holding this invoice's entry."""
    return timers(invoice_partition(invoice_id))


def delivery_due_of(invoice_id: int) -> str:
    """The callback-due zset holding this invoice's entry."""
    return delivery_due(invoice_partition(invoice_id))


def mail_due_of(invoice_id: int) -> str:
    """The mail-due zset holding this invoice's mails."""
    return mail_due(invoice_partition(invoice_id))
