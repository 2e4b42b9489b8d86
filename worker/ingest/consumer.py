"""Applying processing updates: a Redis-stream consumer that works in batches.

The receiver `enqueue`s each transaction update into the partition of the
updates stream its deposit address belongs to (worker/store/streams.py) and
answers 200 only then. Every worker reads every partition through its
consumer group, in batches — on one Redis a few reader tasks each take a share
of the partitions in one XREADGROUP (a batch spans them; one address lives in
one partition, so an invoice's updates keep their order), on a cluster one
reader task per partition (the partitions live in different slots):

1. parse the batch, find each update's invoice by its deposit address;
2. read all those invoices in one pipeline;
3. apply each invoice's updates through the pure state machine, in order;
4. commit every changed invoice with its effects (commit.lua, one pipeline;
   a lost compare-and-set re-reads and re-applies that invoice);
5. only then acknowledge and delete the batch's entries.

A crash anywhere before step 5 leaves the entries pending; this or another
worker applies them again, which changes nothing because a transaction's
updates merge monotonically — so every accepted update takes effect exactly
once. Deposits to addresses no invoice owns are kept in `cv:orphans`.

A stopping worker (`stop`) finishes the batch in hand, reads no more and
leaves the group. A dead worker's consumer is removed from the group by the
others once its pending entries were claimed (`forget_dead_consumers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError
from redis.asyncio import Redis

from worker.domain import machine
from worker.domain.effects import Effect
from worker.domain.events import TransactionUpdate
from worker.domain.machine import Transition
from worker.logs import get_logger
from worker.services.invoices import (
    MAX_CAS_ATTEMPTS,
    InvoiceService,
    log_change,
    with_refund_token,
)
from worker.store import keys
from worker.store.codec import dump_update, load_update
from worker.store.connection import REDIS_UNAVAILABLE, acknowledged, awaited, is_cluster
from worker.store.invoices import Stored, issued_refund_token
from worker.store.streams import ensure_group as ensure_partition_group
from worker.store.streams import ensure_groups

log = get_logger(__name__)

# Entries taken per read; one batch costs about five Redis round trips in all.
BATCH = 256
# Reader tasks of a worker on one Redis, each owning every READERS_ONE_REDIS-th partition.
READERS_ONE_REDIS = 4
# How long an idle read blocks waiting for new entries (milliseconds).
BLOCK_MS = 1000
# How often a worker looks for entries left by dead workers (seconds).
RECLAIM_EVERY_SECONDS = 5.0
# Address owners never change, so they are cached; the cache is dropped when this big.
# 4,096 pairs (~1 MB) cover the seconds in which an address's reports arrive together;
# a miss costs one field in the batch's single lookup round trip (bench/soak.py: 100,000
# were still filling after 10 minutes, so the process grew for the whole run).
OWNER_CACHE_SIZE = 4_096
# Back-off while Redis is unreachable (seconds): doubles from the first to the cap.
BACKOFF_FIRST_SECONDS = 0.05
BACKOFF_CAP_SECONDS = 2.0

Entry = tuple[bytes, dict[bytes, bytes] | None]


async def ensure_group(redis: Redis) -> None:
    """Create every partition's consumer group (and stream) unless it exists."""
    await ensure_groups(redis)


