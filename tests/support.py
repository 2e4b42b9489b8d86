"""Helpers shared by the integration tests: settings, signed requests, a merchant."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp.test_utils import TestClient

from receiver.commands.simulate import deposit_body
from worker.config import Settings
from worker.domain.models import Merchant
from worker.domain.signing import sign
from worker.ingest.consumer import Ingest, ensure_group
from worker.store import keys
from worker.store.ledger import post_ledger
from worker.store.scripts import Scripts

T = TypeVar("T")

# What the process tests observed, one JSON line each, for closing notes and post-mortems.
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

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


def deposit(
    address: str,
    amount: str,
    *,
    tx_id: int = 1,
    currency: str = "BTC",
    status: str = "not_confirmed",
    confirmations: int = 0,
    compliance: str = "clear",
    observed_at: int | None = None,
    txid: str | None = None,
) -> dict[str, Any]:
    """A §8 processing callback body for one transaction (what `coinvoice simulate` sends)."""
    return deposit_body(
        tx_id=tx_id,
        currency=currency,
        address=address,
        amount=amount,
        txid=txid or f"{tx_id:064x}",
        status=status,
        confirmations=confirmations,
        compliance=compliance,
        observed_at=observed_at,
    )


async def processing_post(client: TestClient[Any, Any], payload: object) -> tuple[int, Any]:
    """POST a processing callback signed with the test processing key pair."""
    body = json.dumps(payload).encode()
    response = await client.post(
        "/api/v2/processing/callbacks",
        data=body,
        headers=signed_headers(PROCESSING_KEY, PROCESSING_SECRET, body),
    )
    return response.status, await response.json()


async def drain(ingest: Ingest) -> int:
    """Apply everything queued in every partition with this consumer, and post the ledger
    entries it committed to the balances; return entries processed."""
    await ensure_group(ingest.redis)
    total = 0
    for partition in range(keys.partitions()):
        while True:
            response = await ingest.redis.xreadgroup(
                keys.UPDATES_GROUP,
                ingest.consumer,
                {keys.updates(partition): ">"},
                count=ingest.batch,
            )
            entries = [entry for _, batch in response for entry in batch]
            if not entries:
                break
            await ingest.process(partition, entries)
            total += len(entries)
    await post_all(ingest.redis)
    return total


async def post_all(redis: Any) -> None:
    """Post every committed ledger entry to the balances (what the workers' ledger loop does)."""
    while await post_ledger(redis, Scripts(redis)):
        pass


async def eventually(
    probe: Callable[[], Awaitable[T]], expect: T, seconds: float = 10.0, every: float = 0.1
) -> None:
    """Poll `probe` until it returns `expect`: for state another process changes."""
    async with asyncio.timeout(seconds):
        while await probe() != expect:  # noqa: ASYNC110 - another process changes it
            await asyncio.sleep(every)


class Clock:
    """A clock a test moves forward instead of sleeping through retry delays and timers.

    It starts `ahead` seconds past the wall clock, so what the test commits
    (stamped with the wall clock) is already due for it.
    """

    def __init__(self, ahead: float = 5.0) -> None:
        self.now = time.time() + ahead

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def record_artifact(file: str, test: str, observed: dict[str, Any]) -> None:
    """Append what a run observed to test-artifacts/{file}.jsonl."""
    ARTIFACTS.mkdir(exist_ok=True)
    with (ARTIFACTS / f"{file}.jsonl").open("a") as out:
        out.write(json.dumps({"test": test, **observed}) + "\n")
