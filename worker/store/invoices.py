"""Invoices in Redis: create, read, and commit a transition with its effects atomically.

Each invoice is one string, `{version}:{JSON}` (e.g. `3:{"id":7,…}`): a
single string costs ~160 bytes less than a two-field hash, whose JSON value
is too long for the compact listpack encoding. `commit` is a compare-and-set
on the version (commit.lua reads only the head) that writes the new state
together with its timer, its callback outbox entry, its e-mails and its
ledger entries: a crash can never separate a state change from its effects,
and two writers can never lose an update (the loser re-reads and re-applies).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from worker.domain.effects import Email, LedgerEntry
from worker.domain.machine import Policy, Transition, deadline
from worker.domain.models import Invoice
from worker.domain.money import fmt8
from worker.store import keys
from worker.store.codec import dump_invoice, load_invoice
from worker.store.connection import acknowledged, awaited, replicated
from worker.store.scripts import Scripts


class AddressOwned(RuntimeError):
    """A deposit address is owned by another invoice (allocation handed it out twice: a bug)."""


class RefundTokenUsed(RuntimeError):
    """A refund token is indexed to another invoice (192 random bits never collide: a bug)."""


class DuplicateForeignId(Exception):
    """The merchant already has an invoice with this foreign id."""

    def __init__(self, existing_id: int) -> None:
        super().__init__(existing_id)
        self.existing_id = existing_id


@dataclass(frozen=True, slots=True)
class Stored:
    """An invoice as read, with the version a commit must match."""

    invoice: Invoice
    version: int


def decode_stored(raw: bytes) -> Stored:
    """An invoice from its stored form `{version}:{JSON}`."""
    version, _, data = raw.partition(b":")
    return Stored(load_invoice(data), int(version))


async def _command(redis: Redis, *args: str | bytes | int) -> Any:
    """One command as given: redis-py types hash fields as text, the lookups' are bytes."""
    return await redis.execute_command(*args)  # type: ignore[no-untyped-call]


def _int(value: bytes | None) -> int | None:
    return None if value is None else int(value)


