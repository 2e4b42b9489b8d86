"""The record of one customer e-mail in ``cv:mails:{id}`` and its place in ``cv:mail:due``.

commit.lua writes a record's first fields atomically with the state change
that caused the mail; worker/mail/loop.py adds the sending state, through `MailScripts` here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from pydantic import TypeAdapter
from redis.asyncio import Redis

from worker.domain.models import EmailKind
from worker.logs import get_logger
from worker.store import keys
from worker.store.connection import awaited
from worker.store.schedules import claim_due
from worker.store.scripts import Script

log = get_logger(__name__)


class MailState(StrEnum):
    """Where one e-mail stands; `sent` and `failed` are final."""

    PENDING = "pending"  # recorded by commit.lua, not tried yet
    RETRYING = "retrying"  # a try failed transiently; due again at `next_at`
    SENT = "sent"
    FAILED = "failed"  # refused permanently, or out of tries
    WAITING_FOR_ADDRESS = "waiting_for_address"  # the invoice has no e-mail yet

    @property
    def is_final(self) -> bool:
        return self in (MailState.SENT, MailState.FAILED)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try to send a mail."""

    at: int  # unix seconds when the try started
    outcome: MailState  # the state the try left the mail in
    duration_ms: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class MailRecord:
    """The record in ``cv:mails:{id}``: commit.lua writes the first six fields, we the rest."""

    kind: EmailKind
    cause: str
    currency: str
    expected: str  # 8-decimal strings, as recorded with the state change
    received: str
    created_at: int
    state: MailState = MailState.PENDING
    attempts: tuple[Attempt, ...] = ()
    next_at: int | None = None  # when a retrying mail is due again (unix seconds)
    sent_at: int | None = None
    message_id: str | None = None


_RECORD = TypeAdapter(MailRecord)


def load_record(raw: bytes | str) -> MailRecord:
    return _RECORD.validate_json(raw)


def dump_record(record: MailRecord) -> bytes:
    return _RECORD.dump_json(record, exclude_none=True)


def member(invoice_id: int, cause: str) -> str:
    """The ``cv:mail:due`` member of a mail (as commit.lua builds it)."""
    return f"{invoice_id}:{cause}"


def parse_member(value: str) -> tuple[int, str]:
    """``"12:late:5"`` → ``(12, "late:5")``: causes may contain colons, ids do not."""
    invoice_id, _, cause = value.partition(":")
    return int(invoice_id), cause


class MailScripts:
    """The mail scripts of one Redis client, behind typed calls."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        # The same lease claim as the callback outbox (claim_due.lua).
        self._claim = Script(redis, "claim_due")
        self._record = Script(redis, "mail_record")

    async def claim(self, now: float, lease_until: float, limit: int) -> list[str]:
        """Lease up to `limit` due mails of every partition."""
        return await claim_due(self._redis, self._claim, keys.mail_due, now, lease_until, limit)

    async def record(
        self,
        invoice_id: int,
        read: bytes | str,
        new: MailRecord,
        due_at: float | None,
        invoice_version: int | None = None,
    ) -> bool:
        """Replace the record if it is still `read`; schedule it at `due_at` or unschedule it."""
        written = await self._record(
            keys=[
                keys.mails(invoice_id),
                keys.mail_due(keys.invoice_partition(invoice_id)),
                keys.invoice(invoice_id),
            ],
            args=[
                new.cause,
                read,
                dump_record(new),
                member(invoice_id, new.cause),
                "" if due_at is None else due_at,
                "" if invoice_version is None else invoice_version,
            ],
        )
        return bool(written)


async def unschedule(redis: Redis, taken: str) -> None:
    """Take a due member off its schedule (one that cannot be read: off every partition's)."""
    try:
        partitions = [keys.invoice_partition(parse_member(taken)[0])]
    except ValueError:
        partitions = list(range(keys.partitions()))
    async with redis.pipeline(transaction=False) as pipe:
        for partition in partitions:
            pipe.zrem(keys.mail_due(partition), taken)
        await pipe.execute()


async def release_waiting(redis: Redis, invoice_id: int, *, now: float | None = None) -> int:
    """Make the invoice's mails that wait for an address due now; return how many.

    Call it after a change that gave the invoice an e-mail address. A record
    that changed meanwhile is left to whoever changed it.
    """
    scripts = MailScripts(redis)
    due_at = time.time() if now is None else now
    released = 0
    raw_records: dict[Any, Any] = await awaited(redis.hgetall(keys.mails(invoice_id)))
    for raw in raw_records.values():
        record = load_record(raw)
        if record.state is not MailState.WAITING_FOR_ADDRESS:
            continue
        state = MailState.RETRYING if record.attempts else MailState.PENDING
        ready = replace(record, state=state, next_at=int(due_at))
        released += await scripts.record(invoice_id, raw, ready, due_at)
    if released:
        log.info("mail_released", invoice_id=invoice_id, mails=released)
    return released
