"""The merchant API of spec §6 through HTTP, against the real Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from receiver.app import create_app
from tests.support import create_payload, make_settings, merchant_post, signed_headers
from worker.domain.models import Merchant
from worker.domain.signing import sign, verify
from worker.store import keys
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer

Client = TestClient[Any, Any]

BAD_SIGNATURE = {"error": "Bad signature header", "code": "bad_header_signature"}
BAD_CONTENT = {"error": "Bad content format", "code": "bad_content_format"}
TOO_LARGE = {"error": "Request body too large", "code": "payload_too_large"}
NOT_FOUND = {"errors": {"error": "Invoice not found.", "code": "not_found"}}


def test_signature_known_answer() -> None:
    """The public AlphaPo vector: HMAC-SHA512 hex of the raw body with the secret."""
    body = b'{"currency":"BTC","foreign_id":"123456"}'
    expected = (
        "03c25fcf7cd35e7d995e402cd5d51edd72d48e1471e865907967809a0c189ba5"
        "5b90815f20e2bb10f82c7a9e9d865546fda58989c2ae9e8e2ff7bc29195fa1ec"
    )
    assert sign("AbCdEfG123456", body) == expected
    assert verify("AbCdEfG123456", body, expected)
    assert verify("AbCdEfG123456", body, expected.upper())


@pytest.mark.parametrize(
    "signature",
    [None, "", "00", "zz" * 64, "03c25fcf" * 16],
    ids=["missing", "empty", "short", "not-hex", "wrong"],
)
def test_signature_refuses_bad_values(signature: str | None) -> None:
    """Missing, short, non-hex or wrong signatures never verify."""
    assert not verify("AbCdEfG123456", b'{"currency":"BTC","foreign_id":"123456"}', signature)


def test_signature_covers_every_byte() -> None:
    """A signature of one body does not verify a body differing in whitespace only."""
    body = b'{"currency":"BTC","foreign_id":"123456"}'
    assert not verify("AbCdEfG123456", body + b" ", sign("AbCdEfG123456", body))


async def test_ping_needs_no_auth(client: Client) -> None:
    """GET /api/v2/ping answers the plain body OK without any header (clients compare it)."""
    response = await client.get("/api/v2/ping")
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.text() == "OK"


@pytest.mark.parametrize("payment_type", ["fill_or_kill", "good_until_expired"])
async def test_create_type1_no_timer(client: Client, merchant: Merchant, payment_type: str) -> None:
    """timer=false: status created; rate, address, timer all wait for the customer."""
    status, body = await merchant_post(
        client,
        merchant,
        "/api/v2/invoices/create",
        create_payload("t1", timer=False, type=payment_type),
    )
    assert status == 200
    data = body["data"]
    assert data["status"] == "created"
    assert data["foreign_id"] == "t1"
    assert data["amount"] == "106.75000000"
    assert data["currency"] == "EUR"
    for field in ("address", "sender_amount", "fixed_at", "release_at", "seconds_left"):
        assert data[field] is None, field
    assert data["url"].startswith("http://coinvoice.test/invoice/")
    assert len(data["url"].rsplit("/", 1)[1]) >= 22  # ≥128 bits, URL-safe base64


@pytest.mark.parametrize("payment_type", ["fill_or_kill", "good_until_expired"])
async def test_create_type2_timer(client: Client, merchant: Merchant, payment_type: str) -> None:
    """timer=true: pending, rate fixed and 15-minute timer from creation, no address yet."""
    status, body = await merchant_post(
        client, merchant, "/api/v2/invoices/create", create_payload("t2", type=payment_type)
    )
    assert status == 200
    data = body["data"]
    assert data["status"] == "pending"
    assert data["address"] is None and data["sender_amount"] is None
    assert data["release_at"] - data["fixed_at"] == 900
    assert 899 <= data["seconds_left"] <= 900


@pytest.mark.parametrize("payment_type", ["fill_or_kill", "good_until_expired"])
async def test_create_type3_preselected(
    client: Client, merchant: Merchant, payment_type: str
) -> None:
    """timer + sender_currency: pending with address and amount rounded up at 8 decimals."""
    status, body = await merchant_post(
        client,
        merchant,
        "/api/v2/invoices/create",
        create_payload("t3", sender_currency="BTC", type=payment_type),
    )
    assert status == 200
    data = body["data"]
    assert data["status"] == "pending"
    assert data["sender_currency"] == "BTC"
    assert data["address"].startswith("bc1q")
    # 106.75 EUR at 64000/1.08 EUR per BTC = 0.00180140625 BTC → rounded up.
    assert data["sender_amount"] == "0.00180141"


async def test_create_type1_with_preselected_currency(client: Client, merchant: Merchant) -> None:
    """timer=false with sender_currency: still type 1, created, the customer only confirms."""
    status, body = await merchant_post(
        client,
        merchant,
        "/api/v2/invoices/create",
        create_payload("t1p", timer=False, sender_currency="LTC"),
    )
    assert status == 200
    assert body["data"]["status"] == "created"
    assert body["data"]["sender_currency"] == "LTC"
    assert body["data"]["address"] is None


async def test_create_accepts_json_number_amount_exactly(
    client: Client, merchant: Merchant
) -> None:
    """A JSON number amount is parsed without float loss."""
    body = b'{"timer": false, "title": "x", "currency": "BTC", "amount": 0.1, "foreign_id": "n"}'
    response = await client.post(
        "/api/v2/invoices/create",
        data=body,
        headers=signed_headers(merchant.key, merchant.secret, body),
    )
    assert response.status == 200
    assert (await response.json())["data"]["amount"] == "0.10000000"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"title": ""}, "title", "String should have at least 1 character"),
        ({"title": "x" * 51}, "title", "String should have at most 50 characters"),
        ({"description": "x" * 1001}, "description", "String should have at most 1000 characters"),
        ({"amount": "abc"}, "amount", "Amount must be a decimal number."),
        ({"amount": "0"}, "amount", "Amount must be greater than 0."),
        ({"amount": "-1"}, "amount", "Amount must be greater than 0."),
        ({"amount": "1.123456789"}, "amount", "Amount must have at most 8 decimals."),
        ({"amount": "1000000000000.00000001"}, "amount", "Amount must not exceed 1000000000000."),
        ({"amount": True}, "amount", "Amount must be a decimal string or number."),
        ({"currency": "XYZ"}, "currency", "Unknown currency."),
        ({"sender_currency": "EUR"}, "sender_currency", "Unknown currency."),
        ({"timer": "yes"}, "timer", "Input should be a valid boolean"),
        ({"foreign_id": "f" * 256}, "foreign_id", "String should have at most 255 characters"),
        ({"email_user": "not-an-email"}, "email_user", "Enter a valid e-mail address."),
        ({"url_success": "javascript:alert(1)"}, "url_success", "Enter a valid http(s) URL."),
        ({"type": "forever"}, "type", "Input should be 'fill_or_kill' or 'good_until_expired'"),
    ],
)
async def test_create_field_errors(
    client: Client, merchant: Merchant, change: dict[str, Any], field: str, message: str
) -> None:
    """Each invalid field answers 400 {"errors": {field: message}} and stores nothing."""
    payload = {**create_payload("bad"), **change}
    status, body = await merchant_post(client, merchant, "/api/v2/invoices/create", payload)
    assert status == 400
    assert body == {"errors": {field: message}}


async def test_create_missing_fields(client: Client, merchant: Merchant) -> None:
    """Every required field missing is named."""
    status, body = await merchant_post(client, merchant, "/api/v2/invoices/create", {})
    assert status == 400
    assert set(body["errors"]) == {"timer", "title", "currency", "amount", "foreign_id"}
    assert body["errors"]["title"] == "This field is required."


async def test_duplicate_foreign_id(client: Client, merchant: Merchant) -> None:
    """The second create with the same foreign_id is refused with the spec's message."""
    first, _ = await merchant_post(
        client, merchant, "/api/v2/invoices/create", create_payload("dup")
    )
    status, body = await merchant_post(
        client, merchant, "/api/v2/invoices/create", create_payload("dup")
    )
    assert first == 200
    assert status == 400
    assert body == {"errors": {"foreign_id": "The foreign id has already been taken."}}


