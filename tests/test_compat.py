"""Wire compatibility with clients written against the public CoinsPaid v2 reference (spec §6).

Everything goes through HTTP to the receiver on the test session's Redis. No
CoinsPaid client library for Python exists on PyPI, so the last tests replay
the exact bytes that the public Go, C# and PHP client libraries send.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from receiver.app import create_app
from tests.support import create_payload, make_settings, merchant_post, signed_headers
from worker.config import Settings
from worker.domain.models import Merchant
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer

Client = TestClient[Any, Any]

BAD_CONTENT = {"error": "Bad content format", "code": "bad_content_format"}
ALL_CODES = ["BTC", "BCH", "LTC", "ETH", "USDTT", "EUR", "USD"]

# The demo rates plus one hidden crypto currency and a configured EUR minimum.
RATES_WITH_HIDDEN = """
[currencies.BTC]
id = 1
type = "crypto"
price = "64000"

[currencies.DOGE]
id = 9
type = "crypto"
price = "0.1"
visible = false

[currencies.EUR]
id = 6
type = "fiat"
price = "1.08"
minimum_amount = "10"
"""


async def signed(
    client: Client, merchant: Merchant, path: str, body: bytes, method: str = "POST"
) -> tuple[int, Any]:
    """Send `body` byte for byte, signed as the merchant; (status, decoded JSON)."""
    response = await client.request(
        method, path, data=body, headers=signed_headers(merchant.key, merchant.secret, body)
    )
    return response.status, await response.json()


@pytest.fixture
async def hidden_client(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Client]:
    """The receiver with a rates file holding a hidden currency (DOGE) and an EUR minimum."""
    rates = tmp_path / "rates.toml"
    rates.write_text(RATES_WITH_HIDDEN)
    app = create_app(make_settings(redis_server.url, rates_file=rates))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


# --------------------------------------------------------------------------- ping and bodies


async def test_ping_answers_plain_ok_even_with_a_json_body(client: Client) -> None:
    """A GET ping carrying `{}` and a JSON content type (as the Go client sends it) gets OK."""
    response = await client.get(
        "/api/v2/ping", data=b"{}", headers={"Content-Type": "application/json"}
    )
    assert (response.status, await response.text()) == (200, "OK")


@pytest.mark.parametrize("body", [b"{}", b"[]", b"null", b"", b" [ ] "])
@pytest.mark.parametrize(
    "path",
    [
        "/api/v2/accounts/list",
        "/api/v2/currencies/list",
        "/api/v2/currencies/pairs",
        "/api/v2/currencies/rates",
    ],
)
async def test_endpoints_without_required_fields_take_empty_bodies(
    client: Client, merchant: Merchant, path: str, body: bytes
) -> None:
    """`{}`, `[]`, `null` and an empty body all mean "no parameters"."""
    status, answer = await signed(client, merchant, path, body)
    assert status == 200, answer
    assert len(answer["data"]) > 0


@pytest.mark.parametrize("body", [b"[]", b"null"])
async def test_cancel_takes_an_array_or_null_body(
    client: Client, merchant: Merchant, body: bytes
) -> None:
    """Cancel (no body fields) accepts `[]` and `null` like `{}`."""
    await merchant_post(client, merchant, "/api/v2/invoices/create", create_payload("c"))
    status, answer = await signed(client, merchant, "/api/v2/invoices/c/cancel/", body)
    assert (status, answer["data"]["status"]) == (200, "failed")


@pytest.mark.parametrize("body", [b"[1]", b'["a"]', b'"text"', b"1", b"true"])
async def test_other_non_object_bodies_stay_bad_content(
    client: Client, merchant: Merchant, body: bytes
) -> None:
    """Only the empty array and null stand for no parameters; other non-objects are refused."""
    assert await signed(client, merchant, "/api/v2/accounts/list", body) == (400, BAD_CONTENT)


async def test_required_fields_still_named_for_an_empty_array(
    client: Client, merchant: Merchant
) -> None:
    """`[]` to create is "no parameters": every required field is reported missing."""
    status, answer = await signed(client, merchant, "/api/v2/invoices/create", b"[]")
    assert status == 400
    assert set(answer["errors"]) == {"timer", "title", "currency", "amount", "foreign_id"}


# --------------------------------------------------------------------------- optional fields


@pytest.mark.parametrize("blank", ["", None], ids=["empty-string", "null"])
async def test_blank_optional_create_fields_mean_not_given(
    client: Client, merchant: Merchant, service: InvoiceService, blank: str | None
) -> None:
    """The optional create fields sent as "" or null are taken as not given."""
    fields = ("url_success", "url_failed", "email_user", "description", "sender_currency", "type")
    payload = create_payload("blank", **dict.fromkeys(fields, blank))
    status, answer = await merchant_post(client, merchant, "/api/v2/invoices/create", payload)
    assert status == 200, answer
    assert answer["data"]["sender_currency"] is None  # type 2, not type 3
    invoice = (await service.by_foreign_id(merchant.key, "blank")).invoice
    assert (invoice.url_success, invoice.url_failed, invoice.email) == (None, None, None)
    assert (invoice.description, invoice.payment_type.value) == ("", "fill_or_kill")


@pytest.mark.parametrize("field", ["title", "currency", "amount", "foreign_id"])
async def test_blank_required_fields_are_still_errors(
    client: Client, merchant: Merchant, field: str
) -> None:
    """A required field sent as "" is a field error on that field, not "absent"."""
    payload = {**create_payload("req"), field: ""}
    status, answer = await merchant_post(client, merchant, "/api/v2/invoices/create", payload)
    assert status == 400
    assert list(answer["errors"]) == [field]


@pytest.mark.parametrize(
    ("timer", "status"), [(1, "pending"), (0, "created"), ("1", "pending"), ("0", "created")]
)
async def test_timer_takes_one_and_zero(
    client: Client, merchant: Merchant, timer: object, status: str
) -> None:
    """timer as 1/0 or "1"/"0" (what the PHP client sends) means true/false."""
    payload = create_payload("timer", timer=timer)
    code, answer = await merchant_post(client, merchant, "/api/v2/invoices/create", payload)
    assert (code, answer["data"]["status"]) == (200, status)


@pytest.mark.parametrize("timer", ["yes", "true", 2, None, ""])
async def test_timer_refuses_other_values(
    client: Client, merchant: Merchant, timer: object
) -> None:
    """Anything but a boolean, 1/0 or "1"/"0" for timer is a field error."""
    payload = create_payload("timer", timer=timer)
    status, answer = await merchant_post(client, merchant, "/api/v2/invoices/create", payload)
    assert status == 400
    assert list(answer["errors"]) == ["timer"]


# --------------------------------------------------------------------------- amounts


@pytest.mark.parametrize(
    ("currency", "amount", "error"),
    [
        ("EUR", "10.123", "Amount must have at most 2 decimals."),
        ("USD", "0.001", "Amount must have at most 2 decimals."),
        ("EUR", "10.120", None),
        ("BTC", "0.12345678", None),
    ],
)
async def test_create_amount_limited_to_the_currency_precision(
    client: Client, merchant: Merchant, currency: str, amount: str, error: str | None
) -> None:
    """EUR and USD take 2 decimals, crypto 8; more is a field error on amount."""
    payload = create_payload("p", currency=currency, amount=amount)
    status, answer = await merchant_post(client, merchant, "/api/v2/invoices/create", payload)
    if error is None:
        assert status == 200, answer
    else:
        assert (status, answer) == (400, {"errors": {"amount": error}})


async def test_create_amount_below_the_configured_minimum(
    hidden_client: Client, merchant: Merchant
) -> None:
    """A currency's `minimum_amount` from the rates file is enforced on create."""
    payload = create_payload("small", amount="9.99")
    status, answer = await merchant_post(
        hidden_client, merchant, "/api/v2/invoices/create", payload
    )
    assert (status, answer) == (
        400,
        {"errors": {"amount": "The amount is too small. The minimum amount is 10 EUR."}},
    )
    payload = create_payload("enough", amount="10")
    assert (await merchant_post(hidden_client, merchant, "/api/v2/invoices/create", payload))[
        0
    ] == 200


