"""AlphaPo request signatures: lowercase hex HMAC-SHA512 of the exact raw body.

The same scheme authenticates merchant requests, processing callbacks and
the callbacks coinvoice sends to merchants (spec §6, §8, §9).
"""

from __future__ import annotations

import hashlib
import hmac


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
