"""Refund hijack and cross-site forms (spec §7, issue 15 item 1), over plain HTTP.

The refund page is named by its own token, issued with the first refund or
payback e-mail and found nowhere else; every form post on the hosted pages is
refused from another site; the e-mail given at confirmation stays.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from receiver.pages import csrf
from tests.support import create_payload, deposit, drain, merchant_post, processing_post
from worker.domain.models import EmailKind, Invoice, Merchant
from worker.ingest.consumer import Ingest
from worker.mail.render import render
from worker.services.invoices import InvoiceNotFound, InvoiceService
from worker.store.mails import MailRecord

Client = TestClient[Any, Any]

# A valid mainnet BTC address nobody allocated: the customer's own wallet.
CUSTOMER_BTC = "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"
THIEF_BTC = "bc1q9vza2e8x573nczrlzms0wvx3gsqjx7vavgkx0l"
_FIELD = re.compile(rf'name="{csrf.FIELD}" value="([A-Za-z0-9_-]+)"')


async def create(client: Client, merchant: Merchant, foreign_id: str, **fields: Any) -> Any:
    status, body = await merchant_post(
        client, merchant, "/api/v2/invoices/create", {**create_payload(foreign_id), **fields}
    )
    assert status == 200, body
    return body["data"]


def token_of(created: dict[str, Any]) -> str:
    return str(created["url"]).rsplit("/invoice/", 1)[1]


async def stored(service: InvoiceService, invoice_id: int) -> Invoice:
    found = await service.store.get(invoice_id)
    assert found is not None
    return found.invoice


async def underpaid(
    client: Client, merchant: Merchant, ingest: Ingest, foreign_id: str, **fields: Any
) -> dict[str, Any]:
    """A type 3 invoice failed by a confirmed half payment: a payback e-mail is owed."""
    created = await create(
        client, merchant, foreign_id, sender_currency="BTC", email_user="buyer@example.com"
    )
    half = f"{(Decimal(created['sender_amount']) / 2).quantize(Decimal('0.00000001')):f}"
    payment = deposit(created["address"], half, tx_id=created["id"], status="confirmed")
    status, body = await processing_post(client, payment)
    assert status == 200, body
    await drain(ingest)
    return created  # type: ignore[no-any-return]


async def form_token(client: Client, path: str) -> str:
    """Open a page as a browser would; its cookie stays in the client's jar."""
    response = await client.get(path)
    assert response.status == 200, await response.text()
    match = _FIELD.search(await response.text())
    assert match is not None
    jar = client.session.cookie_jar.filter_cookies(client.make_url(path))
    assert jar[csrf.COOKIE].value == match.group(1)
    return match.group(1)


# --------------------------------------------------------------------------- the refund token


async def test_refund_token_is_issued_with_the_first_refund_email(
    client: Client, merchant: Merchant, ingest: Ingest, service: InvoiceService
) -> None:
    """No refund token while nothing is owed; the failing payment's commit issues one, once."""
    created = await create(client, merchant, "owed-1", sender_currency="BTC")
    assert (await stored(service, created["id"])).refund_token is None
    half = f"{(Decimal(created['sender_amount']) / 2).quantize(Decimal('0.00000001')):f}"
    await processing_post(client, deposit(created["address"], half, tx_id=1, status="confirmed"))
    await drain(ingest)
    invoice = await stored(service, created["id"])
    assert invoice.status.value == "failed" and invoice.mailed == ("underpaid",)
    first = invoice.refund_token
    assert first is not None and first != invoice.token
    assert len(first) >= 22  # ≥128 bits of URL-safe base64
    # A second cause (a late payment) mails again with the same refund page.
    late = deposit(created["address"], "0.001", tx_id=2, status="confirmed")
    await processing_post(client, late)
    await drain(ingest)
    invoice = await stored(service, created["id"])
    assert "late:2" in invoice.mailed
    assert invoice.refund_token == first
    assert (await service.by_refund_token(first)).invoice.id == created["id"]


