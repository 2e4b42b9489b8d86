"""Signing merchant callbacks: AlphaPo headers, and optionally Standard Webhooks.

Both signatures cover the exact bytes sent. The Standard Webhooks scheme
(https://www.standardwebhooks.com): `webhook-signature: v1,<base64 HMAC-SHA256
of "{id}.{timestamp}.{body}">` keyed with the base64 secret after `whsec_`;
`webhook-id` is stable across retries of one snapshot.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from worker.domain.models import Merchant
from worker.domain.signing import sign


def webhook_id(invoice_id: int, sequence: int) -> str:
    """One id per snapshot, the same for every retry of it."""
    return f"msg_{invoice_id}_{sequence}"


def standard_webhooks_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(
    merchant: Merchant, body: bytes, invoice_id: int, sequence: int, now: int
) -> dict[str, str]:
    """The headers of one callback request."""
    result = {
        "Content-Type": "application/json",
        "User-Agent": "coinvoice-callbacks/1",
        "X-Processing-Key": merchant.key,
        "X-Processing-Signature": sign(merchant.secret, body),
    }
    if merchant.standard_webhooks_secret:
        msg_id = webhook_id(invoice_id, sequence)
        result |= {
            "webhook-id": msg_id,
            "webhook-timestamp": str(now),
            "webhook-signature": standard_webhooks_signature(
                merchant.standard_webhooks_secret, msg_id, now, body
            ),
        }
    return result