async def test_fifty_racing_creates_make_one_invoice(
    client: Client, merchant: Merchant, redis: aioredis.Redis
) -> None:
    """50 identical creates in flight at once: exactly one succeeds, one invoice exists."""
    results = await asyncio.gather(
        *(
            merchant_post(
                client,
                merchant,
                "/api/v2/invoices/create",
                create_payload("race", sender_currency="BTC"),
            )
            for _ in range(50)
        )
    )
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [400] * 49
    created = next(body for status, body in results if status == 200)["data"]
    claim = keys.foreign_id_index(merchant.key, "race")
    assert int(await redis.hget(claim.key, claim.field)) == created["id"]
    assert [k async for k in redis.scan_iter(match=f"{keys.PREFIX}inv:*")] == [
        keys.invoice(created["id"]).encode()
    ]


async def test_same_foreign_id_for_two_merchants(
    client: Client, merchant: Merchant, redis: aioredis.Redis
) -> None:
    """foreign_id is unique per merchant, not globally."""
    other = make_merchant("Other", "http://127.0.0.1:9/cb")
    await MerchantStore(redis).add(other)
    a, _ = await merchant_post(client, merchant, "/api/v2/invoices/create", create_payload("same"))
    b, _ = await merchant_post(client, other, "/api/v2/invoices/create", create_payload("same"))
    assert (a, b) == (200, 200)


