"""Customer e-mails (spec §10): rendered from real flows, sent once per cause, retried, parked.

Invoices are created through the API and paid with processing callbacks applied
in-process (as in test_processing.py); mails go to a real SMTP server
(aiosmtpd on a free port) or to the Maildir default.
"""

from __future__ import annotations

import asyncio
import json
import mailbox
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword
from structlog.testing import capture_logs

from tests.support import (
    Clock,
    create_payload,
    deposit,
    drain,
    make_settings,
    merchant_post,
    processing_post,
)
from worker.domain.models import Merchant
from worker.ingest.consumer import Ingest
from worker.mail.loop import (
    BACKOFF_CAP_SECONDS,
    LEASE_SECONDS,
    Mailer,
    run_mail_loop,
    send_due,
)
from worker.mail.transport import PermanentMailError, parse_smtp_url, recipient_address
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.mails import MailState, load_record, release_waiting
from worker.store.redis_server import RedisServer, free_port

Client = TestClient[Any, Any]
CUSTOMER = "buyer@example.test"
TITLE = "Green tea"
SMTP_USER = "shop"
SMTP_PASSWORD = "s3cr3t-Pa55"
# How long a test waits for the mail loop to deliver (seconds), and how often it looks.
LOOP_DEADLINE_SECONDS = 10.0
POLL_SECONDS = 0.02


# --------------------------------------------------------------------------- SMTP server


@dataclass
class Inbox:
    """aiosmtpd handler: keeps what it accepts; answers queued replies to DATA first."""

    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[Envelope] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        if self.replies:
            return self.replies.pop(0)
        assert isinstance(envelope.content, bytes)
        self.envelopes.append(envelope)
        message = message_from_bytes(envelope.content, policy=default_policy)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 2.0.0 OK"


def _authenticate(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    """Accept only SMTP_USER / SMTP_PASSWORD."""
    ok = isinstance(auth_data, LoginPassword) and auth_data == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)


@dataclass
class SmtpServer:
    inbox: Inbox
    port: int

    def url(self, user: str | None = None, password: str | None = None) -> str:
        credentials = f"{user}:{password}@" if user else ""
        return f"smtp://{credentials}127.0.0.1:{self.port}"


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """A real SMTP server on a free port that also accepts AUTH (without TLS, for tests)."""
    inbox = Inbox()
    port = free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        authenticator=_authenticate,
        auth_require_tls=False,
    )
    controller.start()
    yield SmtpServer(inbox, port)
    controller.stop()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def clock() -> Clock:
    """Days ahead, so every mail a timer made is already due."""
    return Clock(ahead=3 * 86_400)


MailerFactory = Callable[..., Mailer]


@pytest.fixture
def make_mailer(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    service: InvoiceService,
    smtp: SmtpServer,
    clock: Clock,
) -> MailerFactory:
    """Mailers sending to the test SMTP server (settings overridable), on the test clock."""

    def make(**options: Any) -> Mailer:
        settings = make_settings(
            redis_server.url, smtp_url=options.pop("smtp_url", smtp.url()), **options.pop("env", {})
        )
        options.setdefault("clock", clock)
        options.setdefault("rng", random.Random(7))
        return Mailer(redis, service, settings, **options)

    return make


# --------------------------------------------------------------------------- flows


async def new_invoice(
    client: Client, merchant: Merchant, foreign_id: str, **fields: Any
) -> dict[str, Any]:
    """A type-3 BTC invoice with the customer's e-mail, unless fields say otherwise."""
    defaults = {"title": TITLE, "sender_currency": "BTC", "email_user": CUSTOMER}
    payload = create_payload(foreign_id, **{**defaults, **fields})
    payload = {k: v for k, v in payload.items() if v is not None}
    status, body = await merchant_post(client, merchant, "/api/v2/invoices/create", payload)
    assert status == 200, body
    return body["data"]  # type: ignore[no-any-return]