# --------------------------------------------------------------------------- accounts


async def test_accounts_list_keeps_a_balance_in_a_removed_currency(
    client: Client, merchant: Merchant, redis: aioredis.Redis
) -> None:
    """Money held in a currency no longer configured is still listed (type unknown)."""
    await redis.hset(keys.balance(merchant.key), mapping={"EUR": "5.5", "XMR": "1.25"})
    status, answer = await merchant_post(client, merchant, "/api/v2/accounts/list", [])
    assert status == 200
    assert [a["currency"] for a in answer["data"]] == [*ALL_CODES, "XMR"]
    assert answer["data"][5] == {"currency": "EUR", "type": "fiat", "balance": "5.50000000"}
    assert answer["data"][-1] == {"currency": "XMR", "type": None, "balance": "1.25000000"}


# --------------------------------------------------------------------------- currencies


async def test_currencies_list_has_the_reference_fields(
    client: Client, redis: aioredis.Redis
) -> None:
    """Each currency has the reference's fields; the deposit fee is the merchant's own."""
    merchant = make_merchant("Fees", "http://127.0.0.1:9/cb", fee_percent=Decimal("1.50"))
    await MerchantStore(redis).add(merchant)
    status, answer = await merchant_post(client, merchant, "/api/v2/currencies/list", {})
    assert status == 200
    assert [c["currency"] for c in answer["data"]] == ALL_CODES
    assert [c["id"] for c in answer["data"]] == [1, 2, 3, 4, 5, 6, 7]
    assert answer["data"][0] == {
        "id": 1,
        "type": "crypto",
        "currency": "BTC",
        "minimum_amount": "0.00000001",
        "deposit_fee_percent": "1.5",
        "withdrawal_fee_percent": "0",
        "precision": 8,
    }
    assert answer["data"][5] | {"deposit_fee_percent": "?"} == {
        "id": 6,
        "type": "fiat",
        "currency": "EUR",
        "minimum_amount": "0.01000000",
        "deposit_fee_percent": "?",
        "withdrawal_fee_percent": "0",
        "precision": 2,
    }