async def test_merchant_never_sees_another_merchants_invoice(
    client: Client, merchant: Merchant, redis: aioredis.Redis
) -> None:
    """Status and cancel of another merchant's foreign_id answer 404 and change nothing."""
    other = make_merchant("Other", "http://127.0.0.1:9/cb")
    await MerchantStore(redis).add(other)
    await merchant_post(client, merchant, "/api/v2/invoices/create", create_payload("mine"))
    status, body = await merchant_post(
        client, other, "/api/v2/invoices/status", {"foreign_id": "mine"}
    )
    assert (status, body) == (404, NOT_FOUND)
    status, body = await merchant_post(client, other, "/api/v2/invoices/mine/cancel/", {})
    assert (status, body) == (404, NOT_FOUND)
    status, body = await merchant_post(
        client, merchant, "/api/v2/invoices/status", {"foreign_id": "mine"}
    )
    assert status == 200 and body["data"]["status"] == "pending"


async def test_status_returns_the_callback_snapshot(client: Client, merchant: Merchant) -> None:
    """invoices/status answers the §9 snapshot with sequence and refund_address."""
    await merchant_post(
        client, merchant, "/api/v2/invoices/create", create_payload("s1", sender_currency="BTC")
    )
    status, body = await merchant_post(
        client, merchant, "/api/v2/invoices/status", {"foreign_id": "s1"}
    )
    assert status == 200
    data = body["data"]
    assert data["type"] == "invoice"
    assert data["status"] == "pending"
    assert data["sequence"] == 0
    assert data["refund_address"] is None
    assert data["currency_received"] == {"currency": "EUR", "amount": "106.75000000"}
    assert data["currency_sent"] == {
        "currency": "BTC",
        "amount": "0.00180141",
        "remaining_amount": "0.00180141",
    }
    assert data["crypto_address"]["convert_to"] == "EUR"
    assert data["transactions"] == [] and data["fees"] == [] and data["error"] == ""


async def test_status_unknown_invoice(client: Client, merchant: Merchant) -> None:
    """An unknown foreign_id answers 404 with the spec's body."""
    assert await merchant_post(
        client, merchant, "/api/v2/invoices/status", {"foreign_id": "nope"}
    ) == (
        404,
        NOT_FOUND,
    )


@pytest.mark.parametrize("timer", [False, True])
async def test_cancel_fails_the_invoice(client: Client, merchant: Merchant, timer: bool) -> None:
    """Cancel in created/pending: failed, 'Cancelled by customer', a new sequence."""
    await merchant_post(
        client, merchant, "/api/v2/invoices/create", create_payload("c1", timer=timer)
    )
    status, body = await merchant_post(client, merchant, "/api/v2/invoices/c1/cancel/", {})
    assert status == 200
    assert body["data"]["status"] == "failed"
    assert body["data"]["error"] == "Cancelled by customer"
    assert body["data"]["sequence"] == 1


async def test_cancel_in_final_state_is_refused(client: Client, merchant: Merchant) -> None:
    """A second cancel meets a final invoice: 400 invalid_invoice_state."""
    await merchant_post(client, merchant, "/api/v2/invoices/create", create_payload("c2"))
    await merchant_post(client, merchant, "/api/v2/invoices/c2/cancel/", {})
    status, body = await merchant_post(client, merchant, "/api/v2/invoices/c2/cancel/", {})
    assert status == 400
    assert body == {
        "errors": {
            "error": "Invoice cannot be failed in its current state.",
            "code": "invalid_invoice_state",
        }
    }


async def test_accounts_list_starts_with_zero_balances(client: Client, merchant: Merchant) -> None:
    """A new merchant sees every offered currency with its type and a zero balance."""
    status, body = await merchant_post(client, merchant, "/api/v2/accounts/list", {})
    assert status == 200
    assert body["data"] == [
        {"currency": code, "type": kind, "balance": "0.00000000"}
        for code, kind in [
            ("BTC", "crypto"), ("BCH", "crypto"), ("LTC", "crypto"), ("ETH", "crypto"),
            ("USDTT", "crypto"), ("EUR", "fiat"), ("USD", "fiat"),
        ]
    ]  # fmt: skip


# --------------------------------------------------------------------------- errors and order