async def pay(
    client: Client,
    ingest: Ingest,
    invoice: dict[str, Any],
    amount: str | Decimal,
    *,
    tx_id: int,
    status: str = "confirmed",
    compliance: str = "clear",
) -> None:
    """One processing callback for the invoice's address, applied at once."""
    update = deposit(
        invoice["address"],
        str(amount),
        tx_id=tx_id,
        status=status,
        compliance=compliance,
        observed_at=invoice["fixed_at"] + 1,
    )
    status_code, body = await processing_post(client, update)
    assert status_code == 200, body
    await drain(ingest)


async def cancel(client: Client, merchant: Merchant, foreign_id: str) -> None:
    path = f"/api/v2/invoices/{foreign_id}/cancel/"
    status, body = await merchant_post(client, merchant, path, {})
    assert status == 200, body


async def fire_timers_at(service: InvoiceService, at: int) -> None:
    """Run the timer sweep as if the clock read `at`."""
    original = service.clock
    service.clock = lambda: at
    try:
        assert await service.fire_due_timers() == 1
    finally:
        service.clock = original


@dataclass
class Flow:
    client: Client
    merchant: Merchant
    ingest: Ingest
    service: InvoiceService


Scenario = Callable[[Flow, str], Awaitable[tuple[dict[str, Any], str]]]


async def underpaid(flow: Flow, fid: str) -> tuple[dict[str, Any], str]:
    invoice = await new_invoice(flow.client, flow.merchant, fid)
    await pay(flow.client, flow.ingest, invoice, "0.0001", tx_id=1)
    return invoice, "0.00010000"


async def timer_underpaid(flow: Flow, fid: str) -> tuple[dict[str, Any], str]:
    invoice = await new_invoice(flow.client, flow.merchant, fid, type="good_until_expired")
    await pay(flow.client, flow.ingest, invoice, "0.0001", tx_id=1)
    await fire_timers_at(flow.service, invoice["release_at"] + 30)
    return invoice, "0.00010000"


async def overpaid(flow: Flow, fid: str) -> tuple[dict[str, Any], str]:
    invoice = await new_invoice(flow.client, flow.merchant, fid)
    total = Decimal(invoice["sender_amount"]) + Decimal("0.001")
    await pay(flow.client, flow.ingest, invoice, total, tx_id=1)
    return invoice, f"{total:.8f}"


async def late(flow: Flow, fid: str) -> tuple[dict[str, Any], str]:
    invoice = await new_invoice(flow.client, flow.merchant, fid)
    await cancel(flow.client, flow.merchant, fid)
    await pay(flow.client, flow.ingest, invoice, "0.5", tx_id=5)
    return invoice, "0.50000000"


async def processing_too_long(flow: Flow, fid: str) -> tuple[dict[str, Any], str]:
    invoice = await new_invoice(flow.client, flow.merchant, fid)
    await pay(
        flow.client, flow.ingest, invoice, invoice["sender_amount"], tx_id=1, status="not_confirmed"
    )
    await fire_timers_at(flow.service, invoice["fixed_at"] + 1 + 86_400 + 30)
    return invoice, invoice["sender_amount"]


async def compliance(flow: Flow, fid: str) -> tuple[dict[str, Any], str]:
    invoice = await new_invoice(flow.client, flow.merchant, fid)
    await pay(
        flow.client,
        flow.ingest,
        invoice,
        invoice["sender_amount"],
        tx_id=1,
        status="not_confirmed",
        compliance="flagged",
    )
    return invoice, invoice["sender_amount"]


async def cancelled(flow: Flow, fid: str) -> tuple[dict[str, Any], str]:
    invoice = await new_invoice(flow.client, flow.merchant, fid)
    await pay(flow.client, flow.ingest, invoice, "0.0001", tx_id=1, status="not_confirmed")
    await cancel(flow.client, flow.merchant, fid)
    return invoice, "0.00010000"


