"""Customer e-mails (spec §10): claim due mails with a lease, render, send, record the outcome.

``commit.lua`` stores each e-mail a state change obliges once per cause in the
invoice's mails hash (``cv:mails:{id}``) and schedules it in ``cv:mail:due``,
atomically with the change. This module is the other half:

1. ``claim_due.lua`` (shared with the callback outbox) takes due members and
   moves their score to now + lease, so two workers never send one mail at
   once, and one killed mid-send leaves it to be taken again when the lease
   runs out.
2. The mail is rendered from ``worker/mail/templates/`` and sent over SMTP
   (``COINVOICE_SMTP_URL``) or dropped into a Maildir (``COINVOICE_MAILDIR``).
3. ``mail_record.lua`` records the outcome as a compare-and-set on the record
   (sent / retrying with capped, jittered backoff / failed), moving or
   removing its due entry in the same step.

Delivery is at least once: a worker that dies between the server's "250" and
recording "sent" leaves the lease to expire, and the next worker sends the
mail again with the same deterministic Message-ID, so the copy can be told
apart. A mail for an invoice without an e-mail address waits in state
``waiting_for_address`` (off the schedule) until ``release_waiting`` is
called when the customer gives one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import replace
from email.utils import parseaddr
from typing import TYPE_CHECKING, Any, NamedTuple

from redis.asyncio import Redis

from worker.config import Settings
from worker.domain.models import Invoice
from worker.logs import get_logger
from worker.store import keys
from worker.store.connection import REDIS_UNAVAILABLE, awaited, replicated

if TYPE_CHECKING:
    from worker.services.invoices import InvoiceService


from worker.mail.render import Rendered, build_message, render
from worker.mail.transport import (
    SEND_TIMEOUT_SECONDS,
    PermanentMailError,
    TransientMailError,
    Transport,
    recipient_address,
    short_error,
    transport_from,
)
from worker.store.mails import (
    Attempt,
    MailRecord,
    MailScripts,
    MailState,
    load_record,
    parse_member,
    unschedule,
)

log = get_logger(__name__)

# Idle wait between passes when nothing was due (seconds).
POLL_SECONDS = 0.5
# Mails claimed per pass; they are sent concurrently, so a pass takes about one send.
BATCH = 10
# A claimed mail is nobody else's this long (seconds). Well above one send's
# timeout, so only a dead worker's mail is taken over, not a slow one's.
LEASE_SECONDS = 120.0
# Tries per mail before it is marked failed (about 3 hours with the backoff below).
MAX_ATTEMPTS = 10
# Wait after the first failed try (seconds); doubles per try up to the cap (seconds).
BACKOFF_FIRST_SECONDS = 30.0
BACKOFF_CAP_SECONDS = 3600.0
# After a Redis error the loop waits this long at most before its next pass (seconds).
LOOP_BACKOFF_CAP_SECONDS = 10.0
# Compare-and-set rounds per outcome; losing more often means a bug, not contention.
RECORD_CAS_ATTEMPTS = 5


# --------------------------------------------------------------------------- sending


def backoff_seconds(failures: int, rng: random.Random) -> float:
    """Wait after `failures` failed tries: doubling, capped, with jitter in its upper half.

    The jitter spreads retries of mails that failed together (a server outage)
    so they do not all hit the server again at the same second.
    """
    delay = min(BACKOFF_CAP_SECONDS, BACKOFF_FIRST_SECONDS * 2.0 ** max(0, failures - 1))
    return delay / 2 + rng.uniform(0, delay / 2)


class PassResult(NamedTuple):
    claimed: int
    sent: int


def _fields(invoice_id: int, invoice: Invoice | None, record: MailRecord) -> dict[str, object]:
    """The log context of one mail (spec §11); never the address, body or SMTP secrets."""
    fields: dict[str, object] = {"invoice_id": invoice_id}
    if invoice is not None:
        fields |= {"foreign_id": invoice.foreign_id, "merchant": invoice.merchant}
    return fields | {"cause": record.cause, "kind": record.kind.value}


class Mailer:
    """Sends due customer e-mails; any number of mailers may run against one Redis."""

    def __init__(
        self,
        redis: Redis,
        service: InvoiceService,
        settings: Settings,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        batch: int = BATCH,
        lease_seconds: float = LEASE_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.redis = redis
        self.service = service
        self.settings = settings
        self.transport = transport or transport_from(settings)
        # The service's clock by default (read at each call), so tests that move the
        # invoices' time move it for mails too.
        self.clock = clock or (lambda: service.clock())
        self.rng = rng or random.Random()
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.sender = parseaddr(settings.mail_from)[1] or settings.mail_from
        self.scripts = MailScripts(redis)

    async def claim(self) -> list[str]:
        """Take up to `batch` due mails for `lease_seconds`."""
        now = self.clock()
        return await self.scripts.claim(now, now + self.lease_seconds, self.batch)

    async def send_due(self) -> int:
        """One pass: claim due mails and send them; return how many were sent."""
        return (await self.run_pass()).sent

    async def run_pass(self) -> PassResult:
        claimed = await self.claim()
        results = await asyncio.gather(*(self.deliver(m) for m in claimed), return_exceptions=True)
        for taken, result in zip(claimed, results, strict=True):
            if isinstance(result, BaseException):
                # Redis went away mid-mail: the lease runs out and a later pass retries.
                log.error("mail_error", member=taken, error=repr(result))
        return PassResult(len(claimed), sum(r is MailState.SENT for r in results))

    async def deliver(self, taken: str) -> MailState | None:
        """Send one claimed mail and record the outcome; return the state it is left in."""
        try:
            invoice_id, cause = parse_member(taken)
        except ValueError:
            log.error("mail_bad_due_entry", member=taken)
            await unschedule(self.redis, taken)
            return None
        for _ in range(RECORD_CAS_ATTEMPTS):
            raw = await awaited(self.redis.hget(keys.mails(invoice_id), cause))
            if raw is None:
                log.error("mail_record_missing", invoice_id=invoice_id, cause=cause)
                await unschedule(self.redis, taken)
                return None
            record = load_record(raw)
            if record.state.is_final or record.state is MailState.WAITING_FOR_ADDRESS:
                # Another worker finished or parked it after our claim (our lease ran out).
                return record.state
            stored = await self.service.store.get(invoice_id)
            if stored is not None and not stored.invoice.email:
                # Parked only if the invoice is still the one without an address: a
                # confirm that just gave one bumped the version, and we look again.
                parked = replace(record, state=MailState.WAITING_FOR_ADDRESS, next_at=None)
                if await self.scripts.record(invoice_id, raw, parked, None, stored.version):
                    log.info(
                        "mail_waiting_for_address", **_fields(invoice_id, stored.invoice, record)
                    )
                    return parked.state
                continue
            invoice = None if stored is None else stored.invoice
            # No e-mail leaves for a state a failover could forget (else retried after the lease).
            await replicated(self.redis)
            attempt, rendered = await self._try(invoice, record)
            return await self._record(invoice_id, invoice, raw, record, attempt, rendered)
        log.error("mail_record_contended", invoice_id=invoice_id, cause=cause)
        return None

    async def _try(
        self, invoice: Invoice | None, record: MailRecord
    ) -> tuple[Attempt, Rendered | None]:
        """Render and send once; the attempt says how it went (never raises for a send)."""
        started = self.clock()
        rendered: Rendered | None = None
        error: str | None = None
        permanent = False
        try:
            if invoice is None:
                raise PermanentMailError("the invoice no longer exists")
            recipient = recipient_address(invoice.email or "")
            rendered = render(invoice, record, self.settings.base_url)
            message = build_message(rendered, self.settings.mail_from, recipient, started)
            # aiosmtplib's timeout is per command; this bounds the whole conversation.
            async with asyncio.timeout(SEND_TIMEOUT_SECONDS + 5):
                await self.transport.send(message, self.sender, recipient)
        except PermanentMailError as exc:
            error, permanent = str(exc), True
        except TransientMailError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"no answer within {SEND_TIMEOUT_SECONDS:.0f} s"
        except Exception as exc:
            # A bug (a template, an odd record) must not stop the other mails; it is
            # retried like a transient failure, so it ends as `failed` after MAX_ATTEMPTS.
            # No traceback: a renderer showing frame locals could print the SMTP password.
            error = short_error(f"{type(exc).__name__}: {exc}")
            log.error("mail_unexpected_error", cause=record.cause, error=error)
        if error is None:
            outcome = MailState.SENT
        else:
            outcome = MailState.FAILED if permanent else MailState.RETRYING
        duration_ms = int((self.clock() - started) * 1000)
        return Attempt(int(started), outcome, duration_ms, error), rendered

    def _apply(
        self, record: MailRecord, attempt: Attempt, rendered: Rendered | None
    ) -> tuple[MailRecord, float | None]:
        """The record after `attempt`, and when it is due next (None: off the schedule)."""
        attempts = (*record.attempts, attempt)
        if attempt.outcome is MailState.SENT:
            message = rendered.message_id if rendered else None
            sent = replace(record, attempts=attempts, next_at=None, message_id=message)
            return replace(sent, state=MailState.SENT, sent_at=attempt.at), None
        if attempt.outcome is MailState.FAILED or len(attempts) >= self.max_attempts:
            attempt = replace(attempt, outcome=MailState.FAILED)
            attempts = (*record.attempts, attempt)
            return replace(record, state=MailState.FAILED, attempts=attempts, next_at=None), None
        due_at = self.clock() + backoff_seconds(len(attempts), self.rng)
        retry = replace(record, state=MailState.RETRYING, attempts=attempts, next_at=int(due_at))
        return retry, due_at

    async def _record(
        self,
        invoice_id: int,
        invoice: Invoice | None,
        raw: bytes | str,
        record: MailRecord,
        attempt: Attempt,
        rendered: Rendered | None,
    ) -> MailState | None:
        """Write the outcome with compare-and-set; on a lost race decide again on top."""
        for _ in range(RECORD_CAS_ATTEMPTS):
            new, due_at = self._apply(record, attempt, rendered)
            if await self.scripts.record(invoice_id, raw, new, due_at):
                self._log(invoice_id, invoice, new, due_at)
                return new.state
            current = await awaited(self.redis.hget(keys.mails(invoice_id), record.cause))
            if current is None:
                return None
            raw, record = current, load_record(current)
            # A worker whose lease had run out recorded first. Sent stays sent; a
            # final failure only gives way to our success.
            if record.state is MailState.SENT or (
                record.state is MailState.FAILED and attempt.outcome is not MailState.SENT
            ):
                return record.state
        log.error("mail_record_contended", invoice_id=invoice_id, cause=record.cause)
        return None

    def _log(
        self, invoice_id: int, invoice: Invoice | None, record: MailRecord, due_at: float | None
    ) -> None:
        last = record.attempts[-1]
        fields = _fields(invoice_id, invoice, record) | {
            "attempt": len(record.attempts),
            "outcome": record.state.value,
            "transport": self.transport.name,
            "duration_ms": last.duration_ms,
        }
        if record.state is MailState.SENT:
            log.info("mail_sent", **fields, message_id=record.message_id)
        elif record.state is MailState.RETRYING and due_at is not None:
            retry_in = round(due_at - self.clock(), 1)
            log.warning("mail_retrying", **fields, error=last.error, retry_in_s=retry_in)
        else:
            log.error("mail_failed", **fields, error=last.error)


async def send_due(
    redis: Redis, service: InvoiceService, settings: Settings, **options: Any
) -> int:
    """One pass of a fresh `Mailer` (options as its keyword arguments); return mails sent."""
    return await Mailer(redis, service, settings, **options).send_due()


async def run_mail_loop(
    redis: Redis,
    service: InvoiceService,
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    mailer: Mailer | None = None,
) -> None:
    """Send due e-mails until `stop` is set (a worker runs this for its lifetime).

    Passes follow each other at once while they find full batches, and every
    `POLL_SECONDS` otherwise. Redis errors are ridden out with backoff; a mail
    claimed when Redis went away is taken again once its lease has run out.
    """
    mailer = mailer or Mailer(redis, service, settings)
    stop = stop or asyncio.Event()
    log.info("mail_loop_started", transport=mailer.transport.name)
    failures = 0
    while not stop.is_set():
        try:
            result = await mailer.run_pass()
            failures = 0
            delay = 0.0 if result.claimed >= mailer.batch else POLL_SECONDS
        except REDIS_UNAVAILABLE as exc:
            failures += 1
            delay = min(LOOP_BACKOFF_CAP_SECONDS, POLL_SECONDS * 2**failures)
            log.warning("mail_loop_redis_error", error=repr(exc), retry_in_s=delay)
        if delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        else:
            await asyncio.sleep(0)  # let other tasks run between full batches