@pytest.mark.parametrize(
    ("visible", "codes"),
    [
        (None, ["BTC", "DOGE", "EUR"]),
        (True, ["BTC", "EUR"]),
        (False, ["DOGE"]),
        ("1", ["BTC", "EUR"]),
        (0, ["DOGE"]),
        ("", ["BTC", "DOGE", "EUR"]),
    ],
)
async def test_currencies_list_visible_filter(
    hidden_client: Client, merchant: Merchant, visible: object, codes: list[str]
) -> None:
    """visible=true lists offered currencies, false the hidden ones, absent/blank all."""
    body = {} if visible is None else {"visible": visible}
    status, answer = await merchant_post(hidden_client, merchant, "/api/v2/currencies/list", body)
    assert status == 200
    assert [c["currency"] for c in answer["data"]] == codes


async def test_currencies_list_visible_must_be_boolean(client: Client, merchant: Merchant) -> None:
    """A visible filter that is no boolean is a field error."""
    status, answer = await merchant_post(
        client, merchant, "/api/v2/currencies/list", {"visible": "maybe"}
    )
    assert status == 400 and list(answer["errors"]) == ["visible"]


async def test_hidden_currency_is_not_offered_for_new_invoices(
    hidden_client: Client, merchant: Merchant
) -> None:
    """A hidden currency cannot be an invoice's currency nor its sender_currency."""
    for fields, field in (
        ({"currency": "DOGE", "amount": "100"}, "currency"),
        ({"sender_currency": "DOGE"}, "sender_currency"),
    ):
        payload = create_payload("doge", **fields)
        status, answer = await merchant_post(
            hidden_client, merchant, "/api/v2/invoices/create", payload
        )
        assert (status, answer) == (400, {"errors": {field: "Unknown currency."}})
    status, answer = await merchant_post(
        hidden_client, merchant, "/api/v2/invoices/create", create_payload("type2")
    )
    token = answer["data"]["url"].rsplit("/", 1)[1]
    response = await hidden_client.get(f"/api/v2/public/invoices/{token}")
    offers = [o["currency"] for o in (await response.json())["data"]["offers"]]
    assert offers == ["BTC"]