CASES: list[tuple[str, str, str, Scenario, str]] = [
    # cause, kind, subject prefix, flow, a phrase of the body's explanation
    ("underpaid", "payback_guideline", "Payback guideline: ", underpaid, "less than"),
    ("timer_underpaid", "payback_guideline", "Payback guideline: ", timer_underpaid, "ran out"),
    ("overpaid", "payback_guideline", "Payback guideline: ", overpaid, "0.00100000 BTC is due"),
    ("late:5", "payback_guideline", "Payback guideline: ", late, "0.50000000 BTC"),
    ("processing_too_long", "refund_claim", "Refund claim: ", processing_too_long, "in time"),
    ("compliance", "refund_claim", "Refund claim: ", compliance, "compliance"),
    ("cancel", "refund_claim", "Refund claim: ", cancelled, "cancelled"),
]


@pytest.fixture
def flow(client: Client, merchant: Merchant, ingest: Ingest, service: InvoiceService) -> Flow:
    return Flow(client, merchant, ingest, service)


def token_of(invoice: dict[str, Any]) -> str:
    return str(invoice["url"]).rsplit("/invoice/", 1)[1]


async def refund_token_of(service: InvoiceService, invoice: dict[str, Any]) -> str:
    """The refund page's token, issued with the invoice's first refund/payback e-mail."""
    stored = await service.store.get(invoice["id"])
    assert stored is not None and stored.invoice.refund_token is not None
    return stored.invoice.refund_token


def text_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert isinstance(part, EmailMessage)
    return str(part.get_content())


def html_of(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert isinstance(part, EmailMessage)
    return str(part.get_content())


async def record_of(redis: aioredis.Redis, invoice_id: int, cause: str) -> Any:
    raw = await redis.hget(keys.mails(invoice_id), cause)
    assert raw is not None
    return load_record(raw)


async def due_at(redis: aioredis.Redis, invoice_id: int, cause: str) -> float | None:
    return await redis.zscore(keys.mail_due_of(invoice_id), f"{invoice_id}:{cause}")  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    ("cause", "kind", "prefix", "scenario", "phrase"), CASES, ids=[c[0] for c in CASES]
)
async def test_each_cause_is_mailed_once_from_a_real_flow(
    flow: Flow,
    make_mailer: MailerFactory,
    smtp: SmtpServer,
    redis: aioredis.Redis,
    cause: str,
    kind: str,
    prefix: str,
    scenario: Scenario,
    phrase: str,
) -> None:
    """Every §4/§5 cause sends its e-mail: subject, amounts, refund link, Message-ID; once."""
    invoice, received = await scenario(flow, "order-1")
    mailer = make_mailer()
    assert await mailer.send_due() == 1
    assert await mailer.send_due() == 0

    [message] = smtp.inbox.messages
    assert message["Subject"] == prefix + TITLE
    assert message["To"] == CUSTOMER
    assert smtp.inbox.envelopes[0].rcpt_tos == [CUSTOMER]
    text = " ".join(text_of(message).split())
    assert f'"{TITLE}" (order order-1)' in text
    assert f"Expected: {invoice['sender_amount']} BTC" in text
    assert f"Received: {received} BTC" in text
    assert phrase in text
    # The refund link names the refund token, never the invoice's (spec §7).
    refund_url = f"http://coinvoice.test/refund/{await refund_token_of(flow.service, invoice)}"
    assert refund_url in text
    assert f'href="{refund_url}"' in html_of(message)
    assert token_of(invoice) not in text_of(message) + html_of(message)
    safe_cause = cause.replace(":", "-")
    assert re.fullmatch(
        rf"<{invoice['id']}\.{safe_cause}\.[0-9a-f]{{16}}@coinvoice>", message["Message-ID"]
    )

    record = await record_of(redis, invoice["id"], cause)
    assert (record.kind.value, record.state) == (kind, MailState.SENT)
    assert record.sent_at is not None
    assert record.message_id == message["Message-ID"]
    assert [a.outcome for a in record.attempts] == [MailState.SENT]
    assert await due_at(redis, invoice["id"], cause) is None


