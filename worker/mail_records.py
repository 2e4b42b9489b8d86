"""The record of one customer e-mail in ``cv:mails:{id}`` and its place in ``cv:mail:due``.

commit.lua writes a record's first fields atomically with the state change
that caused the mail; worker/mail.py adds the sending state.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import TypeAdapter

from worker.models import EmailKind


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