@pytest.mark.parametrize("path", ["/api/v2/currencies/pairs", "/api/v2/currencies/rates"])
async def test_pairs_in_the_reference_shape(client: Client, merchant: Merchant, path: str) -> None:
    """Each pair: currency_from/currency_to objects, rate_from "1", rate_to 8 decimals."""
    status, answer = await merchant_post(
        client, merchant, path, {"currency_from": "BTC", "currency_to": "EUR"}
    )
    assert (status, answer) == (
        200,
        {
            "data": [
                {
                    "currency_from": {
                        "currency": "BTC",
                        "type": "crypto",
                        "min_amount": "0.00000001",
                        "min_amount_deposit_with_exchange": "0.00000001",
                    },
                    "currency_to": {"currency": "EUR", "type": "fiat"},
                    "rate_from": "1",
                    # 64000 USD per BTC / 1.08 USD per EUR
                    "rate_to": "59259.25925926",
                }
            ]
        },
    )


@pytest.mark.parametrize("path", ["/api/v2/currencies/pairs", "/api/v2/currencies/rates"])
async def test_pairs_filters(client: Client, merchant: Merchant, path: str) -> None:
    """No filter: every crypto against every other currency; each filter narrows; case-blind."""
    _, everything = await merchant_post(client, merchant, path, {})
    assert len(everything["data"]) == 5 * 6
    assert {p["currency_from"]["type"] for p in everything["data"]} == {"crypto"}
    _, from_ltc = await merchant_post(client, merchant, path, {"currency_from": "ltc"})
    assert {p["currency_from"]["currency"] for p in from_ltc["data"]} == {"LTC"}
    assert len(from_ltc["data"]) == 6
    _, to_usd = await merchant_post(
        client, merchant, path, {"currency_to": "USD", "currency_from": ""}
    )
    assert [p["currency_from"]["currency"] for p in to_usd["data"]] == ALL_CODES[:5]
    _, from_fiat = await merchant_post(client, merchant, path, {"currency_from": "EUR"})
    assert from_fiat == {"data": []}


@pytest.mark.parametrize("path", ["/api/v2/currencies/pairs", "/api/v2/currencies/rates"])
@pytest.mark.parametrize(
    ("filters", "errors"),
    [
        ({"currency_from": "XYZ"}, {"currency_from": "The selected currency from is invalid."}),
        ({"currency_to": "X"}, {"currency_to": "The selected currency to is invalid."}),
        (
            {"currency_from": "NOPE", "currency_to": "DOGE"},
            {
                "currency_from": "The selected currency from is invalid.",
                "currency_to": "The selected currency to is invalid.",
            },
        ),
    ],
)
async def test_pairs_unknown_filter_is_a_field_error(
    hidden_client: Client,
    merchant: Merchant,
    path: str,
    filters: dict[str, str],
    errors: dict[str, str],
) -> None:
    """An unknown (or hidden) currency in a filter: 400 with the reference's exact messages."""
    assert await merchant_post(hidden_client, merchant, path, filters) == (400, {"errors": errors})


# --------------------------------------------------------------------------- trailing slash


async def test_every_named_route_answers_with_and_without_a_trailing_slash(
    settings: Settings,
) -> None:
    """Each named route's twin path (slash added or removed) resolves to the same handler."""
    app = create_app(settings)
    checked = 0
    for resource in app.router.resources():
        if resource.name is None or resource.name == "static":
            continue
        path = re.sub(r"\{\w+\}", "p1", resource.canonical)
        twin = path.removesuffix("/") if path.endswith("/") else path + "/"
        for route in resource:
            if route.method == "HEAD":
                continue
            match = await app.router.resolve(make_mocked_request(route.method, twin, app=app))
            assert match.handler is route.handler, (route.method, twin)
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v2/invoices/create/", create_payload("s1")),
        ("POST", "/api/v2/invoices/status/", {"foreign_id": "s0"}),
        ("POST", "/api/v2/invoices/s0/cancel", {}),
        ("POST", "/api/v2/accounts/list/", {}),
        ("POST", "/api/v2/currencies/pairs/", {}),
        ("GET", "/api/v2/ping/", None),
    ],
)
async def test_trailing_slash_variants_over_http(
    client: Client, merchant: Merchant, method: str, path: str, body: object
) -> None:
    """The other slash form of an endpoint gets the same answer, not a 404."""
    await merchant_post(client, merchant, "/api/v2/invoices/create", create_payload("s0"))
    raw = b"" if body is None else json.dumps(body).encode()
    response = await client.request(
        method, path, data=raw, headers=signed_headers(merchant.key, merchant.secret, raw)
    )
    assert response.status == 200, await response.text()


