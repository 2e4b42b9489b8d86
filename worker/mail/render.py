"""Rendering customer e-mails (spec §10) from worker/mail/templates/.

Titles come from merchants: the subject is kept to one line (no header
injection), and the HTML alternative is autoescaped.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate
from functools import cache
from typing import Any

import jinja2

from worker.domain.models import EmailKind, Invoice
from worker.domain.money import fmt8
from worker.store.mails import MailRecord

SUBJECT_PREFIX = {
    EmailKind.PAYBACK_GUIDELINE: "Payback guideline: ",
    EmailKind.REFUND_CLAIM: "Refund claim: ",
}


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str
    message_id: str


def one_line(text: str) -> str:
    """Merchant text made safe for a header: no CR, LF or other line breaks or controls."""
    cleaned = "".join(" " if unicodedata.category(c) in {"Cc", "Zl", "Zp"} else c for c in text)
    return " ".join(cleaned.split())


def message_id(invoice: Invoice, cause: str) -> str:
    """``<{id}.{cause}.{hash}@coinvoice>``: the same for every send of one mail.

    The hash of the (secret, 192-bit) token makes it unique across deployments
    whose invoice ids overlap, without revealing the token.
    """
    digest = hashlib.sha256(f"{invoice.token}\0{cause}".encode()).hexdigest()[:16]
    safe_cause = re.sub(r"[^A-Za-z0-9_-]", "-", cause)
    return f"<{invoice.id}.{safe_cause}.{digest}@coinvoice>"


@cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("worker.mail", "templates"),
        # HTML escapes merchant text (titles); the plain-text part must not.
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def refund_url(invoice: Invoice, base_url: str) -> str | None:
    """The refund page of the invoice (spec §7), named by its refund token, never its token.

    None only for an invoice whose mails were recorded before refund tokens
    existed: such a mail asks the customer to contact the shop instead.
    """
    if invoice.refund_token is None:
        return None
    return f"{base_url.rstrip('/')}/refund/{invoice.refund_token}"


def render(invoice: Invoice, record: MailRecord, base_url: str) -> Rendered:
    """Subject, plain text and HTML of one mail (spec §10)."""
    subject = one_line(SUBJECT_PREFIX[record.kind] + invoice.title)
    excess = Decimal(record.received) - Decimal(record.expected)
    late = invoice.tx(int(record.cause[5:])) if record.cause.startswith("late:") else None
    context: dict[str, Any] = {
        "subject": subject,
        "cause": record.cause,
        "title": one_line(invoice.title),
        "foreign_id": invoice.foreign_id,
        "currency": record.currency,
        "expected": record.expected,
        "received": record.received,
        "excess": fmt8(excess) if excess > 0 else None,
        "late_amount": fmt8(late.amount) if late is not None else None,
        "refund_url": refund_url(invoice, base_url),
    }
    env = _templates()
    return Rendered(
        subject=subject,
        text=env.get_template(f"{record.kind.value}.txt").render(context),
        html=env.get_template(f"{record.kind.value}.html").render(context),
        message_id=message_id(invoice, record.cause),
    )


def build_message(rendered: Rendered, sender: str, recipient: str, now: float) -> EmailMessage:
    """A MIME message: plain text with an HTML alternative."""
    message = EmailMessage(policy=SMTP)
    message["Subject"] = rendered.subject
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = formatdate(now, usegmt=True)
    message["Message-ID"] = rendered.message_id
    # RFC 3834: auto-responders must not answer this message.
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message
