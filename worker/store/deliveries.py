"""The record of a merchant callback's delivery: state, attempt log, redelivery (spec §6, §9).

`cv:dlv:{id}` holds the delivery state of the invoice's newest snapshot and
its attempt log, one field per attempt (`a1`, `a2`, …, counted by `n`);
`delivery_done.lua` records an attempt atomically with the state. Versions
before kept the log in a list of its own, `cv:dlog:{id}`; it is still read,
before the hash's entries. The loop that makes the attempts is
`worker.outbox.delivery`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from worker.domain.models import Invoice
from worker.store import keys
from worker.store.invoices import InvoiceStore


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to."""

    status_code: int | None
    error: str
    duration_ms: int
    delivered: bool
    permanent: bool = False

    @property
    def code(self) -> str:
        """The outcome flag of delivery_done.lua."""
        return "1" if self.delivered else ("x" if self.permanent else "0")


def record_call(
    invoice_id: int, sequence: int, outcome: Outcome, now: int, schedule: Sequence[int]
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of delivery_done.lua for one attempt at delivering `sequence`."""
    return (
        [
            keys.delivery_due(keys.invoice_partition(invoice_id)),
            keys.delivery(invoice_id),
        ],
        [
            invoice_id,
            sequence,
            outcome.code,
            log_entry(sequence, now, outcome),
            now,
            ",".join(str(d) for d in schedule),
        ],
    )


# --------------------------------------------------------------------------- the log
#
# One list entry per attempt, space-separated to keep a long-lived record small
# (the JSON object it replaced took twice the memory):
#
#     {sequence} {unix seconds} {HTTP status or -} {duration ms}[ {error text}]
#
# e.g. `3 1795704698 200 4` or `3 1795704758 - 10002 TimeoutError: …`.


def log_entry(sequence: int, at: int, outcome: Outcome) -> str:
    """The delivery-log entry of one attempt."""
    code = "-" if outcome.status_code is None else str(outcome.status_code)
    entry = f"{sequence} {at} {code} {outcome.duration_ms}"
    return f"{entry} {outcome.error}" if outcome.error else entry


def parse_log_entry(raw: bytes | str) -> tuple[int, dict[str, Any]]:
    """An entry's sequence and the attempt as the callbacks log shows it."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    fields = text.split(" ", 4)
    sequence, at, duration = int(fields[0]), int(fields[1]), int(fields[3])
    code = None if fields[2] == "-" else int(fields[2])
    error = fields[4] if len(fields) > 4 else ""
    return sequence, {"at": at, "status_code": code, "error": error, "duration_ms": duration}


def logged_attempts(state: dict[bytes, bytes]) -> list[bytes]:
    """The attempt-log entries of a delivery hash (`a1`, `a2`, …), oldest first."""
    count = int(state.get(b"n", 0))
    return [state[name] for n in range(1, count + 1) if (name := b"a%d" % n) in state]


async def delivery_log(redis: Redis, invoice: Invoice) -> list[dict[str, Any]]:
    """Every sequence of the invoice, oldest first, with its state and attempts (spec §6)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.delivery(invoice.id))
        pipe.lrange(keys.delivery_log(invoice.id), 0, -1)  # written by earlier versions
        state, raw = await pipe.execute()
    raw = [*raw, *logged_attempts(state)]

    def number(name: bytes) -> int:
        value = state.get(name)
        return -1 if value is None else int(value)

    newest, dead = number(b"seq"), number(b"dead")
    attempts: dict[int, list[dict[str, Any]]] = {}
    delivered: set[int] = set()
    for sequence, attempt in map(parse_log_entry, raw):
        attempts.setdefault(sequence, []).append(attempt)
        code = attempt["status_code"]
        if code is not None and 200 <= code < 300:
            delivered.add(sequence)
    log_rows = []
    for sequence in range(1, newest + 1):
        # `dead` first: a redelivery that failed for good after an earlier 2xx (say the
        # guard now refuses the URL) must not keep showing the sequence as delivered.
        if sequence == dead:
            status = "dead"
        elif sequence in delivered:
            status = "delivered"
        elif sequence < newest:
            status = "superseded"
        else:
            status = "retrying" if attempts.get(sequence) else "pending"
        log_rows.append(
            {"sequence": sequence, "state": status, "attempts": attempts.get(sequence, [])}
        )
    return log_rows


async def redeliver(store: InvoiceStore, invoice: Invoice, now: int) -> int:
    """Deliver the newest snapshot again now (dead-lettered too); its sequence, 0 if none."""
    result = await store.scripts.redeliver(
        keys=[keys.delivery_due(keys.invoice_partition(invoice.id)), keys.delivery(invoice.id)],
        args=[invoice.id, now],
    )
    return int(result)
