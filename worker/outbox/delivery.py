"""Merchant callbacks: the delivery outbox and the loop that empties it (spec §9).

`commit.lua` records every new snapshot sequence in `cv:dlv:{id}` and makes
the invoice due in `cv:dlv:due` (keeping the time of a pending retry: the
next attempt carries the newest snapshot). This loop claims due invoices
with a lease, renders the invoice's *current* snapshot, signs the exact
bytes, posts them, and records the attempt (`delivery_done.lua`):

* per invoice at most one attempt is in flight (the lease), and every attempt
  carries the newest snapshot, so a merchant never receives an older
  sequence after a newer one;
* a worker killed mid-delivery leaves the lease to expire; another worker
  delivers then (possibly a second time, with the same sequence);
* the delivery state lives in our own Redis records, not in arq jobs, so a
  retry four hours out is as durable as one a minute out;
* each merchant has a cap on attempts in flight, so a merchant whose
  endpoint hangs only ever delays itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from worker.config import Settings
from worker.domain.models import Invoice, Merchant
from worker.domain.snapshot import snapshot
from worker.logs import get_logger
from worker.outbox.destinations import (
    DestinationRefused,
    Resolver,
    pinned,
    resolve_destination,
    system_resolve,
)
from worker.outbox.destinations import check_destination as check_destination  # re-exported
from worker.outbox.http import CallbackClient, ResponseError
from worker.outbox.webhooks import headers
from worker.services.invoices import bound
from worker.store import keys
from worker.store.batching import GroupCommit
from worker.store.connection import REDIS_UNAVAILABLE, replicated
from worker.store.deliveries import Outcome, record_call
from worker.store.invoices import InvoiceStore
from worker.store.merchants import MerchantStore
from worker.store.schedules import claim_due
from worker.store.scripts import execute

log = get_logger(__name__)

# Invoices claimed per round trip.
CLAIM_BATCH = 64
# Attempts in flight per worker process, and per merchant within it. A merchant's rate
# is capped near PER_MERCHANT_IN_FLIGHT / its answer time per worker: 8 held one merchant
# to ~600 callbacks/s against a local sink (p99 17 s end to end at 1,000/s); at 32 a
# hanging merchant still holds only an eighth of the process's slots.
MAX_IN_FLIGHT = 256
PER_MERCHANT_IN_FLIGHT = 32
# A claimed invoice is not claimed again for the request timeout plus this (seconds),
# so a lease only lapses after its attempt has certainly given up.
LEASE_MARGIN_SECONDS = 5
# Claimed callbacks of a merchant at its cap wait in this process, up to this many per
# merchant, and start as its attempts finish (within LEASE_MARGIN_SECONDS of the claim,
# so the lease still outlasts the attempt); beyond that they go back to the schedule.
PER_MERCHANT_WAITING = 64
# A merchant at its cap gets its further callbacks back this much later (seconds).
BUSY_MERCHANT_DELAY_SECONDS = 1
# The loop looks for due callbacks at least this often (seconds); local commits wake it at once.
POLL_SECONDS = 0.1
# Bytes of a merchant's response that are read (and thrown away) at most.
MAX_RESPONSE_BYTES = 64 * 1024
# Merchant records (callback URL, keys) are re-read after this many seconds.
MERCHANT_CACHE_SECONDS = 30.0
# Back-off while Redis is unreachable (seconds).
REDIS_BACKOFF_SECONDS = 0.5


@dataclass
class Deliverer:
    """The delivery loop of one worker process."""

    redis: Redis
    store: InvoiceStore
    settings: Settings
    clock: Callable[[], float] = time.time
    # How callback hosts are resolved (tests substitute their own DNS answers).
    resolve: Resolver = system_resolve
    # The HTTP client (worker/outbox/http.py): it never resolves a name, every request
    # goes to the address resolve_destination checked.
    _client: CallbackClient | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _busy: Counter[str] = field(default_factory=Counter)
    # Per merchant at its cap: claimed invoices and the time by which each must start.
    _waiting: dict[str, deque[tuple[Invoice, Merchant, float]]] = field(default_factory=dict)
    _merchants: dict[str, tuple[float, Merchant | None]] = field(default_factory=dict)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    _records: GroupCommit[tuple[Invoice, Outcome, int], tuple[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        self._records = GroupCommit(self._record_many, MAX_IN_FLIGHT)

    def wake(self) -> None:
        """Look for due callbacks now (called when this process committed a snapshot)."""
        self._wakeup.set()

    async def start(self) -> None:
        self._client = CallbackClient(
            timeout=self.settings.callback_timeout_seconds,
            limit=MAX_IN_FLIGHT,
            max_response_bytes=MAX_RESPONSE_BYTES,
        )

    def stop(self) -> None:
        """Claim nothing more; `run` returns, attempts in flight go on (see `close`)."""
        self._stopping = True
        self.wake()

    async def close(self, grace_seconds: float = 0.0) -> None:
        """Give attempts in flight `grace_seconds` to finish and record, then cancel the rest.

        Claimed callbacks still waiting for their merchant's slot go back to the
        schedule for another worker; a cancelled attempt's lease runs out and
        another worker delivers it (possibly again, with the same sequence).
        """
        waiting = [invoice.id for line in self._waiting.values() for invoice, _, _ in line]
        self._waiting.clear()
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await self._reschedule([], waiting)
        if self._tasks and grace_seconds > 0:
            await asyncio.wait(list(self._tasks), timeout=grace_seconds)
        if self._tasks:
            log.warning("deliveries_cancelled", attempts=len(self._tasks))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    async def run(self) -> None:
        """Claim and deliver until stopped; attempts run concurrently, leases guard each invoice."""
        if self._client is None:
            await self.start()
        while not self._stopping:
            try:
                await self.deliver_due()
            except REDIS_UNAVAILABLE as exc:
                log.warning("delivery_redis_error", error=repr(exc))
                await asyncio.sleep(REDIS_BACKOFF_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), POLL_SECONDS)
            self._wakeup.clear()

    async def deliver_due(self) -> int:
        """Claim what is due (as many as there are free slots) and start their attempts.

        The claimed invoices are read in one round trip. A merchant at its cap
        keeps a short line of claimed invoices here, started as its attempts
        finish; the rest go back to the schedule, untried, in one more trip.
        """
        for merchant_key in list(self._waiting):
            await self._start_waiting(merchant_key)
        free = MAX_IN_FLIGHT - len(self._tasks) - self._waiting_count()
        if free <= 0:
            return 0
        now = self.clock()
        lease_end = now + self.settings.callback_timeout_seconds + LEASE_MARGIN_SECONDS
        claimed = await claim_due(
            self.redis,
            self.store.scripts.claim_due,
            keys.delivery_due,
            now,
            lease_end,
            min(free, CLAIM_BATCH),
        )
        if not claimed:
            return 0
        ids = [int(member) for member in claimed]
        loaded = await self.store.get_many(ids)
        # No snapshot leaves before the replicas hold it (else the lease runs out: retried).
        await replicated(self.redis)
        gone = [invoice_id for invoice_id in ids if invoice_id not in loaded]
        later: list[int] = []
        for invoice_id in ids:
            stored = loaded.get(invoice_id)
            if stored is None:
                continue
            merchant = await self._merchant(stored.invoice.merchant)
            if merchant is None or self._busy[merchant.key] < PER_MERCHANT_IN_FLIGHT:
                self._start(stored.invoice, merchant)
                continue
            line = self._waiting.setdefault(merchant.key, deque())
            if len(line) < PER_MERCHANT_WAITING:
                line.append((stored.invoice, merchant, now + LEASE_MARGIN_SECONDS))
            else:
                later.append(invoice_id)
        await self._reschedule(gone, later)
        return len(claimed)

    def _start(self, invoice: Invoice, merchant: Merchant | None) -> None:
        """Start one attempt; it counts against its merchant's cap until it is posted."""
        if merchant is not None:
            self._busy[merchant.key] += 1
        task = asyncio.create_task(self._attempt(invoice, merchant))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _waiting_count(self) -> int:
        return sum(len(line) for line in self._waiting.values())

    async def _start_waiting(self, merchant_key: str) -> None:
        """Start the merchant's waiting invoices its free slots allow, if still in time."""
        line = self._waiting.get(merchant_key)
        late: list[int] = []
        while line and self._busy[merchant_key] < PER_MERCHANT_IN_FLIGHT:
            invoice, waiting_merchant, start_by = line.popleft()
            if self.clock() <= start_by:
                self._start(invoice, waiting_merchant)
            else:  # its lease may not outlast an attempt any more: back to the schedule
                late.append(invoice.id)
        if line is not None and not line:
            del self._waiting[merchant_key]
        await self._reschedule([], late)

    async def _reschedule(self, gone: list[int], later: list[int]) -> None:
        """Drop invoices that no longer exist; put `later` back, due in a moment."""
        if not gone and not later:
            return
        at = self.clock() + BUSY_MERCHANT_DELAY_SECONDS
        async with self.redis.pipeline(transaction=False) as pipe:
            for invoice_id in gone:
                pipe.zrem(keys.delivery_due(keys.invoice_partition(invoice_id)), invoice_id)
            for invoice_id in later:
                due = keys.delivery_due(keys.invoice_partition(invoice_id))
                pipe.zadd(due, {str(invoice_id): at}, xx=True)
            await pipe.execute()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery_crashed", error=repr(task.exception()))
        self.wake()  # a slot is free

    async def wait_idle(self) -> None:
        """Until no attempt is in flight (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _merchant(self, key: str) -> Merchant | None:
        cached = self._merchants.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        merchant = await MerchantStore(self.redis).get(key)
        self._merchants[key] = (now + MERCHANT_CACHE_SECONDS, merchant)
        return merchant

    async def _attempt(self, invoice: Invoice, merchant: Merchant | None) -> None:
        """Post the snapshot, record the outcome, then start the merchant's next waiting one."""
        if merchant is None:
            outcome = Outcome(None, "merchant not found", 0, delivered=False, permanent=True)
            await self._record(invoice, outcome)
            return
        try:
            outcome = await self._post(merchant, invoice)
        finally:
            self._busy[merchant.key] -= 1
        try:
            await self._record(invoice, outcome)
        finally:
            await self._start_waiting(merchant.key)

    async def _post(self, merchant: Merchant, invoice: Invoice) -> Outcome:
        """One POST of the invoice's current snapshot; never raises for the merchant's faults."""
        assert self._client is not None
        body = orjson.dumps(snapshot(invoice))  # compact JSON, as json.dumps(separators=…)
        now = int(self.clock())
        started = time.perf_counter()

        def took() -> int:
            return int((time.perf_counter() - started) * 1000)

        try:
            # Resolved and checked once per attempt, then connected to that very address.
            destination = await resolve_destination(
                merchant.callback_url, self.settings.allow_private_callbacks, self.resolve
            )
            url, host, server_hostname = pinned(destination)
            # No redirect is followed (a 3xx fails the attempt); at most MAX_RESPONSE_BYTES
            # of the body are read, and thrown away.
            status = await self._client.post(
                url,
                body,
                {**headers(merchant, body, invoice.id, invoice.sequence, now), **host},
                server_hostname,
            )
            ok = 200 <= status < 300
            return Outcome(status, "" if ok else f"HTTP {status}", took(), delivered=ok)
        except DestinationRefused as exc:
            # No retry can help: dead-lettered at once (redeliverable once the URL is fixed).
            return Outcome(None, str(exc), took(), delivered=False, permanent=True)
        except (ResponseError, TimeoutError, OSError) as exc:
            return Outcome(None, _short(exc), took(), delivered=False)

    async def _record(self, invoice: Invoice, outcome: Outcome) -> None:
        """Record the attempt (delivery_done.lua); attempts finishing together share a trip."""
        now = int(self.clock())
        state, next_at = await self._records.submit((invoice, outcome, now))
        event = "callback_delivered" if outcome.delivered else "callback_failed"
        fields: dict[str, Any] = {
            **bound(invoice),
            "sequence": invoice.sequence,
            "status_code": outcome.status_code,
            "duration_ms": outcome.duration_ms,
            "state": state,
        }
        if not outcome.delivered:
            fields["error"] = outcome.error
            fields["retry_in_s"] = None if next_at < 0 else next_at - now
        (log.warning if state == "dead" else log.info)(event, **fields)

    async def _record_many(
        self, attempts: list[tuple[Invoice, Outcome, int]]
    ) -> list[tuple[str, int] | BaseException]:
        """One delivery_done.lua call per attempt, pipelined; each is atomic on its own."""
        schedule = self.settings.callback_retry_schedule
        async with self.redis.pipeline(transaction=False) as pipe:
            for invoice, outcome, now in attempts:
                keys_, args = record_call(invoice.id, invoice.sequence, outcome, now, schedule)
                await self.store.scripts.delivery_done(keys=keys_, args=args, client=pipe)
            replies = await execute(pipe, raise_on_error=False)
        results: list[tuple[str, int] | BaseException] = []
        for reply in replies:
            if isinstance(reply, BaseException):
                results.append(reply)
            else:
                state, next_at = reply
                text = state.decode() if isinstance(state, bytes) else str(state)
                results.append((text, int(next_at)))
        return results


def _short(exc: BaseException) -> str:
    """An error for the delivery log: its type and a bounded message (no bodies, no secrets)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
