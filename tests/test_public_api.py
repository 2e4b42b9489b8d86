"""The customer's JSON API (spec §7): the public view and the confirm of each invoice type."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from receiver import appkeys
from tests.support import create_payload, merchant_post
from worker.domain.models import Merchant
from worker.store import keys

Client = TestClient[Any, Any]


async def create(
    client: Client, merchant: Merchant, foreign_id: str, **fields: Any
) -> dict[str, Any]:
    status, body = await merchant_post(
        client, merchant, "/api/v2/invoices/create", {**create_payload(foreign_id), **fields}
    )
    assert status == 200, body
    return body["data"]  # type: ignore[no-any-return]


def token(invoice: dict[str, Any]) -> str:
    return str(invoice["url"]).rsplit("/", 1)[1]


async def confirm(client: Client, invoice: dict[str, Any], **body: Any) -> tuple[int, Any]:
    response = await client.post(
        f"/api/v2/public/invoices/{token(invoice)}/confirm",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    return response.status, await response.json()


async def test_public_view_has_no_secrets(client: Client, merchant: Merchant) -> None:
    """The public view shows what the page needs and nothing of the merchant's."""
    invoice = await create(client, merchant, "v1", email_user="buyer@example.com")
    response = await client.get(f"/api/v2/public/invoices/{token(invoice)}")
    assert response.status == 200
    data = (await response.json())["data"]
    assert (data["title"], data["amount"], data["currency"], data["status"]) == (
        "Tea",
        "106.75000000",
        "EUR",
        "pending",
    )
    assert data["email"] == "buyer@example.com"
    assert {o["currency"] for o in data["offers"]} == {"BTC", "BCH", "LTC", "ETH", "USDTT"}
    text = json.dumps(data)
    for secret in (merchant.key, merchant.secret, "foreign_id", "v1"):
        assert secret not in text


async def test_type1_confirm_fixes_rate_address_and_timer(
    client: Client, merchant: Merchant
) -> None:
    """Type 1: the confirm fixes the rate now, assigns an address and starts the 15-minute timer."""
    invoice = await create(client, merchant, "t1", timer=False)
    before = int(time.time())
    status, body = await confirm(client, invoice, sender_currency="LTC", email="buyer@example.com")
    assert status == 200, body
    data = body["data"]
    assert data["status"] == "pending"
    assert data["sender_currency"] == "LTC"
    assert data["address"].startswith("ltc1")
    assert (
        data["sender_amount"] == "1.40597561"
    )  # 106.75 EUR at 82 USD/LTC, 1.08 USD/EUR, rounded up
    assert before + 900 <= data["expires_at"] <= int(time.time()) + 900
    status, merchant_view = await merchant_post(
        client, merchant, "/api/v2/invoices/status", {"foreign_id": "t1"}
    )
    assert merchant_view["data"]["sequence"] == 1  # the merchant hears of it


async def test_type2_confirm_uses_the_quote_fixed_at_creation(
    client: Client, merchant: Merchant
) -> None:
    """Type 2: the address is assigned for the chosen currency at the rate fixed at creation."""
    invoice = await create(client, merchant, "t2")
    view = await (await client.get(f"/api/v2/public/invoices/{token(invoice)}")).json()
    eth = next(o for o in view["data"]["offers"] if o["currency"] == "ETH")
    status, body = await confirm(client, invoice, sender_currency="ETH", email="buyer@example.com")
    assert status == 200, body
    assert body["data"]["sender_amount"] == eth["amount"]
    assert body["data"]["address"].startswith("0x")
    assert body["data"]["expires_at"] == invoice["release_at"]  # the timer runs from creation


async def test_type3_confirm_only_records_the_email(
    client: Client, merchant: Merchant, redis: aioredis.Redis
) -> None:
    """Type 3: the confirm only records the e-mail; the merchant sees no change."""
    invoice = await create(client, merchant, "t3", sender_currency="BTC")
    status, body = await confirm(client, invoice, email="buyer@example.com")
    assert status == 200, body
    assert body["data"]["address"] == invoice["address"]
    assert body["data"]["email"] == "buyer@example.com"
    _, merchant_view = await merchant_post(
        client, merchant, "/api/v2/invoices/status", {"foreign_id": "t3"}
    )
    assert merchant_view["data"]["sequence"] == 0


async def test_confirm_refusals(client: Client, merchant: Merchant) -> None:
    """Missing e-mail, unoffered or second currency, unknown token: refused clearly."""
    invoice = await create(client, merchant, "r1", timer=False)
    assert await confirm(client, invoice, sender_currency="BTC") == (
        400,
        {"errors": {"email": "This field is required."}},
    )
    status, body = await confirm(client, invoice, sender_currency="EUR", email="b@example.com")
    assert (status, body["errors"]["code"]) == (400, "invalid_choice")
    assert (await confirm(client, invoice, sender_currency="BTC", email="b@example.com"))[0] == 200
    status, body = await confirm(client, invoice, sender_currency="LTC", email="b@example.com")
    assert (status, body["errors"]["error"]) == (
        400,
        "The payment currency has already been chosen.",
    )
    response = await client.post(
        "/api/v2/public/invoices/not-a-token/confirm",
        data=b"{}",
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 404


async def test_racing_confirms_assign_one_address(
    client: Client, merchant: Merchant, redis: aioredis.Redis
) -> None:
    """Ten confirms at once (double clicks, two tabs): one address is assigned and owned."""
    invoice = await create(client, merchant, "race", timer=False)
    results = await asyncio.gather(
        *(confirm(client, invoice, sender_currency="BTC", email="b@example.com") for _ in range(10))
    )
    addresses = {body["data"]["address"] for status, body in results if status == 200}
    assert len(addresses) == 1
    service = client.server.app[appkeys.SERVICE]
    assigned = (await service.by_token(token(invoice))).invoice.address
    assert assigned is not None and {assigned.address} == addresses
    owner = keys.address_index("BTC", assigned.address)
    assert int(await redis.hget(owner.key, owner.field)) == invoice["id"]
    # A confirm claims its address before its commit (another slot); the losers' claims
    # name this invoice but own nothing: ingest treats deposits to them as orphans.
    owners = [
        owner
        async for key in redis.scan_iter(match=f"{keys.PREFIX}addrs:*")
        for owner in (await redis.hgetall(key)).values()
    ]
    assert owners and {int(owner) for owner in owners} == {invoice["id"]}
