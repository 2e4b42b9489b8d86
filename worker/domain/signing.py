"""AlphaPo request signatures: lowercase hex HMAC-SHA512 of the exact raw body.

The same scheme authenticates merchant requests, processing callbacks and
the callbacks coinvoice sends to merchants (spec §6, §8, §9).

A merchant that opted in to replay protection (`merchant add
--require-timestamp`) signs `{timestamp}.{body}` instead, with the unix
seconds it sends in `X-Processing-Timestamp`: the timestamp is then inside
the MAC, so it cannot be changed to make an old request look new.
"""

from __future__ import annotations

import hashlib
import hmac

TIMESTAMP_HEADER = "X-Processing-Timestamp"


def timestamped_message(timestamp: str, body: bytes) -> bytes:
    """What an opted-in merchant signs: the timestamp header's value, a dot, the raw body."""
    return timestamp.encode("ascii") + b"." + body


def sign_timestamped(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Processing-Signature` of a request sent with `X-Processing-Timestamp: timestamp`."""
    return sign(secret, timestamped_message(timestamp, body))


def sign(secret: str, body: bytes) -> str:
    """The `X-Processing-Signature` value for `body`."""
    return hmac.new(secret.encode(), body, hashlib.sha512).hexdigest()


def verify(secret: str, body: bytes, signature: str | None) -> bool:
    """Constant-time check of a signature header against the raw body."""
    if not signature:
        return False
    expected = sign(secret, body).encode()
    # Compare bytes of equal meaning: hex is case-insensitive, our form is lowercase.
    return hmac.compare_digest(expected, signature.strip().lower().encode("ascii", "replace"))