async def test_maildir_is_the_default_transport(
    flow: Flow,
    service: InvoiceService,
    redis: aioredis.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
    clock: Clock,
) -> None:
    """Without COINVOICE_SMTP_URL mails land in the Maildir (created with its parents)."""
    invoice, _ = await overpaid(flow, "order-md")
    folder = tmp_path / "spool" / "maildir"
    settings = make_settings(redis_server.url, maildir=folder)
    assert await send_due(redis, service, settings, clock=clock) == 1

    box = mailbox.Maildir(folder, create=False)
    [key] = box.keys()
    message = message_from_bytes(box.get_bytes(key), policy=default_policy)
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == f"Payback guideline: {TITLE}"
    assert f"/refund/{await refund_token_of(service, invoice)}" in text_of(message)
    assert "<html" in html_of(message)


async def test_title_cannot_inject_headers(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer
) -> None:
    """CR/LF in a merchant's title stays in the subject line; HTML in it is escaped."""
    title = "<b>Tea</b>\r\nBcc: victim@evil.test"
    invoice = await new_invoice(flow.client, flow.merchant, "inject", title=title)
    await pay(
        flow.client, flow.ingest, invoice, invoice["sender_amount"], tx_id=1, compliance="flagged"
    )
    assert await make_mailer().send_due() == 1

    [message] = smtp.inbox.messages
    assert message["Subject"] == "Refund claim: <b>Tea</b> Bcc: victim@evil.test"
    assert message["Bcc"] is None
    assert smtp.inbox.envelopes[0].rcpt_tos == [CUSTOMER]
    raw = smtp.inbox.envelopes[0].content
    assert isinstance(raw, bytes)
    assert b"\nBcc:" not in raw
    assert "&lt;b&gt;Tea&lt;/b&gt;" in html_of(message)
    assert "<b>Tea</b>" not in html_of(message)


# --------------------------------------------------------------------------- at most once


async def test_concurrent_passes_send_each_mail_once(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, redis: aioredis.Redis
) -> None:
    """Six passes of two workers at once: every mail goes out exactly once."""
    invoices = [(await underpaid(flow, f"order-{n}"))[0] for n in range(6)]
    first, second = make_mailer(batch=2), make_mailer(batch=2)
    sent = await asyncio.gather(*(m.send_due() for m in [first, second] * 3))
    assert sum(sent) == 6
    assert await first.send_due() + await second.send_due() == 0

    ids = sorted(m["Message-ID"] for m in smtp.inbox.messages)
    assert len(ids) == len(set(ids)) == 6
    for invoice in invoices:
        assert (await record_of(redis, invoice["id"], "underpaid")).state is MailState.SENT


async def test_a_dead_workers_mail_is_taken_over_after_its_lease(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, clock: Clock
) -> None:
    """A claimed mail is nobody else's until the lease ends; then one other worker sends it."""
    invoice, _ = await underpaid(flow, "order-lease")
    dead, survivor = make_mailer(), make_mailer()
    [taken] = await dead.claim()  # ... and the worker dies
    assert await survivor.send_due() == 0
    clock.advance(LEASE_SECONDS - 1)
    assert await survivor.send_due() == 0
    clock.advance(2)
    assert await survivor.send_due() == 1
    # The first worker wakes up late: it finds the mail sent and sends nothing.
    assert await dead.deliver(taken) is MailState.SENT
    assert len(smtp.inbox.messages) == 1
    assert taken == f"{invoice['id']}:underpaid"


class Crash(BaseException):
    """Stands for the process dying right after the server accepted the mail."""


async def test_a_send_that_died_before_recording_repeats_its_message_id(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, clock: Clock, redis: aioredis.Redis
) -> None:
    """At least once: resent after the lease, with the same Message-ID, so the copy shows."""
    invoice, _ = await underpaid(flow, "order-crash")
    crashing = make_mailer()
    real_send = crashing.transport.send

    async def send_then_die(*args: Any) -> None:
        await real_send(*args)
        raise Crash

    crashing.transport.send = send_then_die  # type: ignore[method-assign]
    with capture_logs() as logs:
        assert await crashing.send_due() == 0
    assert [e["event"] for e in logs] == ["mail_error"]
    assert (await record_of(redis, invoice["id"], "underpaid")).state is MailState.PENDING

    clock.advance(LEASE_SECONDS + 1)
    assert await make_mailer().send_due() == 1
    first, second = smtp.inbox.messages
    assert first["Message-ID"] == second["Message-ID"]