# --------------------------------------------------------------------------- client replays
# The bytes below are what the public client libraries put on the wire (read from their
# sources; none is on PyPI): the Go one (serjvanilla/coinspaid-go) marshals its option
# structs whole, so empty strings and null reach us, and sends `null` or `{}` for calls
# without parameters; the C# one (maincoon/CoinsPaidClient) signs `[]` for those; the
# PHP one (kukulkan-popolvux/coinspaid-api-laravel) sends booleans as "1"/"0" strings
# and escapes slashes.


async def test_go_client_calls(client: Client, merchant: Merchant) -> None:
    """The Go client's ping, list calls and a create with its blank fields all succeed."""
    ping = await client.get(
        "/api/v2/ping", data=b"{}", headers=signed_headers(merchant.key, merchant.secret, b"{}")
    )
    assert await ping.text() == "OK"
    for path in ("/api/v2/accounts/list", "/api/v2/currencies/list"):
        status, answer = await signed(client, merchant, path, b"null")
        assert status == 200 and len(answer["data"]) == 7
    body = (
        b'{"timer":true,"title":"Tea","currency":"EUR","sender_currency":null,'
        b'"amount":"106.75","foreign_id":"go-1","url_success":"","url_failed":"",'
        b'"email_user":""}'
    )
    status, answer = await signed(client, merchant, "/api/v2/invoices/create", body)
    assert (status, answer["data"]["status"], answer["data"]["amount"]) == (
        200,
        "pending",
        "106.75000000",
    )
    body = b'{"currency_from":"BTC","currency_to":"EUR"}'
    status, answer = await signed(client, merchant, "/api/v2/currencies/pairs", body)
    assert status == 200 and answer["data"][0]["rate_to"] == "59259.25925926"


async def test_csharp_client_calls(client: Client, merchant: Merchant) -> None:
    """The C# client's parameterless calls sign `[]`; a filtered pairs call signs an object."""
    for path in ("/api/v2/currencies/list", "/api/v2/accounts/list", "/api/v2/currencies/pairs"):
        status, _ = await signed(client, merchant, path, b"[]")
        assert status == 200, path
    status, answer = await signed(
        client, merchant, "/api/v2/currencies/pairs", b'{"currency_from":"LTC"}'
    )
    assert status == 200 and {p["currency_from"]["currency"] for p in answer["data"]} == {"LTC"}


async def test_php_client_calls(client: Client, merchant: Merchant) -> None:
    """The PHP client's "1" timer, string amount and escaped slashes make a type 1 invoice."""
    status, answer = await signed(client, merchant, "/api/v2/currencies/list", b'{"visible":"1"}')
    assert status == 200 and len(answer["data"]) == 7
    body = (
        b'{"foreign_id":"php-1","currency":"EUR","amount":"106.75","title":"Tea",'
        b'"timer":"0","url_success":"https:\\/\\/shop.example\\/ok",'
        b'"url_failed":"https:\\/\\/shop.example\\/failed","email_user":"buyer@shop.example"}'
    )
    status, answer = await signed(client, merchant, "/api/v2/invoices/create", body)
    assert (status, answer["data"]["status"]) == (200, "created"), answer
    status, answer = await signed(client, merchant, "/api/v2/accounts/list", b"[]")
    assert status == 200 and answer["data"][0]["type"] == "crypto"