async def _get_all(redis: Redis, names: Sequence[str]) -> list[bytes | None]:
    """GET of many keys in one pipelined round trip (per node on a cluster)."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.get(name)
        rows: list[bytes | None] = await pipe.execute()
    return rows


class InvoiceStore:
    """Reads and atomic writes of invoices; the only code that knows their Redis shape."""

    def __init__(self, redis: Redis, policy: Policy) -> None:
        self.redis = redis
        self.policy = policy
        self.scripts = Scripts(redis)

    async def next_id(self, merchant: str, foreign_id: str) -> int:
        """A fresh invoice id in the partition of the foreign id (so create.lua is one slot)."""
        partition = keys.foreign_id_partition(merchant, foreign_id)
        n = int(await self.redis.incr(keys.invoice_ids(partition)))
        return n * keys.partitions() + partition

    async def create(self, invoice: Invoice) -> None:
        """Store a new invoice; raise `DuplicateForeignId` if the foreign id is taken.

        The lookups in other slots (token, deposit address) are written first
        and the invoice last: a crash between them leaves a lookup pointing to
        no invoice (readers check), never an invoice that cannot be found.
        """
        # No WAIT for the lookups: the create's WAIT below follows them, and covers them.
        token = keys.token_index(invoice.token)
        await _command(self.redis, "HSETNX", token.key, token.field, invoice.id)
        if invoice.address is not None:
            await self.claim_address(invoice.id, invoice.address.currency, invoice.address.address)
        keys_, args = self.create_call(invoice)
        async with self.redis.pipeline(transaction=False) as pipe:
            await self.scripts.create(keys=keys_, args=args, client=pipe)
            [(created, existing)] = await acknowledged(self.redis, pipe)
        if not int(created):
            raise await self.taken(int(existing))

    async def taken(self, existing: int) -> DuplicateForeignId:
        """The error for a foreign id in use, once the replicas hold that invoice.

        Often the answer to a retry after a 503: "it exists" may be said only
        when a failover cannot forget it (ReplicationTimeout otherwise).
        """
        await replicated(self.redis)
        return DuplicateForeignId(existing)

    async def claim_address(self, invoice_id: int, currency: str, address: str) -> None:
        """Make `invoice_id` the owner of a deposit address, before the write that assigns it.

        Idempotent for the same invoice; an address owned by another invoice is
        a bug in allocation (addresses are never handed out twice) and raises.
        Not WAITed for here: the write that assigns the address is, and comes after.
        """
        keys_, args = self.address_claim_call(invoice_id, currency, address)
        owner = int(await self.scripts.address_claim(keys=keys_, args=args))
        if owner != invoice_id:
            raise AddressOwned(f"{currency} {address} is owned by invoice {owner}")

    @staticmethod
    def address_claim_call(
        invoice_id: int, currency: str, address: str
    ) -> tuple[list[str], list[str | int | bytes]]:
        """KEYS and ARGV of address_claim.lua (an owner written by earlier versions wins)."""
        index = keys.address_index(currency, address)
        return [keys.address(currency, address), index.key], [index.field, invoice_id]

    async def claim_refund_token(self, invoice_id: int, refund_token: str) -> None:
        """Index a refund token to `invoice_id`, before the commit that stores it on the invoice.

        The index key has its own slot (the token spreads it), so it cannot be in
        commit.lua: written first, a crash leaves at worst a key whose invoice
        does not hold the token, which `by_refund_token` treats as unknown.
        Not WAITed for here: the commit that stores the token is, and comes after.
        """
        await self.claim_refund_tokens([(invoice_id, refund_token)])

    async def claim_refund_tokens(self, claims: Sequence[tuple[int, str]]) -> None:
        """Index many refund tokens in one round trip (see `claim_refund_token`)."""
        if not claims:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for invoice_id, refund_token in claims:
                pipe.set(keys.refund_token(refund_token), invoice_id, nx=True)
                pipe.get(keys.refund_token(refund_token))
            rows = await pipe.execute()
        for (invoice_id, _), owner in zip(claims, rows[1::2], strict=True):
            if int(owner) != invoice_id:
                raise RefundTokenUsed(f"invoice {invoice_id}: token indexed to {int(owner)}")

    async def queue_create(self, pipe: Pipeline, invoice: Invoice) -> None:
        """Add a create and its lookups to a pipeline (bulk loads); results end `[1, id]`.

        Run the pipeline with `scripts.execute` (it answers NOSCRIPT).
        """
        token = keys.token_index(invoice.token)
        pipe.execute_command("HSETNX", token.key, token.field, invoice.id)
        if invoice.address is not None:
            owner = keys.address_index(invoice.address.currency, invoice.address.address)
            pipe.execute_command("HSET", owner.key, owner.field, invoice.id)
        keys_, args = self.create_call(invoice)
        await self.scripts.create(keys=keys_, args=args, client=pipe)

    def create_call(self, invoice: Invoice) -> tuple[list[str], list[str | int | bytes]]:
        """KEYS and ARGV of create.lua for one new invoice."""
        fire_at = deadline(invoice, self.policy)
        claim = keys.foreign_id_index(invoice.merchant, invoice.foreign_id)
        return (
            [
                keys.foreign_id(invoice.merchant, invoice.foreign_id),
                claim.key,
                keys.invoice(invoice.id),
                keys.timers(keys.invoice_partition(invoice.id)),
            ],
            [invoice.id, dump_invoice(invoice), "" if fire_at is None else fire_at, claim.field],
        )

    async def get(self, invoice_id: int) -> Stored | None:
        raw = await self.redis.get(keys.invoice(invoice_id))
        return None if raw is None else decode_stored(raw)

    async def get_many(self, invoice_ids: Sequence[int]) -> dict[int, Stored]:
        """Read many invoices in one round trip (missing ones are left out).

        A pipeline of GETs rather than MGET: the invoices live in many slots.
        """
        if not invoice_ids:
            return {}
        rows = await _get_all(self.redis, [keys.invoice(i) for i in invoice_ids])
        return {
            invoice_id: decode_stored(raw)
            for invoice_id, raw in zip(invoice_ids, rows, strict=True)
            if raw is not None
        }

    async def id_by_foreign_id(self, merchant: str, foreign_id: str) -> int | None:
        index = keys.foreign_id_index(merchant, foreign_id)
        found = await _command(self.redis, "HGET", index.key, index.field)
        if found is None:  # claimed by an earlier version?
            found = await self.redis.get(keys.foreign_id(merchant, foreign_id))
        return _int(found)

    async def id_by_token(self, token: str) -> int | None:
        index = keys.token_index(token)
        found = await _command(self.redis, "HGET", index.key, index.field)
        if found is None:  # indexed by an earlier version?
            found = await self.redis.get(keys.token(token))
        return _int(found)

    async def id_by_refund_token(self, refund_token: str) -> int | None:
        return _int(await self.redis.get(keys.refund_token(refund_token)))

    async def ids_by_address(self, pairs: Sequence[tuple[str, str]]) -> list[int | None]:
        """Owners of (currency, address) pairs, in one round trip."""
        if not pairs:
            return []
        indexes = [keys.address_index(c, a) for c, a in pairs]
        async with self.redis.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.execute_command("HGET", index.key, index.field)
            owners: list[bytes | None] = await pipe.execute()
        missing = [n for n, owner in enumerate(owners) if owner is None]
        if missing:  # owners written by earlier versions (a key each); rare: a second trip
            earlier = await _get_all(self.redis, [keys.address(*pairs[n]) for n in missing])
            for n, owner in zip(missing, earlier, strict=True):
                owners[n] = owner
        return [_int(owner) for owner in owners]

    async def commit(self, stored: Stored, transition: Transition, now: int) -> bool:
        """Write `transition` if the invoice is still at `stored.version`; False on a conflict.

        A deposit address the transition assigns is claimed first (another slot).
        """
        new = transition.invoice.address
        if new is not None and new != stored.invoice.address:
            await self.claim_address(transition.invoice.id, new.currency, new.address)
        issued = issued_refund_token(stored, transition)
        if issued is not None:
            await self.claim_refund_token(transition.invoice.id, issued)
        keys_, args = self.commit_call(stored, transition, now)
        async with self.redis.pipeline(transaction=False) as pipe:
            await self.scripts.commit(keys=keys_, args=args, client=pipe)
            [version] = await acknowledged(self.redis, pipe)
        return bool(version)

    async def queue_commit(
        self, pipe: Pipeline, stored: Stored, transition: Transition, now: int
    ) -> None:
        """Add a commit to a pipeline (batch apply); its result is the new version or 0.

        Run the pipeline with `acknowledged` or `scripts.execute` (they answer NOSCRIPT).

        Only for transitions that assign no deposit address (payments): see `commit`.
        A refund token the transition issues must be indexed first, in an earlier
        round trip (`claim_refund_tokens`): a cluster pipeline runs its nodes'
        commands concurrently, so the same pipeline would not keep that order.
        """
        keys_, args = self.commit_call(stored, transition, now)
        await self.scripts.commit(keys=keys_, args=args, client=pipe)

    def commit_call(
        self, stored: Stored, transition: Transition, now: int
    ) -> tuple[list[str], list[str | int | bytes]]:
        """KEYS and ARGV of commit.lua for one transition."""
        new = transition.invoice
        fire_at = deadline(new, self.policy)
        callback = transition.callback
        ledger = [e for e in transition.effects if isinstance(e, LedgerEntry)]
        mails = [e for e in transition.effects if isinstance(e, Email)]
        partition = keys.invoice_partition(new.id)
        return (
            [
                keys.invoice(new.id),
                keys.timers(partition),
                keys.delivery_due(partition),
                keys.delivery(new.id),
                keys.mail_due(partition),
                keys.mails(new.id),
                keys.ledger_outbox(partition),
            ],
            [
                stored.version,
                dump_invoice(new),
                new.id,
                "" if fire_at is None else fire_at,
                "" if callback is None else callback.sequence,
                now,
                _ledger_lines(ledger, now),
                _mails_json(mails, now),
                new.merchant,
            ],
        )

    async def due_timers(self, now: int, limit: int) -> list[int]:
        """Invoices whose timer fire time has come, from every partition (one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition in range(keys.partitions()):
                pipe.zrangebyscore(keys.timers(partition), "-inf", now, start=0, num=limit)
            rows = await pipe.execute()
        return [int(i) for row in rows for i in row][:limit]

    async def sync_timer(self, invoice_id: int) -> None:
        """Set the invoice's timer entry from its current state (or remove it)."""
        stored = await self.get(invoice_id)
        fire_at = None if stored is None else deadline(stored.invoice, self.policy)
        timers = keys.timers(keys.invoice_partition(invoice_id))
        if fire_at is None:
            await self.redis.zrem(timers, invoice_id)
        else:
            await self.redis.zadd(timers, {str(invoice_id): fire_at})

    async def balances(self, merchant: str) -> dict[str, Decimal]:
        raw = await awaited(self.redis.hgetall(keys.balance(merchant)))
        return {k.decode(): Decimal(v.decode()) for k, v in raw.items()}

    async def dec_add(self, a: str, b: str) -> str:
        """The Lua decimal addition, exposed for its tests."""
        result = await self.scripts.dec_add(keys=[], args=[a, b])
        return result.decode() if isinstance(result, bytes) else str(result)


def issued_refund_token(stored: Stored, transition: Transition) -> str | None:
    """The refund token this transition gives the invoice (with its first refund e-mail)."""
    token = transition.invoice.refund_token
    return token if token is not None and token != stored.invoice.refund_token else None


# A merchant's ledger holds one line of text per entry, kept for good (an audit trail),
# so it is short: `{invoice id} {kind} {currency} {amount} {unix seconds}`, e.g.
# `7 credit EUR 106.75000000 1795703443` or `7 fee_crypto_deposit EUR -1.06750000 1795703443`.


@dataclass(frozen=True, slots=True)
class LedgerLine:
    """One entry of a merchant's ledger as stored."""

    invoice_id: int
    kind: str
    currency: str
    amount: Decimal
    at: int


def ledger_line(entry: LedgerEntry, now: int) -> str:
    return f"{entry.invoice_id} {entry.kind.value} {entry.currency} {fmt8(entry.amount)} {now}"


def parse_ledger_line(raw: bytes | str) -> LedgerLine:
    invoice_id, kind, currency, amount, at = (
        raw.decode() if isinstance(raw, bytes) else raw
    ).split()
    return LedgerLine(int(invoice_id), kind, currency, Decimal(amount), int(at))


def _ledger_lines(entries: Iterable[LedgerEntry], now: int) -> str:
    return "\n".join(ledger_line(entry, now) for entry in entries)


def _mails_json(mails: Iterable[Email], now: int) -> str:
    records = {
        m.cause: {
            "kind": m.kind.value,
            "cause": m.cause,
            "currency": m.currency,
            "expected": fmt8(m.expected),
            "received": fmt8(m.received),
            "created_at": now,
        }
        for m in mails
    }
    return json.dumps(records) if records else ""