# --------------------------------------------------------------------------- failures


async def test_transient_refusal_is_retried_with_backoff(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, clock: Clock, redis: aioredis.Redis
) -> None:
    """451 first: retrying, due again after 15–30 s (jittered), then sent on the next try."""
    invoice, _ = await underpaid(flow, "order-451")
    smtp.inbox.replies.append("451 4.3.0 Try again later")
    mailer = make_mailer()
    with capture_logs() as logs:
        assert await mailer.send_due() == 0
    record = await record_of(redis, invoice["id"], "underpaid")
    assert record.state is MailState.RETRYING
    [attempt] = record.attempts
    assert attempt.error is not None and attempt.error.startswith("451")
    due = await due_at(redis, invoice["id"], "underpaid")
    assert due is not None and clock.now + 15 <= due <= clock.now + 30
    [event] = logs
    assert (event["event"], event["log_level"], event["attempt"], event["outcome"]) == (
        "mail_retrying",
        "warning",
        1,
        "retrying",
    )
    assert {"invoice_id", "foreign_id", "merchant", "cause", "kind"} <= event.keys()

    assert await mailer.send_due() == 0  # not due yet
    clock.now = due
    assert await mailer.send_due() == 1
    record = await record_of(redis, invoice["id"], "underpaid")
    assert record.state is MailState.SENT
    assert [a.outcome for a in record.attempts] == [MailState.RETRYING, MailState.SENT]
    assert len(smtp.inbox.messages) == 1


async def test_permanent_refusal_marks_the_mail_failed(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, clock: Clock, redis: aioredis.Redis
) -> None:
    """554: failed at once, off the schedule, logged as an error; never tried again."""
    invoice, _ = await underpaid(flow, "order-554")
    smtp.inbox.replies.append("554 5.7.1 Message refused")
    mailer = make_mailer()
    with capture_logs() as logs:
        assert await mailer.send_due() == 0
    record = await record_of(redis, invoice["id"], "underpaid")
    assert record.state is MailState.FAILED
    assert record.attempts[0].error is not None and record.attempts[0].error.startswith("554")
    assert await due_at(redis, invoice["id"], "underpaid") is None
    [event] = logs
    assert (event["event"], event["log_level"], event["outcome"]) == (
        "mail_failed",
        "error",
        "failed",
    )
    clock.advance(BACKOFF_CAP_SECONDS * 10)
    assert await mailer.send_due() == 0
    assert smtp.inbox.messages == []


async def test_mail_fails_after_the_last_attempt(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, clock: Clock, redis: aioredis.Redis
) -> None:
    """Transient failures end as failed after max_attempts tries."""
    invoice, _ = await underpaid(flow, "order-tries")
    smtp.inbox.replies.extend(["452 4.3.1 Insufficient storage"] * 3)
    mailer = make_mailer(max_attempts=3)
    for _ in range(3):
        assert await mailer.send_due() == 0
        clock.advance(BACKOFF_CAP_SECONDS)
    record = await record_of(redis, invoice["id"], "underpaid")
    assert record.state is MailState.FAILED
    assert [a.outcome for a in record.attempts] == [
        MailState.RETRYING,
        MailState.RETRYING,
        MailState.FAILED,
    ]
    assert await due_at(redis, invoice["id"], "underpaid") is None


async def test_unreachable_server_is_a_transient_failure(
    flow: Flow, make_mailer: MailerFactory, redis: aioredis.Redis
) -> None:
    """Connection refused: retrying, not failed."""
    invoice, _ = await underpaid(flow, "order-down")
    mailer = make_mailer(smtp_url=f"smtp://127.0.0.1:{free_port()}")
    assert await mailer.send_due() == 0
    record = await record_of(redis, invoice["id"], "underpaid")
    assert record.state is MailState.RETRYING


