"""Hostile JSON (issue 15 item 4): deeply nested bodies are 400 `bad_content_format` on
every JSON endpoint, signed or not — never a 500 with a traceback."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from receiver.api.requests import MAX_JSON_DEPTH
from tests.support import PROCESSING_KEY, PROCESSING_SECRET, create_payload, signed_headers
from tests.support import merchant_post as post_signed
from worker.domain.models import Merchant
from worker.store.streams import stream_backlog

Client = TestClient[Any, Any]
BAD_CONTENT = {"error": "Bad content format", "code": "bad_content_format"}

# Under the 64 KiB body limit, far past the decoder's recursion limit.
DEEP_BODIES = {
    "arrays": b"[" * 30_000 + b"]" * 30_000,
    "objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "inside_a_field": b'{"foreign_id":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    "just_over_the_limit": b'{"foreign_id":' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}",
}

MERCHANT_PATHS = [
    "/api/v2/invoices/create",
    "/api/v2/invoices/x/cancel/",
    "/api/v2/invoices/status",
    "/api/v2/invoices/callbacks",
    "/api/v2/invoices/callbacks/redeliver",
    "/api/v2/accounts/list",
    "/api/v2/currencies/list",
    "/api/v2/currencies/rates",
]


async def post_raw(client: Client, path: str, body: bytes, headers: dict[str, str]) -> Any:
    response = await client.post(path, data=body, headers=headers)
    return response.status, await response.json()


@pytest.mark.parametrize("shape", DEEP_BODIES)
async def test_deep_json_is_bad_content_on_every_endpoint(
    client: Client, merchant: Merchant, redis: aioredis.Redis, shape: str
) -> None:
    """Signed merchant requests, processing callbacks and the unauthenticated public
    confirm all answer 400 bad_content_format; nothing is queued, nothing logged as error."""
    body = DEEP_BODIES[shape]
    status, created = await post_signed(
        client, merchant, "/api/v2/invoices/create", create_payload("deep")
    )
    assert status == 200
    token = created["data"]["url"].rsplit("/", 1)[1]
    json_type = {"Content-Type": "application/json"}
    calls = [(path, signed_headers(merchant.key, merchant.secret, body)) for path in MERCHANT_PATHS]
    calls.append(
        ("/api/v2/processing/callbacks", signed_headers(PROCESSING_KEY, PROCESSING_SECRET, body))
    )
    calls.append((f"/api/v2/public/invoices/{token}/confirm", json_type))
    with capture_logs() as logs:
        for path, headers in calls:
            assert await post_raw(client, path, body, headers) == (400, BAD_CONTENT), path
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert await stream_backlog(redis) == 0  # every partition of the updates stream


async def test_json_at_the_depth_limit_is_read(client: Client, merchant: Merchant) -> None:
    """MAX_JSON_DEPTH levels are still JSON: the answer is about the fields, not the format."""
    inner = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    body = f'{{"foreign_id": "x", "extra": {inner}}}'.encode()
    headers = signed_headers(merchant.key, merchant.secret, body)
    status, answer = await post_raw(client, "/api/v2/invoices/status", body, headers)
    assert (status, answer["errors"]["code"]) == (404, "not_found")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_is_bad_content(
    client: Client, merchant: Merchant, encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Content-Encoding whose bytes do not decode is 400 bad_content_format, not a 500,
    and nothing is logged as an error."""
    body = b"this is not compressed"
    headers = {**signed_headers(merchant.key, merchant.secret, body), "Content-Encoding": encoding}
    with capture_logs() as logs:
        for path in ("/api/v2/invoices/status", "/api/v2/public/invoices/x/confirm"):
            assert await post_raw(client, path, body, headers) == (400, BAD_CONTENT), path
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
