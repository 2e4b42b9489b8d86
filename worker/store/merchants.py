"""Merchant accounts: keys, secrets, callback URL and commercial terms."""

from __future__ import annotations

import base64
import secrets
from decimal import Decimal

from redis.asyncio import Redis

from worker.domain.models import Merchant
from worker.store import keys
from worker.store.codec import dump_merchant, load_merchant
from worker.store.connection import acknowledged


class MerchantExists(Exception):
    """A merchant with this key is already registered."""


def new_key() -> str:
    """A public merchant key (sent in X-Processing-Key)."""
    return secrets.token_hex(16)


def new_secret() -> str:
    """A signing secret: 256 bits."""
    return secrets.token_urlsafe(32)


def new_standard_webhooks_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class MerchantStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def add(self, merchant: Merchant) -> None:
        """Register a merchant; refuse a key that exists (keys are never reassigned)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.merchant(merchant.key), dump_merchant(merchant), nx=True)
            # Harmless when the key exists: that merchant is in the set already.
            pipe.sadd(keys.MERCHANTS, merchant.key)
            created, _ = await acknowledged(self.redis, pipe)
        if not created:
            raise MerchantExists(merchant.key)

    async def replace(self, merchant: Merchant) -> None:
        """Store a changed record of an existing merchant (same key)."""
        if not await self.redis.set(keys.merchant(merchant.key), dump_merchant(merchant), xx=True):
            raise LookupError(f"no merchant {merchant.key}")

    async def get(self, key: str) -> Merchant | None:
        data = await self.redis.get(keys.merchant(key))
        return None if data is None else load_merchant(data)


def make_merchant(
    name: str,
    callback_url: str,
    *,
    key: str | None = None,
    secret: str | None = None,
    fee_percent: Decimal = Decimal(1),
    underpayment_tolerance_percent: Decimal = Decimal(0),
    standard_webhooks: bool = False,
    require_timestamp: bool = False,
) -> Merchant:
    """A merchant with generated key and secrets where none are given."""
    return Merchant(
        key=key or new_key(),
        name=name,
        secret=secret or new_secret(),
        callback_url=callback_url,
        fee_percent=fee_percent,
        underpayment_tolerance_percent=underpayment_tolerance_percent,
        standard_webhooks_secret=new_standard_webhooks_secret() if standard_webhooks else None,
        require_timestamp=require_timestamp,
    )


def merchant_to_json(merchant: Merchant) -> bytes:
    """A merchant as JSON, for a file kept outside Redis (the demo merchant of `up`)."""
    return dump_merchant(merchant)


def merchant_from_json(text: str | bytes) -> Merchant:
    """The merchant `merchant_to_json` wrote."""
    return load_merchant(text)