# --------------------------------------------------------------------------- no address yet


async def plant_mail(redis: aioredis.Redis, invoice_id: int, cause: str) -> None:
    """Record a due mail exactly as commit.lua does (HSETNX the record, ZADD the member)."""
    record = {
        "kind": "refund_claim",
        "cause": cause,
        "currency": "BTC",
        "expected": "0.00300000",
        "received": "0.00100000",
        "created_at": int(time.time()),
    }
    await redis.hsetnx(keys.mails(invoice_id), cause, json.dumps(record))
    await redis.zadd(keys.mail_due_of(invoice_id), {f"{invoice_id}:{cause}": time.time()})


async def confirm_email(client: Client, token: str, email: str) -> tuple[int, Any]:
    response = await client.post(f"/api/v2/public/invoices/{token}/confirm", json={"email": email})
    return response.status, await response.json()


async def test_paid_invoice_without_address_parks_its_mail(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, redis: aioredis.Redis
) -> None:
    """A type-3 invoice paid before the customer gave an e-mail: the mail waits, off schedule."""
    invoice = await new_invoice(flow.client, flow.merchant, "no-mail", email_user=None)
    await pay(flow.client, flow.ingest, invoice, "0.0001", tx_id=1)
    with capture_logs() as logs:
        assert await make_mailer().send_due() == 0
    record = await record_of(redis, invoice["id"], "underpaid")
    assert record.state is MailState.WAITING_FOR_ADDRESS
    assert record.attempts == ()
    assert await due_at(redis, invoice["id"], "underpaid") is None
    assert [e["event"] for e in logs] == ["mail_waiting_for_address"]
    assert smtp.inbox.messages == []


async def test_customer_confirm_releases_parked_mail(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, redis: aioredis.Redis
) -> None:
    """The confirm that records an e-mail makes parked mails due; they go to that address."""
    invoice = await new_invoice(flow.client, flow.merchant, "later", email_user=None)
    await plant_mail(redis, invoice["id"], "cancel")
    mailer = make_mailer()
    assert await mailer.send_due() == 0
    assert (await record_of(redis, invoice["id"], "cancel")).state is MailState.WAITING_FOR_ADDRESS

    status, body = await confirm_email(flow.client, token_of(invoice), "late@example.test")
    assert status == 200, body
    assert (await record_of(redis, invoice["id"], "cancel")).state is MailState.PENDING
    assert await due_at(redis, invoice["id"], "cancel") is not None
    assert await mailer.send_due() == 1
    assert smtp.inbox.envelopes[0].rcpt_tos == ["late@example.test"]
    assert await release_waiting(redis, invoice["id"]) == 0  # nothing left waiting


async def test_confirm_on_a_final_invoice_releases_its_parked_mail(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, redis: aioredis.Redis
) -> None:
    """End to end: paid without an address, then the customer gives one; the mail goes out."""
    invoice = await new_invoice(flow.client, flow.merchant, "final", email_user=None)
    await pay(flow.client, flow.ingest, invoice, "0.0001", tx_id=1)
    mailer = make_mailer()
    assert await mailer.send_due() == 0
    status, body = await confirm_email(flow.client, token_of(invoice), "late@example.test")
    assert status == 200, body
    assert await mailer.send_due() == 1


async def test_parking_loses_to_a_confirm_in_between(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, redis: aioredis.Redis
) -> None:
    """An address given between the mailer's read and its park is not missed: the mail goes."""
    invoice = await new_invoice(flow.client, flow.merchant, "race", email_user=None)
    await plant_mail(redis, invoice["id"], "cancel")
    mailer = make_mailer()
    store = mailer.service.store
    real_get = store.get
    confirmed = False

    async def get_then_confirm(invoice_id: int) -> Any:
        nonlocal confirmed
        stored = await real_get(invoice_id)
        if not confirmed:
            confirmed = True
            await mailer.service.confirm(token_of(invoice), None, "race@example.test")
        return stored

    store.get = get_then_confirm  # type: ignore[method-assign]
    try:
        assert await mailer.send_due() == 1
    finally:
        store.get = real_get  # type: ignore[method-assign]
    assert smtp.inbox.envelopes[0].rcpt_tos == ["race@example.test"]