async def test_cancel_with_payment_issues_the_refund_token(
    client: Client, merchant: Merchant, ingest: Ingest, service: InvoiceService
) -> None:
    """A merchant cancel after a payment owes a refund claim: the refund page opens then."""
    created = await create(client, merchant, "owed-2", sender_currency="BTC")
    await processing_post(client, deposit(created["address"], "0.0001", tx_id=1))
    await drain(ingest)
    assert (await stored(service, created["id"])).refund_token is None
    status, body = await merchant_post(client, merchant, "/api/v2/invoices/owed-2/cancel/", {})
    assert status == 200, body
    refund_token = (await stored(service, created["id"])).refund_token
    assert refund_token is not None
    assert (await client.get(f"/refund/{refund_token}")).status == 200


async def test_the_invoice_link_opens_no_refund_page(
    client: Client, merchant: Merchant, ingest: Ingest, service: InvoiceService
) -> None:
    """`/refund/{invoice token}` is a 404, before and after a refund is owed; nothing is stored."""
    created = await create(client, merchant, "hijack-1", sender_currency="BTC")
    invoice_token = token_of(created)
    assert (await client.get(f"/refund/{invoice_token}")).status == 404  # nothing owed yet
    await underpaid(client, merchant, ingest, "hijack-2")
    token_field = await form_token(client, f"/invoice/{invoice_token}")
    for path in (f"/refund/{invoice_token}", f"/refund/{token_of(created)}x"):
        response = await client.post(path, data={"address": THIEF_BTC, csrf.FIELD: token_field})
        assert response.status == 404
        assert response.content_type == "text/html"
    assert (await stored(service, created["id"])).refund_address is None


async def test_an_index_key_left_by_a_lost_commit_opens_no_refund_page(
    client: Client, merchant: Merchant, ingest: Ingest, service: InvoiceService
) -> None:
    """The refund-token key is written before its commit: one whose invoice lacks it is a 404."""
    created = await underpaid(client, merchant, ingest, "leftover-1")
    issued = (await stored(service, created["id"])).refund_token
    assert issued is not None
    # A claim whose commit was lost (a crash, or a retry that drew another token).
    leftover = "L" * 32
    await service.store.claim_refund_token(created["id"], leftover)
    assert (await client.get(f"/refund/{leftover}")).status == 404
    with pytest.raises(InvoiceNotFound):
        await service.by_refund_token(leftover)
    token_field = await form_token(client, f"/refund/{issued}")
    response = await client.post(
        f"/refund/{leftover}", data={"address": THIEF_BTC, csrf.FIELD: token_field}
    )
    assert response.status == 404
    assert (await stored(service, created["id"])).refund_address is None
    assert (await client.get(f"/refund/{issued}")).status == 200


async def test_invoice_page_carries_no_refund_link(
    client: Client, merchant: Merchant, ingest: Ingest, service: InvoiceService
) -> None:
    """The failed invoice's page says a refund link comes by e-mail and never shows it."""
    created = await underpaid(client, merchant, ingest, "page-1")
    refund_token = (await stored(service, created["id"])).refund_token
    assert refund_token is not None
    html = await (await client.get(f"/invoice/{token_of(created)}")).text()
    assert refund_token not in html
    assert "/refund/" not in html
    assert "we e-mail you a link" in html
    public = await (await client.get(f"/api/v2/public/invoices/{token_of(created)}")).text()
    assert refund_token not in public