@dataclass
class IngestStats:
    """Counters since start: what was read, what changed state, what was a no-op."""

    entries: int = 0
    applied: int = 0  # updates that changed their invoice
    unchanged: int = 0  # duplicates and stale updates, suppressed by the merge
    orphans: int = 0
    conflicts: int = 0  # lost compare-and-sets, re-applied
    parked: int = 0  # entries that could not be applied, kept for operators
    reclaimed: int = 0  # entries taken over from a dead worker

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def add(self, other: IngestStats) -> None:
        """Add another's counters to these."""
        for name, value in other.as_dict().items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class Ingest:
    """The stream consumer of one worker process."""

    redis: Redis
    service: InvoiceService
    consumer: str
    reclaim_idle_ms: int = 30_000
    # A consumer whose worker's heartbeat (keys.WORKERS) is this old is dead (seconds).
    dead_after_seconds: float = 10.0
    batch: int = BATCH
    stats: IngestStats = field(default_factory=IngestStats)
    _owners: dict[tuple[str, str], int] = field(default_factory=dict)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        """Read no new batch; `run` returns once the batch in hand is applied (≤ BLOCK_MS idle)."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume every partition until stopped, with a few readers each owning a share.

        A reader takes new entries from all of its partitions in one XREADGROUP and
        applies them as one batch: a reader per partition made batches of one or two
        updates at 500/s, each paying the round trips of a whole batch, while one
        reader for everything leaves the CPU idle during each batch's round trips
        (bench/end_to_end.py, bench/worker_throughput.py). Each partition has one
        reader per worker, so a reader's own pending entries are its own. A cluster's
        partitions live in different slots: there each has a reader of its own.
        """
        count = keys.partitions()
        readers = count if is_cluster(self.redis) else min(count, READERS_ONE_REDIS)
        shares = [list(range(first, count, readers)) for first in range(readers)]
        tasks = [
            asyncio.create_task(self.run_partitions(share), name=f"ingest-{share[0]}")
            for share in shares
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run_partitions(self, partitions: Sequence[int]) -> None:
        """Consume these partitions until stopped; ride out Redis restarts; re-read our
        pending entries after one."""
        failures = 0
        backlog = True  # first our own unacknowledged entries (after a restart)
        next_reclaim = 0.0
        while not self._stopping.is_set():
            try:
                if failures or time.monotonic() >= next_reclaim:
                    for p in partitions:
                        await ensure_partition_group(self.redis, p)
                        await self.reclaim(p)
                        await self.forget_dead_consumers(p)
                    next_reclaim = time.monotonic() + RECLAIM_EVERY_SECONDS
                if backlog:
                    for p in partitions:
                        while entries := await self.read(p, backlog=True):
                            await self.process(p, entries)
                    backlog = False
                batches = await self.read_new(partitions)
                if batches:
                    await self.process_batches(batches)
                failures = 0
            except REDIS_UNAVAILABLE as exc:
                failures += 1
                delay = min(BACKOFF_CAP_SECONDS, BACKOFF_FIRST_SECONDS * 2**failures)
                log.warning(
                    "ingest_redis_error",
                    partitions=list(partitions),
                    error=repr(exc),
                    retry_in_s=delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                backlog = True

    async def read_new(self, partitions: Sequence[int]) -> dict[int, list[Entry]]:
        """New entries of these partitions in one blocking read: partition → entries.

        COUNT is per stream, so each partition gives at most its share of a batch.
        """
        partition_of = {keys.updates(p): p for p in partitions}
        response = await self.redis.xreadgroup(
            keys.UPDATES_GROUP,
            self.consumer,
            dict.fromkeys(partition_of, ">"),
            count=max(1, -(-self.batch // len(partitions))),
            block=BLOCK_MS,
        )
        return {partition_of[_text(name)]: entries for name, entries in response if entries}

    async def read(self, partition: int, backlog: bool) -> list[Entry]:
        """New entries (blocking briefly), or our own pending ones when `backlog`."""
        response = await self.redis.xreadgroup(
            keys.UPDATES_GROUP,
            self.consumer,
            {keys.updates(partition): "0" if backlog else ">"},
            count=self.batch,
            block=None if backlog else BLOCK_MS,
        )
        return [entry for _, entries in response for entry in entries]

    async def reclaim(self, partition: int) -> int:
        """Take over entries another consumer left unacknowledged too long, and apply them."""
        start, taken = "0-0", 0
        while True:
            start, entries, *_ = await self.redis.xautoclaim(
                keys.updates(partition),
                keys.UPDATES_GROUP,
                self.consumer,
                self.reclaim_idle_ms,
                start_id=start,
                count=self.batch,
            )
            if entries:
                taken += len(entries)
                await self.process(partition, entries, reclaimed=True)
            if start in (b"0-0", "0-0") or not entries:
                break
        if taken:
            log.warning(
                "ingest_reclaimed", entries=taken, partition=partition, consumer=self.consumer
            )
        return taken

    async def forget_dead_consumers(self, partition: int) -> int:
        """Remove from a partition's group the consumers of dead workers that hold no entry.

        Their entries are claimed first (`reclaim`, after `reclaim_idle_ms`), so a
        dead worker leaves the group on a later round. The heartbeats live in
        another slot than the partition: they are read first, and drop_consumer.lua
        re-checks the pending list in the same atomic step as the delete (a worker
        alive after all recreates its consumer with its next read).
        """
        consumers = await self.redis.xinfo_consumers(keys.updates(partition), keys.UPDATES_GROUP)
        idle = [
            name
            for info in consumers
            if info["pending"] == 0 and (name := _text(info["name"])) != self.consumer
        ]
        if not idle:
            return 0
        dead_before = time.time() - self.dead_after_seconds
        beats = await self.redis.zmscore(keys.WORKERS, idle)
        dead = [
            n for n, beat in zip(idle, beats, strict=True) if beat is None or beat < dead_before
        ]
        removed = [name for name in dead if await self._drop_consumer(partition, name)]
        if removed:
            log.info("ingest_consumers_removed", partition=partition, consumers=removed)
        return len(removed)

    async def leave_group(self) -> bool:
        """Remove this worker's own consumer from every partition (it stops), except where
        entries are still pending for it; True when it left them all.

        Call it once the heartbeat is withdrawn; pending entries stay for the
        others to claim, and they remove the consumer afterwards.
        """
        left = [await self._drop_consumer(p, self.consumer) for p in range(keys.partitions())]
        return all(left)

    async def _drop_consumer(self, partition: int, name: str) -> bool:
        removed = await self.service.store.scripts.drop_consumer(
            keys=[keys.updates(partition)], args=[keys.UPDATES_GROUP, name]
        )
        return bool(removed)

    async def process(
        self, partition: int, entries: Sequence[Entry], reclaimed: bool = False
    ) -> None:
        """Apply a batch of one partition, then acknowledge it (never the other way round)."""
        await self.process_batches({partition: entries}, reclaimed)

    async def process_batches(
        self, batches: Mapping[int, Sequence[Entry]], reclaimed: bool = False
    ) -> None:
        """Apply the entries of one or more partitions as one batch, then acknowledge them."""
        entries = [entry for part in batches.values() for entry in part]
        # This batch's counters: readers may run concurrently, so each batch counts its
        # own and adds them to the process's and the system-wide ones at the end.
        batch = IngestStats(entries=len(entries), reclaimed=len(entries) if reclaimed else 0)
        updates: list[TransactionUpdate] = []
        broken: list[Entry] = []
        for entry_id, fields in entries:
            if fields is None:  # deleted after it was applied; only the ack is missing
                continue
            try:
                updates.append(load_update(fields[b"u"]))
            except (KeyError, ValidationError):
                broken.append((entry_id, fields))
        owners = await self._find_owners(updates)
        by_invoice: dict[int, list[TransactionUpdate]] = {}
        orphans: list[TransactionUpdate] = []
        for update, owner in zip(updates, owners, strict=True):
            if owner is None:
                orphans.append(update)
            else:
                by_invoice.setdefault(owner, []).append(update)
        orphans += await self._apply(by_invoice, batch)
        await self._keep_orphans(orphans, batch)
        await self._park(broken, "unreadable entry", batch)
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition, part in batches.items():
                ids = [entry_id for entry_id, _ in part]
                pipe.xack(keys.updates(partition), keys.UPDATES_GROUP, *ids)
                pipe.xdel(keys.updates(partition), *ids)
            # System-wide counters for /metrics and the crash tests.
            for name, value in batch.as_dict().items():
                if value:
                    pipe.hincrby(keys.INGEST_STATS, name, value)
            await pipe.execute()
        self.stats.add(batch)

    async def _find_owners(self, updates: Sequence[TransactionUpdate]) -> list[int | None]:
        """Each update's invoice id (None: no invoice owns its address).

        The answer is built from what this call saw, never from the shared cache after
        the lookup: a full cache is dropped, by this call or by another reader's during
        the await, and an owner missing from it must not turn an update into an orphan.
        """
        pairs = [(u.currency, u.address) for u in updates]
        owners = {pair: self._owners[pair] for pair in pairs if pair in self._owners}
        unknown = list({pair for pair in pairs if pair not in owners})
        if unknown:
            found = await self.service.store.ids_by_address(unknown)
            new = {p: o for p, o in zip(unknown, found, strict=True) if o is not None}
            if len(self._owners) + len(new) > OWNER_CACHE_SIZE:
                self._owners.clear()
            self._owners.update(new)
            owners.update(new)
        return [owners.get(pair) for pair in pairs]

    async def _apply(
        self, by_invoice: dict[int, list[TransactionUpdate]], stats: IngestStats
    ) -> list[TransactionUpdate]:
        """Apply and commit every invoice's updates; return those whose invoice is gone."""
        store, policy = self.service.store, self.service.policy
        pending = dict(by_invoice)
        missing: list[TransactionUpdate] = []
        for _ in range(MAX_CAS_ATTEMPTS):
            loaded = await store.get_many(list(pending))
            commits: list[tuple[Stored, Transition, int]] = []
            for invoice_id, updates in pending.items():
                stored = loaded.get(invoice_id)
                if stored is None:
                    missing += updates
                    continue
                # An owner key is written before the commit that assigns its address;
                # if that commit never happened, the address is not the invoice's.
                address = stored.invoice.address
                foreign = [
                    u
                    for u in updates
                    if address is None
                    or (u.currency, u.address) != (address.currency, address.address)
                ]
                if foreign:
                    missing += foreign
                    updates = [u for u in updates if u not in foreign]
                    pending[invoice_id] = updates
                    if not updates:
                        continue
                try:
                    transition, changed = _apply_all(stored, updates, policy)
                except Exception as exc:  # a bug must not block every other invoice
                    log.exception("ingest_apply_failed", invoice_id=invoice_id)
                    await self._park_updates(updates, repr(exc), stats)
                    continue
                if changed:
                    commits.append((stored, transition, changed))
                else:
                    stats.unchanged += len(updates)
            if not commits:
                return missing
            now = self.service.now()
            # Refund tokens issued here are indexed (their own slots) before the
            # commits that store them, in a round trip of their own: rare, and a
            # cluster pipeline would not keep the order between slots.
            await store.claim_refund_tokens(
                [
                    (stored.invoice.id, token)
                    for stored, transition, _ in commits
                    if (token := issued_refund_token(stored, transition)) is not None
                ]
            )
            async with self.redis.pipeline(transaction=False) as pipe:
                for stored, transition, _ in commits:
                    await store.queue_commit(pipe, stored, transition, now)
                # On too few replicas the batch stays unacknowledged and is applied again.
                results = await acknowledged(self.redis, pipe)
            lost: set[int] = set()
            for (stored, transition, changed), version in zip(commits, results, strict=True):
                if not version:
                    lost.add(stored.invoice.id)
                    continue
                updates = pending[stored.invoice.id]
                stats.applied += changed
                stats.unchanged += len(updates) - changed
                log_change(stored, transition, "TransactionUpdate", updates=len(updates))
                self.service.committed(transition)
            stats.conflicts += len(lost)
            pending = {i: pending[i] for i in lost}
            if not pending:
                return missing
        raise RuntimeError(f"invoices {sorted(pending)} kept losing the compare-and-set")

    async def _keep_orphans(self, orphans: Sequence[TransactionUpdate], stats: IngestStats) -> None:
        """Record deposits no invoice owns: one field per distinct update (idempotent)."""
        if not orphans:
            return
        fields = {
            f"{u.tx_id}:{u.status.value}:{u.confirmations}:{u.compliance.value}": dump_update(u)
            for u in orphans
        }
        await awaited(self.redis.hset(keys.ORPHANS, mapping=fields))
        stats.orphans += len(orphans)
        for u in orphans:
            log.warning(
                "orphan_deposit",
                tx_id=u.tx_id,
                currency=u.currency,
                address=u.address,
                status=u.status,
            )

    async def _park(self, entries: Sequence[Entry], reason: str, stats: IngestStats) -> None:
        """Keep entries that cannot be read for an operator, instead of retrying forever."""
        if entries:
            await self._keep_parked(
                {
                    entry_id.decode(): json.dumps(
                        {k.decode(): v.decode() for k, v in (f or {}).items()}
                    )
                    for entry_id, f in entries
                },
                reason,
                stats,
            )

    async def _park_updates(
        self, updates: Sequence[TransactionUpdate], reason: str, stats: IngestStats
    ) -> None:
        """Keep updates whose application failed (a bug) for an operator to replay."""
        await self._keep_parked(
            {
                f"tx:{u.tx_id}:{u.status.value}:{u.confirmations}": dump_update(u).decode()
                for u in updates
            },
            reason,
            stats,
        )

    async def _keep_parked(self, payloads: dict[str, str], reason: str, stats: IngestStats) -> None:
        record = {
            key: json.dumps({"reason": reason, "payload": value}) for key, value in payloads.items()
        }
        await awaited(self.redis.hset(keys.UPDATES_PARKED, mapping=record))
        stats.parked += len(payloads)
        log.error("ingest_parked", entries=len(payloads), reason=reason)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _apply_all(
    stored: Stored, updates: Sequence[TransactionUpdate], policy: machine.Policy
) -> tuple[Transition, int]:
    """Fold one invoice's updates through the machine; return the combined transition
    and how many updates changed it."""
    invoice, changed = stored.invoice, 0
    effects: list[Effect] = []
    for update in updates:
        transition = machine.apply(invoice, update, policy)
        if transition.invoice != invoice:
            changed += 1
        invoice = transition.invoice
        effects.extend(transition.effects)
    return with_refund_token(Transition(invoice, tuple(effects))), changed
