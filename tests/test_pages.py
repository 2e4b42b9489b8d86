"""The hosted invoice and refund pages (spec §7), end to end in headless Chromium.

Each test creates invoices through the merchant API, opens the customer's
page in a phone-sized browser, and drives it like a customer; processing
callbacks go through the receiver and the in-process ingest loop, and the
page must follow them live. Screenshots of every state land in
test-artifacts/screenshots/.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import Browser, Page, async_playwright, expect

from receiver import appkeys
from receiver.app import create_app
from tests.browser import (
    CHROMIUM_ARGS,
    DESKTOP,
    PHONE,
    Live,
    ensure_chromium,
    live_receiver,
    poll_now,
    screenshot,
)
from tests.support import PROCESSING_SECRET, deposit, make_settings
from worker.domain.currencies import FileRateProvider
from worker.domain.events import TimerFired
from worker.domain.prices import Price
from worker.store import keys
from worker.store.rates import RatesLead, RedisPrices
from worker.store.redis_server import RedisServer

# One receiver, one browser and one event loop for the module: launching
# Chromium per test would cost more than the tests themselves.
pytestmark = pytest.mark.asyncio(loop_scope="module")

# Playwright waits for every condition up to this long (milliseconds); a page
# polls every 2 s, so a status change shows within about that.
WAIT_MS = 10_000
# A valid mainnet BTC address nobody allocated: the customer's own wallet.
CUSTOMER_BTC = "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"

_ids = itertools.count(1)


def foreign_id(name: str) -> str:
    return f"{name}-{next(_ids)}"


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The Debian Chromium; installed with apt when missing. A failed install fails the tests."""
    try:
        return ensure_chromium()
    except Exception as exc:  # any reason to have no browser is a failure
        pytest.fail(f"no Chromium for the browser tests: {exc}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(redis_server: RedisServer) -> AsyncIterator[Live]:
    async with live_receiver(redis_server.url) as receiver:
        yield receiver


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


class Console:
    """What the page reported: console errors (CSP violations among them) and dialogs."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []


async def _open_page(browser: Browser, console: Console, **context: Any) -> AsyncIterator[Page]:
    ctx = await browser.new_context(
        viewport=context.pop("viewport", PHONE), device_scale_factor=2, **context
    )
    ctx.set_default_timeout(WAIT_MS)
    page = await ctx.new_page()
    # A controllable clock (flowing normally) lets tests fire the next poll at once.
    await page.clock.install()
    page.on("console", lambda m: console.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.errors.append(str(e)))
    page.on("requestfailed", lambda r: console.errors.append(f"request failed: {r.url}"))

    def on_response(response: Any) -> None:
        # Pages answer refused forms with 4xx on purpose; scripts, styles and the
        # status JSON must never fail.
        if response.status >= 400 and any(p in response.url for p in ("/static/", "/api/")):
            console.errors.append(f"{response.status} {response.url}")

    page.on("response", on_response)

    async def on_dialog(dialog: Any) -> None:
        console.dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    yield page
    await ctx.close()


@pytest.fixture
def console() -> Iterator[Console]:
    """Every page of a test must finish without console errors and without dialogs."""
    seen = Console()
    yield seen
    # Refused forms and unknown tokens are answered 4xx on purpose; Chromium logs each.
    expected = re.compile(r"^Failed to load resource: the server responded with a status of 4\d\d")
    errors = [e for e in seen.errors if not expected.match(e)]
    assert errors == [], errors
    assert seen.dialogs == [], seen.dialogs


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser, console: Console) -> AsyncIterator[Page]:
    """A fresh phone-sized browser context (no cookies, no cache) and its page."""
    async for opened in _open_page(browser, console):
        yield opened


def invoice_url(live: Live, token: str) -> str:
    return f"{live.base}/invoice/{token}"


def token_of(created: dict[str, Any]) -> str:
    return str(created["url"]).rsplit("/", 1)[1]


async def mark_no_reload(page: Page) -> None:
    """Leave a marker in the document: a reload or navigation would lose it."""
    await page.evaluate("window.__sameDocument = true")


async def assert_not_reloaded(page: Page) -> None:
    assert await page.evaluate("window.__sameDocument === true"), "the page was reloaded"


async def assert_fits_phone(page: Page) -> None:
    """Nothing wider than the viewport: no sideways scrolling on a phone."""
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"page is {overflow}px wider than the viewport"


async def expect_payment_shown(page: Page, live: Live, token: str, currency: str) -> dict[str, Any]:
    """The address, the exact amount, copy buttons and the QR code; returns the public JSON."""
    await expect(page.locator("#pay-address")).to_be_visible()
    public = await live.public(token)
    assert public["status"] == "pending" and public["sender_currency"] == currency
    await expect(page.locator("#pay-address")).to_have_text(public["address"])
    await expect(page.locator("#pay-amount")).to_have_text(public["sender_amount"])
    await expect(page.get_by_role("button", name="Copy address")).to_be_visible()
    await expect(page.get_by_role("button", name="Copy amount")).to_be_visible()
    await expect(
        page.get_by_role("img", name="QR code with the address and amount")
    ).to_be_visible()
    assert await page.locator("#qr svg path").count() == 1
    return public


async def pay_and_watch(
    page: Page, live: Live, public: dict[str, Any], shots: str, real_time: bool = False
) -> None:
    """Pay the invoice through processing callbacks; the page follows without reloading.

    With `real_time` the page's own poll interval runs its course; otherwise
    its clock is moved to the next poll.
    """
    await mark_no_reload(page)
    seen = deposit(
        public["address"],
        public["sender_amount"],
        tx_id=next(_ids),
        currency=public["sender_currency"],
    )
    await live.processing(seen)
    if not real_time:
        await poll_now(page)
    await expect(page.locator("#status-text")).to_have_text("Payment received")
    await expect(page.locator("#pay")).to_be_hidden()
    await expect(page.locator("#countdown")).to_be_hidden()
    await expect(page.locator("#payments-list li")).to_contain_text("waiting for confirmations")
    await screenshot(page, f"{shots}-3-processing")
    await live.processing({**seen, "status": "confirmed"})
    if not real_time:
        await poll_now(page)
    await expect(page.locator("#status-text")).to_have_text("Payment confirmed")
    await expect(page.locator("#payments-list li")).to_contain_text("confirmed")
    await assert_not_reloaded(page)
    await screenshot(page, f"{shots}-4-confirmed")


# --------------------------------------------------------------------------- paying


async def test_type1_customer_chooses_currency_confirms_and_pays(live: Live, page: Page) -> None:
    """Type 1: choose a currency at the current rate, e-mail prefilled, then pay live."""
    fid = foreign_id("type1")
    created = await live.create(
        fid,
        timer=False,
        email_user="ann@example.com",
        url_success="https://shop.example/thanks?order=1",
    )
    token = token_of(created)
    await page.goto(invoice_url(live, token))
    await expect(page.get_by_role("heading", name="Green tea, 250 g")).to_be_visible()
    await expect(page.locator("#invoice-amount")).to_have_text("106.75 EUR")
    await expect(page.locator("#status-text")).to_have_text("Choose how to pay")
    await expect(page.locator("#countdown")).to_be_hidden()  # type 1: no timer before confirm
    await expect(page.get_by_label("Your e-mail")).to_have_value("ann@example.com")
    offers = page.locator(".offer")
    await expect(offers).to_have_count(5)
    ltc_offer = (await live.public(token))["offers"][2]
    assert ltc_offer["currency"] == "LTC"
    await expect(offers.nth(2)).to_contain_text(ltc_offer["amount"])
    await assert_fits_phone(page)
    await screenshot(page, "type1-1-choose")

    await page.get_by_role("radio", name=re.compile("^LTC")).check()
    await page.get_by_role("button", name="Continue to payment").click()
    public = await expect_payment_shown(page, live, token, "LTC")
    assert public["sender_amount"] == ltc_offer["amount"]  # the rate did not move
    await expect(page.locator("#countdown")).to_have_text(re.compile(r"^1[45]:\d\d$"))
    wallet = page.get_by_role("link", name="Open in wallet app")
    address, amount = public["address"], public["sender_amount"].rstrip("0")
    await expect(wallet).to_have_attribute("href", f"litecoin:{address}?amount={amount}")
    await assert_fits_phone(page)
    await screenshot(page, "type1-2-pending")

    await pay_and_watch(page, live, public, "type1", real_time=True)
    success = page.get_by_role("link", name="Return to the shop")
    await expect(success).to_have_attribute("href", "https://shop.example/thanks?order=1")
    await expect(success).to_have_attribute("rel", "noreferrer")
    assert (await live.status(fid))["status"] == "confirmed"


async def test_type2_fixed_amounts_countdown_and_keyboard_only(live: Live, page: Page) -> None:
    """Type 2: the countdown runs from creation; a keyboard alone picks BCH and confirms."""
    created = await live.create(foreign_id("type2"))
    token = token_of(created)
    await page.goto(invoice_url(live, token))
    await expect(page.locator("#status-text")).to_have_text("Waiting for your payment")
    countdown = page.locator("#countdown")
    await expect(countdown).to_have_text(re.compile(r"^1[45]:\d\d$"))
    first = await countdown.text_content()
    await page.clock.run_for(1000)
    await expect(countdown).not_to_have_text(first or "")  # it ticks
    bch = next(o for o in (await live.public(token))["offers"] if o["currency"] == "BCH")
    await screenshot(page, "type2-1-choose")

    # Keyboard only: Tab into the radio group, arrow to the second currency,
    # Tab to the e-mail field, type, Enter submits.
    await page.locator("body").focus()
    radios = page.get_by_role("radio")
    for _ in range(10):
        await page.keyboard.press("Tab")
        if await radios.first.evaluate("el => el === document.activeElement"):
            break
    else:
        pytest.fail("Tab never reached the currency choice")
    await page.keyboard.press("ArrowDown")
    await expect(page.get_by_role("radio", name=re.compile("^BCH"))).to_be_checked()
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Your e-mail")).to_be_focused()
    await page.keyboard.type("bob@example.com")
    await page.keyboard.press("Enter")

    public = await expect_payment_shown(page, live, token, "BCH")
    assert public["sender_amount"] == bch["amount"]  # the amount fixed at creation
    assert public["email"] == "bob@example.com"
    await screenshot(page, "type2-2-pending")
    await pay_and_watch(page, live, public, "type2")
    await expect(page.get_by_role("link", name="Return to the shop")).to_be_hidden()  # no URL


async def test_type3_address_at_once_email_form_and_pay(live: Live, page: Page) -> None:
    """Type 3: address and QR from the start (USDT on Tron: bare address, no URI scheme)."""
    created = await live.create(
        foreign_id("type3"), sender_currency="USDTT", url_success="https://shop.example/ok"
    )
    token = token_of(created)
    await page.goto(invoice_url(live, token))
    public = await expect_payment_shown(page, live, token, "USDTT")
    await expect(page.get_by_text("Only USDTT on the Tron (TRC-20) network.")).to_be_visible()
    await expect(page.get_by_role("link", name="Open in wallet app")).to_have_count(0)
    await expect(page.locator(".offer")).to_have_count(0)
    await screenshot(page, "type3-1-pending")

    await page.get_by_label("Your e-mail").fill("cy@example.com")
    await page.get_by_role("button", name="Save e-mail").click()
    await expect(page.get_by_label("Your e-mail")).to_have_count(0)
    assert (await live.public(token))["email"] == "cy@example.com"
    await pay_and_watch(page, live, public, "type3")


async def test_part_payment_shows_what_is_left_to_pay(live: Live, page: Page) -> None:
    """Instalments: after a part arrives, the page asks for the rest (amount and QR code)."""
    created = await live.create(
        foreign_id("part"), sender_currency="BTC", type="good_until_expired"
    )
    token = token_of(created)
    await page.goto(invoice_url(live, token))
    public = await expect_payment_shown(page, live, token, "BTC")
    qr_before = await page.locator("#qr").inner_html()
    first = "0.00100000"
    await live.processing(deposit(public["address"], first, tx_id=next(_ids)))
    await poll_now(page)
    await expect(page.get_by_role("heading", name="Send the rest")).to_be_visible()
    await expect(page.locator("#status-detail")).to_have_text(re.compile("^Part of your payment"))
    rest = (await live.public(token))["remaining_amount"]
    assert Decimal(rest) == Decimal(public["sender_amount"]) - Decimal(first)
    await expect(page.locator("#pay-amount")).to_have_text(f"{Decimal(rest):f}")
    await expect(page.locator("#payments-list li")).to_have_count(1)
    assert await page.locator("#qr").inner_html() != qr_before
    wallet = page.get_by_role("link", name="Open in wallet app")
    await expect(wallet).to_have_attribute("href", re.compile(rf"amount={rest.rstrip('0')}$"))
    await screenshot(page, "part-paid")


async def test_pending_page_on_a_desktop(live: Live, browser: Browser, console: Console) -> None:
    """The same page on a wide screen keeps its phone-width column."""
    created = await live.create(foreign_id("desktop"), sender_currency="BTC")
    async for page in _open_page(browser, console, viewport=DESKTOP):
        await page.goto(invoice_url(live, token_of(created)))
        await expect_payment_shown(page, live, token_of(created), "BTC")
        box = await page.locator("#invoice").bounding_box()
        assert box is not None and box["width"] < 600
        await screenshot(page, "desktop-pending")


# --------------------------------------------------------------------------- failing


async def test_expired_invoice_shows_its_failure_live_and_after_reload(
    live: Live, page: Page
) -> None:
    """The timer ends with nothing paid: the page says so in plain words, live and on reload."""
    fid = foreign_id("expired")
    created = await live.create(fid, url_failed="https://shop.example/failed")
    token = token_of(created)
    await page.goto(invoice_url(live, token))
    await expect(page.locator("#countdown")).to_be_visible()
    await mark_no_reload(page)
    # What the worker's timer sweep does once the time is up (spec §5).
    await live.service.apply(created["id"], TimerFired(created["release_at"] + 3600))
    await poll_now(page)
    await expect(page.locator("#status-text")).to_have_text("Payment failed")
    reason = "The time to pay ran out before a payment arrived."
    await expect(page.locator("#status-detail")).to_contain_text(reason)
    await expect(page.locator("#countdown")).to_be_hidden()
    await expect(page.locator("#confirm-form")).to_be_hidden()
    failed = page.get_by_role("link", name="Return to the shop")
    await expect(failed).to_have_attribute("href", "https://shop.example/failed")
    await expect(page.locator("#refund-note")).to_be_hidden()  # nothing paid
    await assert_not_reloaded(page)
    await screenshot(page, "expired-1-live")

    await page.reload()
    await expect(page.locator("#status-detail")).to_contain_text(reason)
    await expect(page.locator("#confirm-form")).to_have_count(0)
    await expect(failed).to_be_visible()
    await screenshot(page, "expired-2-reloaded")
    assert (await live.status(fid))["error"] == "Timer expired. User not paid."


async def test_refund_page_stores_a_valid_address_once(live: Live, page: Page) -> None:
    """An underpaid invoice fails; the customer claims a refund and the address is stored once."""
    fid = foreign_id("refund")
    created = await live.create(fid, sender_currency="BTC")
    token = token_of(created)
    await page.goto(invoice_url(live, token))
    public = await expect_payment_shown(page, live, token, "BTC")
    await mark_no_reload(page)
    # fill_or_kill: a confirmed payment of half the amount fails the invoice at once.
    half = f"{(Decimal(public['sender_amount']) / 2).quantize(Decimal('0.00000001')):f}"
    await live.processing(
        deposit(public["address"], half, tx_id=next(_ids), status="confirmed", confirmations=3)
    )
    await poll_now(page)
    await expect(page.locator("#status-text")).to_have_text("Payment failed")
    await expect(page.locator("#status-detail")).to_contain_text(
        "Less than the requested amount arrived."
    )
    # The invoice page promises the refund link by e-mail and never shows it (spec §7).
    await expect(page.locator("#refund-note")).to_contain_text("we e-mail you a link")
    await expect(page.locator("a[href*='/refund/']")).to_have_count(0)
    await assert_not_reloaded(page)
    await screenshot(page, "refund-1-invoice-failed")

    refund_url = f"{live.base}/refund/{await live.refund_token(created['id'])}"
    await page.goto(refund_url)  # the link in the payback e-mail
    field = page.get_by_label("Your BTC address")
    await field.fill("bc1qthisisnotanaddress")
    await page.get_by_role("button", name="Save refund address").click()
    await expect(page.get_by_role("alert")).to_contain_text("This is not a valid BTC address")
    await expect(field).to_have_attribute("aria-invalid", "true")
    await assert_fits_phone(page)
    await screenshot(page, "refund-2-invalid")

    await field.fill(CUSTOMER_BTC.upper())  # bech32 in capitals is valid; stored in lower case
    await page.get_by_role("button", name="Save refund address").click()
    await expect(page.get_by_role("heading", name="Refund address saved")).to_be_visible()
    await expect(page.locator("#refund-address")).to_have_text(CUSTOMER_BTC)
    await expect(page.get_by_label("Your BTC address")).to_have_count(0)
    await screenshot(page, "refund-3-stored")
    assert (await live.status(fid))["refund_address"] == CUSTOMER_BTC

    # A second, different address (a stale tab) is refused politely; the first stays.
    other = "bc1q9vza2e8x573nczrlzms0wvx3gsqjx7vavgkx0l"
    fields, headers = await live.form_token(refund_url)
    async with live.session.post(
        refund_url, data={"address": other, **fields}, headers=headers
    ) as r:
        assert r.status == 409
        assert r.content_type == "text/html"
        assert "can be set only once" in await r.text()
    # The same address again (a double click) is a harmless repeat.
    async with live.session.post(
        refund_url,
        data={"address": CUSTOMER_BTC, **fields},
        headers=headers,
        allow_redirects=False,
    ) as r:
        assert r.status == 303
    assert (await live.status(fid))["refund_address"] == CUSTOMER_BTC
    await page.goto(invoice_url(live, token))
    await expect(page.locator("#refund-note")).to_be_hidden()


# --------------------------------------------------------------------------- safety


async def test_merchant_text_is_escaped_and_the_csp_is_strict(live: Live, page: Page) -> None:
    """Markup in title and description is shown as text; nothing runs; CSP forbids inline code."""
    title = '<script>alert("title")</script>'
    description = "<img src=x onerror=alert('description')><b>bold</b>"
    created = await live.create(foreign_id("xss"), title=title, description=description)
    response = await page.goto(invoice_url(live, token_of(created)))
    assert response is not None
    csp = response.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'"):
        assert directive in csp
    assert "unsafe-inline" not in csp
    assert response.headers["referrer-policy"] == "no-referrer"
    await expect(page.locator("#invoice-title")).to_have_text(title)
    await expect(page.locator("#invoice-description")).to_have_text(description)
    assert await page.locator("#invoice img, #invoice b, #invoice-title script").count() == 0
    html = await response.text()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "<style" not in html and " style=" not in html  # no inline style to allow
    assert re.findall(r"<script\b[^>]*>", html) == [
        f'<script src="{m}" defer>' for m in re.findall(r'<script src="([^"]+)"', html)
    ]  # every script is a file
    await screenshot(page, "xss-escaped")


async def test_pages_show_no_secrets(live: Live) -> None:
    """Neither page nor the public JSON carries a merchant key, secret or foreign id."""
    fid = foreign_id("secret-check")
    created = await live.create(fid, sender_currency="BTC")
    token = token_of(created)
    half = f"{(Decimal(created['sender_amount']) / 2).quantize(Decimal('0.00000001')):f}"
    await live.processing(
        deposit(created["address"], half, tx_id=next(_ids), status="confirmed", confirmations=1)
    )  # a payback is owed: the refund page exists
    refund = f"/refund/{await live.refund_token(created['id'])}"
    for path in (f"/invoice/{token}", refund, f"/api/v2/public/invoices/{token}"):
        async with live.session.get(live.base + path) as response:
            assert response.status == 200, path
            body = await response.text()
        for secret in (live.merchant.secret, live.merchant.key, fid, PROCESSING_SECRET):
            assert secret not in body, (path, secret)


async def test_unknown_token_is_a_friendly_html_404(live: Live, page: Page) -> None:
    """An unknown or truncated link gets an HTML page, not the API's JSON."""
    for path in ("/invoice/no-such-token", "/refund/no-such-token"):
        response = await page.goto(live.base + path)
        assert response is not None
        assert response.status == 404
        assert response.headers["content-type"].startswith("text/html")
        assert "content-security-policy" in response.headers
        await expect(page.get_by_role("heading", name="Invoice not found")).to_be_visible()
    fields, headers = await live.form_token(live.base + "/invoice/no-such-token")
    async with live.session.post(
        live.base + "/invoice/no-such-token",
        data={"sender_currency": "BTC", **fields},
        headers=headers,
    ) as posted:
        assert posted.status == 404 and posted.content_type == "text/html"
    await screenshot(page, "not-found")


async def test_rate_limited_page_is_html_with_retry_after(redis_server: RedisServer) -> None:
    """Over the public limit, a page route answers an HTML 429 page, not the API's JSON."""
    app = create_app(make_settings(redis_server.url, rate_limit_public=1))
    async with TestClient(TestServer(app)) as client:
        for _ in range(50):  # two requests within one second exceed a limit of 1/s
            response = await client.get("/invoice/no-such-token")
            if response.status == 429:
                break
        assert response.status == 429
        assert response.content_type == "text/html"
        assert response.headers["Retry-After"] == "1"
        assert "Too many requests" in await response.text()


async def test_static_files_are_versioned_and_cached(live: Live) -> None:
    """Pages link CSS and JS with a content hash, so browsers may keep them for a year."""
    created = await live.create(foreign_id("static"))
    async with live.session.get(invoice_url(live, token_of(created))) as response:
        html = await response.text()
    links = re.findall(r'(?:href|src)="(/static/[^"]+)"', html)
    assert {link.split("?")[0] for link in links} == {"/static/style.css", "/static/invoice.js"}
    for link in links:
        assert "?v=" in link
        async with live.session.get(live.base + link) as asset:
            assert asset.status == 200
            assert "immutable" in asset.headers["Cache-Control"]
            assert asset.headers["X-Content-Type-Options"] == "nosniff"


# --------------------------------------------------------------------------- without JavaScript


async def test_confirming_works_without_javascript(
    live: Live, browser: Browser, console: Console
) -> None:
    """A plain form POST confirms and redirects back to the page, which shows the address."""
    created = await live.create(foreign_id("nojs"))
    token = token_of(created)
    async for page in _open_page(browser, console, java_script_enabled=False):
        await page.goto(invoice_url(live, token))
        await expect(
            page.get_by_text("This page cannot update itself without JavaScript")
        ).to_be_visible()
        await page.get_by_role("radio", name=re.compile("^ETH")).check()
        await page.get_by_label("Your e-mail").fill("dee@example.com")
        await page.get_by_role("button", name="Continue to payment").click()
        await expect(page).to_have_url(invoice_url(live, token))
        await expect(page.locator("#pay-address")).to_have_text(
            (await live.public(token))["address"]
        )
        await expect(
            page.get_by_role("img", name="QR code with the address and amount")
        ).to_be_visible()
        await expect(page.get_by_role("button", name="Copy address")).to_be_hidden()  # needs JS
        wallet = await page.get_by_role("link", name="Open in wallet app").get_attribute("href")
        assert wallet is not None and wallet.startswith("ethereum:0x") and "?value=" in wallet
        await screenshot(page, "nojs-pending")

    # The form's own checks, as a browser without validation would post it.
    other = token_of(await live.create(foreign_id("nojs-bad")))
    url = invoice_url(live, other)
    fields, headers = await live.form_token(url)
    async with live.session.post(
        url, data={"email": "x@example.com", **fields}, headers=headers
    ) as response:
        assert response.status == 400
        assert "Choose a currency to pay with." in await response.text()
    async with live.session.post(
        url, data={"sender_currency": "BTC", "email": "nope", **fields}, headers=headers
    ) as response:
        assert response.status == 400
        assert "Enter a valid e-mail address" in await response.text()
    async with live.session.post(
        url, data={"sender_currency": "DOGE", "email": "x@example.com", **fields}, headers=headers
    ) as r:
        assert r.status == 409
        assert "Currency DOGE is not offered for this invoice." in await r.text()
    assert (await live.public(other))["address"] is None


async def test_type1_page_says_prices_are_unavailable_until_they_are_back(
    live: Live, page: Page
) -> None:
    """Live rates too old: the page says so instead of amounts, and offers them once back."""
    created = await live.create(foreign_id("no-prices"), timer=False)
    token = token_of(created)
    redis = live.app[appkeys.REDIS]
    # This receiver runs on the rates file; for this test its prices come from an empty table.
    file_prices = live.service.prices
    live.service.prices = RedisPrices(redis, FileRateProvider.load(), 120, cache_seconds=0)
    try:
        await page.goto(invoice_url(live, token))
        await expect(page.locator("#prices-unavailable")).to_have_text(
            "Prices are unavailable for now. Please try again in a few minutes."
        )
        await expect(page.get_by_role("button", name="Continue to payment")).to_have_count(0)
        await screenshot(page, "type1-prices-unavailable")

        lead = RatesLead(redis, "pages-test")
        assert await lead.take(60_000)
        now = int(time.time())
        demo = {
            "BTC": "64000",
            "BCH": "380",
            "LTC": "82",
            "ETH": "3100",
            "USDT": "1",
            "EUR": "1.08",
        }
        assert await lead.publish(
            {symbol: Price(Decimal(price), now, ("test",)) for symbol, price in demo.items()}
        )
        await poll_now(page)  # the next poll sees prices again and the page reloads
        await expect(page.locator(".offer")).to_have_count(5)
        await expect(page.get_by_role("button", name="Continue to payment")).to_be_visible()
    finally:
        live.service.prices = file_prices
        await redis.delete(keys.RATES, keys.RATES_LEADER)