async def test_refund_page_stores_the_address_once(
    client: Client, merchant: Merchant, ingest: Ingest, service: InvoiceService
) -> None:
    """With the e-mailed refund token and its form token, the address is stored; once."""
    created = await underpaid(client, merchant, ingest, "refund-1")
    refund_token = (await stored(service, created["id"])).refund_token
    path = f"/refund/{refund_token}"
    posted = {"address": CUSTOMER_BTC, csrf.FIELD: await form_token(client, path)}
    response = await client.post(path, data=posted, allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == path
    assert (await stored(service, created["id"])).refund_address == CUSTOMER_BTC
    posted["address"] = THIEF_BTC
    response = await client.post(path, data=posted)
    assert response.status == 409
    assert (await stored(service, created["id"])).refund_address == CUSTOMER_BTC


# --------------------------------------------------------------------------- cross-site posts


@pytest.fixture
async def refund_path(
    client: Client, merchant: Merchant, ingest: Ingest, service: InvoiceService
) -> str:
    created = await underpaid(client, merchant, ingest, "csrf-refund")
    return f"/refund/{(await stored(service, created['id'])).refund_token}"


FORGERIES: dict[str, tuple[dict[str, str], bool]] = {
    # name: (extra headers, send the page's form token)
    "origin-of-another-site": ({"Origin": "https://evil.example"}, True),
    "origin-other-port": ({"Origin": "http://127.0.0.1:1"}, True),
    "referer-of-another-site": ({"Referer": "https://evil.example/pay.html"}, True),
    "no-form-token": ({}, False),
    "null-origin-without-token": ({"Origin": "null"}, False),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_cross_site_refund_post_is_refused(
    client: Client, refund_path: str, service: InvoiceService, forgery: str
) -> None:
    """A cross-site refund post (by Origin, Referer or token) is a 403; nothing is stored."""
    headers, with_token = FORGERIES[forgery]
    posted = {"address": CUSTOMER_BTC}
    token_field = await form_token(client, refund_path)
    if with_token:
        posted[csrf.FIELD] = token_field
    response = await client.post(refund_path, data=posted, headers=headers)
    assert response.status == 403
    assert response.content_type == "text/html"
    assert "This form was refused" in await response.text()
    refund_token = refund_path.rsplit("/", 1)[1]
    assert (await service.by_refund_token(refund_token)).invoice.refund_address is None


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_cross_site_confirm_post_is_refused(
    client: Client, merchant: Merchant, service: InvoiceService, forgery: str
) -> None:
    """The invoice page's confirm form refuses cross-site posts the same way; nothing changes."""
    created = await create(client, merchant, f"csrf-{forgery}", timer=False)
    path = f"/invoice/{token_of(created)}"
    headers, with_token = FORGERIES[forgery]
    posted = {"sender_currency": "BTC", "email": "thief@example.com"}
    token_field = await form_token(client, path)
    if with_token:
        posted[csrf.FIELD] = token_field
    response = await client.post(path, data=posted, headers=headers)
    assert response.status == 403
    invoice = await stored(service, created["id"])
    assert (invoice.address, invoice.email) == (None, None)


async def test_form_token_must_match_the_browsers_cookie(
    client: Client, refund_path: str, service: InvoiceService
) -> None:
    """A token from another browser (or without the cookie) is refused; the right pair passes."""
    mine = await form_token(client, refund_path)
    theirs = "A" * 43
    response = await client.post(refund_path, data={"address": CUSTOMER_BTC, csrf.FIELD: theirs})
    assert response.status == 403
    client.session.cookie_jar.clear()
    response = await client.post(refund_path, data={"address": CUSTOMER_BTC, csrf.FIELD: mine})
    assert response.status == 403
    # Our own page posts with `Origin: null` (Referrer-Policy: no-referrer) and the cookie.
    client.session.cookie_jar.clear()  # the 403 page gave this "browser" a new token
    response = await client.post(
        refund_path,
        data={"address": CUSTOMER_BTC, csrf.FIELD: mine},
        headers={"Origin": "null", "Cookie": f"{csrf.COOKIE}={mine}"},
        allow_redirects=False,
    )
    assert response.status == 303
    refund_token = refund_path.rsplit("/", 1)[1]
    assert (await service.by_refund_token(refund_token)).invoice.refund_address == CUSTOMER_BTC


async def test_same_origin_post_passes(
    client: Client, merchant: Merchant, service: InvoiceService
) -> None:
    """A post naming this site (Origin or Referer) with the right token is accepted."""
    created = await create(client, merchant, "same-origin", timer=False)
    path = f"/invoice/{token_of(created)}"
    own = str(client.make_url("/")).rstrip("/")
    posted = {
        "sender_currency": "BTC",
        "email": "buyer@example.com",
        csrf.FIELD: await form_token(client, path),
    }
    response = await client.post(
        path, data=posted, headers={"Origin": own, "Referer": own + path}, allow_redirects=False
    )
    assert response.status == 303
    assert (await stored(service, created["id"])).email == "buyer@example.com"


async def test_form_cookie_is_same_site_and_http_only(client: Client, merchant: Merchant) -> None:
    """The anti-forgery cookie is never sent by a cross-site post, nor read by scripts."""
    created = await create(client, merchant, "cookie", timer=False)
    response = await client.get(f"/invoice/{token_of(created)}")
    cookie = response.cookies[csrf.COOKIE]
    assert cookie["samesite"] == "Lax"  # explicit Lax: no cross-site POST carries it
    assert cookie["httponly"]
    assert cookie["path"] == "/"


async def test_cross_site_json_confirm_is_refused(
    client: Client, merchant: Merchant, service: InvoiceService
) -> None:
    """The public JSON confirm refuses a browser naming another site (403 JSON)."""
    created = await create(client, merchant, "json-csrf", timer=False)
    response = await client.post(
        f"/api/v2/public/invoices/{token_of(created)}/confirm",
        data=json.dumps({"sender_currency": "BTC", "email": "thief@example.com"}),
        headers={"Content-Type": "application/json", "Origin": "https://evil.example"},
    )
    assert response.status == 403
    assert await response.json() == {"error": "Cross-site request refused", "code": "cross_site"}
    assert (await stored(service, created["id"])).address is None


# --------------------------------------------------------------------------- the e-mail


async def test_email_given_at_confirmation_cannot_be_changed(
    client: Client, merchant: Merchant, service: InvoiceService, redis: aioredis.Redis
) -> None:
    """After confirmation another e-mail is refused (JSON and form); the first one stays."""
    created = await create(client, merchant, "email-fixed", timer=False)
    url = f"/api/v2/public/invoices/{token_of(created)}/confirm"
    headers = {"Content-Type": "application/json"}
    first = {"sender_currency": "BTC", "email": "buyer@example.com"}
    assert (await client.post(url, data=json.dumps(first), headers=headers)).status == 200
    response = await client.post(
        url, data=json.dumps({"email": "thief@example.com"}), headers=headers
    )
    assert response.status == 400
    assert (await response.json())["errors"]["code"] == "invalid_choice"
    path = f"/invoice/{token_of(created)}"
    await client.get(path)  # no e-mail form on the page any more; post as if it had one
    jar = client.session.cookie_jar.filter_cookies(client.make_url(path))
    posted = {"email": "thief@example.com", csrf.FIELD: jar[csrf.COOKIE].value}
    response = await client.post(path, data=posted)
    assert response.status == 409
    assert "already been given" in await response.text()
    assert (await stored(service, created["id"])).email == "buyer@example.com"


async def test_mail_without_refund_token_links_no_page(
    client: Client, merchant: Merchant, ingest: Ingest, service: InvoiceService
) -> None:
    """A mail recorded before refund tokens existed never links the invoice token as refund page."""
    created = await underpaid(client, merchant, ingest, "legacy-mail")
    legacy = replace(await stored(service, created["id"]), refund_token=None)
    record = MailRecord(EmailKind.PAYBACK_GUIDELINE, "underpaid", "BTC", "1", "0.5", 0)
    rendered = render(legacy, record, "http://coinvoice.test")
    for body in (rendered.text, rendered.html):
        assert "/refund/" not in body and legacy.token not in body
        assert "contact the shop" in body