async def post_raw(
    client: Client, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    response = await client.post(path, data=body, headers=headers)
    assert response.content_type == "application/json"
    return response.status, await response.json()


async def test_missing_or_wrong_signature(client: Client, merchant: Merchant) -> None:
    """No key, unknown key, or a wrong signature: 403 bad_header_signature."""
    body = json.dumps(create_payload("x")).encode()
    good = signed_headers(merchant.key, merchant.secret, body)
    cases = [
        {"Content-Type": "application/json"},
        {**good, "X-Processing-Key": "unknown"},
        {**good, "X-Processing-Signature": sign("wrong", body)},
        {k: v for k, v in good.items() if k != "X-Processing-Signature"},
    ]
    for headers in cases:
        assert await post_raw(client, "/api/v2/invoices/create", body, headers) == (
            403,
            BAD_SIGNATURE,
        )


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'{"timer": true}', "text/plain"),
        (b"\xff\xfe", "application/json"),
    ],
    ids=["broken", "array", "content-type", "not-utf8"],
)
async def test_bad_content_format(
    client: Client, merchant: Merchant, body: bytes, content_type: str
) -> None:
    """A correctly signed body that is not a JSON object: 400 bad_content_format."""
    headers = {**signed_headers(merchant.key, merchant.secret, body), "Content-Type": content_type}
    assert await post_raw(client, "/api/v2/invoices/create", body, headers) == (400, BAD_CONTENT)


async def test_body_over_64_kib(client: Client, merchant: Merchant) -> None:
    """A body over 64 KiB is refused with 413 before the signature is looked at."""
    body = json.dumps(create_payload("big", description="x" * 70_000)).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Processing-Key": "k",
        "X-Processing-Signature": "s",
    }
    assert await post_raw(client, "/api/v2/invoices/create", body, headers) == (413, TOO_LARGE)


async def test_chunked_body_over_64_kib(client: Client, merchant: Merchant) -> None:
    """A chunked body (no Content-Length) is cut off at the limit too."""

    async def chunks() -> Any:
        for _ in range(80):
            yield b"x" * 1024

    headers = signed_headers(merchant.key, merchant.secret, b"")
    response = await client.post("/api/v2/invoices/create", data=chunks(), headers=headers)
    assert response.status == 413
    assert await response.json() == TOO_LARGE


async def test_checks_run_in_spec_order(client: Client, merchant: Merchant) -> None:
    """Signature is checked before content format, content format before fields."""
    body = b"{not json"
    headers = {
        "Content-Type": "application/json",
        "X-Processing-Key": merchant.key,
        "X-Processing-Signature": "0",
    }
    assert await post_raw(client, "/api/v2/invoices/create", body, headers) == (403, BAD_SIGNATURE)
    body = b'{"timer": "x"}'
    headers = {**signed_headers(merchant.key, merchant.secret, body), "Content-Type": "text/html"}
    assert await post_raw(client, "/api/v2/invoices/create", body, headers) == (400, BAD_CONTENT)


async def test_unknown_route_is_json(client: Client) -> None:
    """Unknown paths answer JSON, never an HTML page."""
    response = await client.get("/api/v2/nothing")
    assert response.status == 404
    assert response.content_type == "application/json"


async def test_merchant_rate_limit(
    redis: aioredis.Redis, redis_server: RedisServer, merchant: Merchant
) -> None:
    """Past the per-key limit in one second: 429 rate_limited with Retry-After."""
    app = create_app(make_settings(redis_server.url, rate_limit_merchant=3))
    async with TestClient(TestServer(app)) as client:
        results = [
            await merchant_post(client, merchant, "/api/v2/currencies/list", {}) for _ in range(8)
        ]
        response = await client.post(
            "/api/v2/currencies/list",
            data=b"{}",
            headers=signed_headers(merchant.key, merchant.secret, b"{}"),
        )
    statuses = [status for status, _ in results]
    assert 200 in statuses
    assert statuses.count(429) >= 4  # at most 3 per second pass, even across a second boundary
    assert (429, {"error": "Too many requests", "code": "rate_limited"}) in results
    if response.status == 429:
        assert response.headers["Retry-After"] == "1"


async def test_forged_requests_do_not_consume_a_merchants_rate_limit(
    redis: aioredis.Redis, redis_server: RedisServer, merchant: Merchant
) -> None:
    """Only authenticated requests count against a merchant key's limit."""
    app = create_app(make_settings(redis_server.url, rate_limit_merchant=2))
    async with TestClient(TestServer(app)) as client:
        forged = {
            "Content-Type": "application/json",
            "X-Processing-Key": merchant.key,
            "X-Processing-Signature": "00",
        }
        for _ in range(5):
            await client.post("/api/v2/currencies/list", data=b"{}", headers=forged)
        status, _ = await merchant_post(client, merchant, "/api/v2/currencies/list", {})
    assert status == 200
