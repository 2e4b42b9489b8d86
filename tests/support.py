"""Helpers shared by the integration tests: settings, signed requests, a merchant."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient

from worker.config import Settings
from worker.models import Merchant
from worker.signing import sign

PROCESSING_KEY = "test-processing-key"
PROCESSING_SECRET = "test-processing-secret"


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    """Settings for a test: our Redis, no rate limits unless asked, private callbacks allowed."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "public_url": "http://coinvoice.test",
        "rate_limit_merchant": 0,
        "rate_limit_public": 0,
        "allow_private_callbacks": True,
        "processing_key": PROCESSING_KEY,
        "processing_secret": PROCESSING_SECRET,
        "log_format": "json",
    }
    values.update(overrides)
    return Settings(**values)


def signed_headers(key: str, secret: str, body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Processing-Key": key,
        "X-Processing-Signature": sign(secret, body),
    }


async def merchant_post(
    client: TestClient[Any, Any], merchant: Merchant, path: str, payload: object
) -> tuple[int, Any]:
    """POST a signed merchant request; return (status, decoded JSON)."""
    body = json.dumps(payload).encode()
    response = await client.post(
        path, data=body, headers=signed_headers(merchant.key, merchant.secret, body)
    )
    return response.status, await response.json()


def create_payload(foreign_id: str, **fields: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "timer": True,
        "title": "Tea",
        "currency": "EUR",
        "amount": "106.75",
        "foreign_id": foreign_id,
    }
    payload.update(fields)
    return payload