# --------------------------------------------------------------------------- secrets, loop, config


async def test_smtp_password_and_body_are_never_logged(
    flow: Flow, make_mailer: MailerFactory, smtp: SmtpServer, clock: Clock
) -> None:
    """Log events of a send with AUTH (right and wrong password) carry no secret or body."""
    good, _ = await underpaid(flow, "order-auth")
    with capture_logs() as logs:
        wrong = make_mailer(smtp_url=smtp.url(SMTP_USER, "wr0ng-Pa55"))
        assert await wrong.send_due() == 0
        clock.advance(BACKOFF_CAP_SECONDS)
        right = make_mailer(smtp_url=smtp.url(SMTP_USER, SMTP_PASSWORD))
        assert await right.send_due() == 1
    assert [e["event"] for e in logs] == ["mail_retrying", "mail_sent"]
    assert logs[0]["error"].startswith("535")
    text = repr(logs)
    for secret in (SMTP_PASSWORD, "wr0ng-Pa55", token_of(good), "Expected:", CUSTOMER):
        assert secret not in text
    assert SMTP_PASSWORD not in repr(right.transport)
    assert len(smtp.inbox.messages) == 1


async def test_mail_loop_sends_and_stops(
    flow: Flow,
    service: InvoiceService,
    smtp: SmtpServer,
    redis: aioredis.Redis,
    redis_server: RedisServer,
) -> None:
    """run_mail_loop sends what becomes due while it runs and returns when stopped."""
    settings = make_settings(redis_server.url, smtp_url=smtp.url())
    stop = asyncio.Event()
    loop = asyncio.create_task(run_mail_loop(redis, service, settings, stop=stop))
    try:
        await underpaid(flow, "order-loop")
        deadline = time.monotonic() + LOOP_DEADLINE_SECONDS
        while not smtp.inbox.messages:
            assert time.monotonic() < deadline, "the loop did not send the mail"
            await asyncio.sleep(POLL_SECONDS)
    finally:
        stop.set()
        await asyncio.wait_for(loop, LOOP_DEADLINE_SECONDS)
    assert len(smtp.inbox.messages) == 1


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.test", ("mail.test", 25, False, None, None)),
        ("smtp://u%40x:p%3Aw@mail.test:2525", ("mail.test", 2525, False, None, "u@x")),
        ("smtp://mail.test?starttls=1", ("mail.test", 587, False, True, None)),
        ("smtp://mail.test:25?starttls=0", ("mail.test", 25, False, False, None)),
        ("smtps://mail.test", ("mail.test", 465, True, False, None)),
    ],
)
def test_smtp_url_is_parsed(url: str, expected: tuple[Any, ...]) -> None:
    """smtp:// and smtps:// URLs give host, port, TLS mode and the decoded user."""
    config = parse_smtp_url(url)
    assert (config.host, config.port, config.use_tls, config.start_tls, config.username) == expected


@pytest.mark.parametrize(
    "url",
    ["http://u:hunter2@mail.test", "smtp://u:hunter2@", "smtps://u:hunter2@mail.test?starttls=1"],
)
def test_bad_smtp_url_is_refused_without_echoing_it(url: str) -> None:
    """A wrong COINVOICE_SMTP_URL fails with a message that does not repeat the password."""
    with pytest.raises(ValueError, match="COINVOICE_SMTP_URL") as excinfo:
        parse_smtp_url(url)
    assert "hunter2" not in str(excinfo.value)


def test_recipient_must_be_one_plain_address() -> None:
    """A list of addresses or a line break in the invoice's e-mail is a permanent failure."""
    assert recipient_address(CUSTOMER) == CUSTOMER
    for bad in ("a@x.test, b@y.test", "a@x.test\r\nBcc: b@y.test", "Name <a@x.test>"):
        with pytest.raises(PermanentMailError):
            recipient_address(bad)
