"""Replay protection for merchant requests, opt-in per merchant (issue 15 item 3).

AlphaPo signs only the body, so a captured signed request can be sent again
forever. A merchant added with `--require-timestamp` signs
`{X-Processing-Timestamp}.{body}` instead; a timestamp outside the window is
refused, and a signature is accepted once.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import create_payload, signed_headers
from worker.domain.models import Merchant
from worker.domain.signing import TIMESTAMP_HEADER, sign, sign_timestamped
from worker.store.merchants import MerchantStore, make_merchant

Client = TestClient[Any, Any]

BAD_TIMESTAMP = {"error": "Bad timestamp header", "code": "bad_header_timestamp"}
BAD_SIGNATURE = {"error": "Bad signature header", "code": "bad_header_signature"}
REPLAYED = {"error": "Request already received", "code": "replayed_request"}
WINDOW = 300  # COINVOICE_REPLAY_WINDOW_SECONDS default


@pytest.fixture
async def strict(redis: aioredis.Redis) -> Merchant:
    """A merchant that opted in to timestamped signatures."""
    created = make_merchant("Strict shop", "http://127.0.0.1:9/cb", require_timestamp=True)
    await MerchantStore(redis).add(created)
    return created


def timestamped(merchant: Merchant, body: bytes, at: int | None = None) -> dict[str, str]:
    """Headers of a request signed the opt-in way, at `at` (default: now)."""
    stamp = str(int(time.time()) if at is None else at)
    return {
        "Content-Type": "application/json",
        "X-Processing-Key": merchant.key,
        TIMESTAMP_HEADER: stamp,
        "X-Processing-Signature": sign_timestamped(merchant.secret, stamp, body),
    }


async def post(client: Client, path: str, body: bytes, headers: dict[str, str]) -> Any:
    response = await client.post(path, data=body, headers=headers)
    return response.status, await response.json()


def test_timestamped_signature_is_the_mac_of_timestamp_dot_body() -> None:
    """The documented scheme: HMAC-SHA512(secret, "{timestamp}.{body}"), lowercase hex."""
    body = b'{"foreign_id":"123456"}'
    assert sign_timestamped("AbCdEfG123456", "1795700000", body) == sign(
        "AbCdEfG123456", b"1795700000." + body
    )


async def test_default_merchant_stays_alphapo_compatible(
    client: Client, merchant: Merchant
) -> None:
    """Without the opt-in the body-only signature works, a timestamp header is ignored, and
    the same signed request is accepted again (AlphaPo behaviour)."""
    body = json.dumps(create_payload("compat")).encode()
    headers = {**signed_headers(merchant.key, merchant.secret, body), TIMESTAMP_HEADER: "1"}
    assert (await post(client, "/api/v2/invoices/create", body, headers))[0] == 200
    status_body = b'{"foreign_id":"compat"}'
    headers = signed_headers(merchant.key, merchant.secret, status_body)
    for _ in range(2):
        assert (await post(client, "/api/v2/invoices/status", status_body, headers))[0] == 200


async def test_opted_in_merchant_is_accepted_once_per_signature(
    client: Client, strict: Merchant
) -> None:
    """A timestamped, signed request passes; the very same bytes again are a replay (403)."""
    body = json.dumps(create_payload("once")).encode()
    headers = timestamped(strict, body)
    status, answer = await post(client, "/api/v2/invoices/create", body, headers)
    assert status == 200, answer
    assert await post(client, "/api/v2/invoices/create", body, headers) == (403, REPLAYED)
    # A deliberate repeat is signed again with a new timestamp.
    status_body = b'{"foreign_id":"once"}'
    now = int(time.time())
    for at in (now, now + 1):
        status, answer = await post(
            client, "/api/v2/invoices/status", status_body, timestamped(strict, status_body, at)
        )
        assert status == 200, answer


async def test_captured_cancel_cannot_cancel_another_invoice(
    client: Client, strict: Merchant
) -> None:
    """The issue's attack: a signed `{}` replayed to another invoice's cancel URL is refused."""
    for fid in ("a", "b"):
        body = json.dumps(create_payload(fid)).encode()
        assert (await post(client, "/api/v2/invoices/create", body, timestamped(strict, body)))[
            0
        ] == 200
    captured = timestamped(strict, b"{}")
    assert (await post(client, "/api/v2/invoices/a/cancel/", b"{}", captured))[0] == 200
    assert await post(client, "/api/v2/invoices/b/cancel/", b"{}", captured) == (403, REPLAYED)
    status_body = b'{"foreign_id":"b"}'
    status, answer = await post(
        client, "/api/v2/invoices/status", status_body, timestamped(strict, status_body)
    )
    assert (status, answer["data"]["status"]) == (200, "pending")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("body-only signature", BAD_TIMESTAMP),
        ("timestamp not in the MAC", BAD_SIGNATURE),
        ("malformed timestamp", BAD_TIMESTAMP),
        ("too old", BAD_TIMESTAMP),
        ("too far ahead", BAD_TIMESTAMP),
        ("another timestamp than signed", BAD_SIGNATURE),
    ],
)
async def test_opted_in_merchant_refusals(
    client: Client, strict: Merchant, case: str, expected: dict[str, str]
) -> None:
    """Every way a timestamped request can be wrong is a 403 with its own clear code."""
    body = b'{"foreign_id":"nothing"}'
    now = int(time.time())
    headers = timestamped(strict, body, now)
    if case == "body-only signature":
        headers = signed_headers(strict.key, strict.secret, body)
    elif case == "timestamp not in the MAC":
        headers["X-Processing-Signature"] = sign(strict.secret, body)
    elif case == "malformed timestamp":
        headers[TIMESTAMP_HEADER] = "1.5e9"
    elif case == "too old":
        headers = timestamped(strict, body, now - WINDOW - 5)
    elif case == "too far ahead":
        headers = timestamped(strict, body, now + WINDOW + 5)
    elif case == "another timestamp than signed":
        headers[TIMESTAMP_HEADER] = str(now + 1)
    assert await post(client, "/api/v2/invoices/status", body, headers) == (403, expected)


async def test_refused_request_does_not_burn_its_signature(
    client: Client, strict: Merchant, redis: aioredis.Redis
) -> None:
    """Only a verified, fresh request is remembered: a forgery leaves no nonce behind."""
    body = b'{"foreign_id":"nothing"}'
    headers = timestamped(strict, body)
    forged = {**headers, "X-Processing-Signature": "0" * 128}
    assert (await post(client, "/api/v2/invoices/status", body, forged))[0] == 403
    assert await redis.keys("cv:seen:*") == []
    status, _ = await post(client, "/api/v2/invoices/status", body, headers)
    assert status == 404  # authenticated; the invoice just does not exist


async def test_nonce_lives_only_as_long_as_the_window(
    client: Client, strict: Merchant, redis: aioredis.Redis
) -> None:
    """The remembered signature expires when its timestamp leaves the window (bounded memory)."""
    body = b'{"foreign_id":"nothing"}'
    at = int(time.time()) - 100
    await post(client, "/api/v2/invoices/status", body, timestamped(strict, body, at))
    [key] = await redis.keys("cv:seen:*")
    assert strict.key in key.decode()
    ttl = await redis.ttl(key)
    assert WINDOW - 100 - 5 <= ttl <= WINDOW - 100 + 2


async def test_uppercase_signature_is_the_same_nonce(client: Client, strict: Merchant) -> None:
    """Hex is case-insensitive: a replay in capitals is still a replay."""
    body = b'{"foreign_id":"nothing"}'
    headers = timestamped(strict, body)
    await post(client, "/api/v2/invoices/status", body, headers)
    upper = {**headers, "X-Processing-Signature": headers["X-Processing-Signature"].upper()}
    assert await post(client, "/api/v2/invoices/status", body, upper) == (403, REPLAYED)
