"""Signatures already used: the nonce cache behind opt-in replay protection.

A timestamped merchant request (worker/domain/signing.py) is accepted while
its timestamp lies within the window; within that time its signature is kept
here, so the same signed bytes are accepted once. The key expires when the
timestamp leaves the window, after which the timestamp check refuses it, so
the cache holds at most one window of a merchant's requests.
"""

from __future__ import annotations

import hashlib

from redis.asyncio import Redis

from worker.store import keys


async def first_use(redis: Redis, merchant_key: str, signature: str, ttl_seconds: int) -> bool:
    """Record a verified signature; False if it was already used (a replay).

    `signature` is the hex HMAC in any case: it is lowered first, so a replay
    in capitals is the same nonce. Stored as a SHA-256 prefix (128 bits):
    shorter keys, and no signature lies in Redis.
    """
    digest = hashlib.sha256(signature.strip().lower().encode("ascii", "replace")).hexdigest()[:32]
    created = await redis.set(
        keys.seen_signature(merchant_key, digest), b"1", nx=True, ex=max(1, ttl_seconds)
    )
    return bool(created)
