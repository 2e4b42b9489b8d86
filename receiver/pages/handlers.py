"""The customer's hosted pages (spec §7): the invoice page and the refund page.

Server-rendered HTML (jinja2, autoescaping on: titles, descriptions, e-mails
and addresses come from merchants and customers). Everything works as plain
HTML forms that post back and redirect (POST, then 303 to the GET), so a
customer without JavaScript can still pay; `static/invoice.js` only adds the
live parts — the countdown, and status updates by polling the public JSON
(`GET /api/v2/public/invoices/{token}`).

Why polling rather than server-sent events: invoice changes are committed by
workers into Redis with no notification channel, so an SSE endpoint would
itself poll Redis while holding one connection per open page on a receiver.
A short poll of the existing JSON endpoint works behind any load balancer,
keeps receivers stateless and lets shutdown drain quickly; the page pauses
it while hidden and backs off on errors.

Every page answer carries a strict Content-Security-Policy (no inline script
or style; the QR code is inline SVG markup, which needs no `img-src`), and
`Referrer-Policy: no-referrer`, because the page URL holds the invoice token
and must not leak to the merchant's `url_success` / `url_failed` or anywhere
else. Errors on these routes are HTML pages, never the API's JSON.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from functools import cache, wraps
from pathlib import Path
from typing import Any

import jinja2
import segno
from aiohttp import web
from markupsafe import Markup
from pydantic import ValidationError
from redis.exceptions import RedisError

from receiver import appkeys
from receiver.accesslog import route_pattern
from receiver.api import views
from receiver.api.errors import ApiError, unavailable
from receiver.api.requests import describe_errors, public_rate_limit
from receiver.api.schemas import ConfirmInvoice, RefundAddress
from receiver.pages import csrf
from worker.domain.addresses import (
    NoAddressAvailable,
    canonical_address,
    payment_uri,
    validate_address,
)
from worker.domain.currencies import FileRateProvider, UnknownCurrency
from worker.domain.machine import DomainError, InvalidState, remaining_amount
from worker.domain.models import Invoice
from worker.domain.prices import RatesUnavailable
from worker.logs import get_logger
from worker.services.invoices import ConcurrentModification, InvoiceNotFound

log = get_logger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
STATIC_PREFIX = "/static"
# How often an open invoice page polls the public JSON while the invoice is live
# (milliseconds). A customer waits at most this long to see a change; each open
# page costs one cheap request per interval, well under the public rate limit.
POLL_MS = 2000
# Without JavaScript the page reloads itself this often while a payment is
# awaited (seconds); only where no form is on screen, so nothing typed is lost.
NOSCRIPT_REFRESH_SECONDS = 15
# Versioned static URLs (`?v=<content hash>`) never change content, so they may be
# cached for a year; unversioned ones only briefly.
STATIC_MAX_AGE_SECONDS = 365 * 24 * 3600
STATIC_SHORT_MAX_AGE_SECONDS = 300

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        # The QR code is inline <svg> markup, not an image: no data: or blob: needed.
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "object-src 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # The token in the URL is the key to the invoice: never send it as a referrer.
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Pages show deposit addresses and the customer's e-mail: keep them out of caches.
    "Cache-Control": "no-store",
}

# What the customer reads for each status: a heading and a line under it.
STATUS_TEXTS: dict[str, tuple[str, str]] = {
    "created": ("Choose how to pay", "Pick a currency. The amount is fixed when you continue."),
    "pending": ("Waiting for your payment", "Send the exact amount to the address below."),
    "processing": (
        "Payment received",
        "We have seen your payment. The network is confirming it; this page updates by itself.",
    ),
    "confirmed": ("Payment confirmed", "Thank you! Your payment is complete."),
    "failed": ("Payment failed", ""),
}
# What the customer reads while the exchange rates are too old to quote (spec §11).
PRICES_UNAVAILABLE = "Prices are unavailable for now. Please try again in a few minutes."
_CHOOSE_DETAIL = "Pick a currency and pay before the time runs out."
_PARTIAL_DETAIL = "Part of your payment has arrived. Send the rest to the same address."

# Where each currency travels, so nobody sends USDT over the wrong network.
NETWORKS = {
    "BTC": "Bitcoin",
    "BCH": "Bitcoin Cash",
    "LTC": "Litecoin",
    "ETH": "Ethereum",
    "USDTT": "Tron (TRC-20)",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --------------------------------------------------------------------------- rendering


@cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("receiver.pages", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _static_url(request: web.Request, filename: str) -> str:
    return str(request.app.router["static"].url_for(filename=filename))


def render(
    request: web.Request,
    template: str,
    context: Mapping[str, Any],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An HTML page with the security headers every customer page carries.

    Every page carries the anti-forgery token its forms post back (`csrf`).
    """
    form_token = csrf.token(request)
    html = (
        _templates()
        .get_template(template)
        .render(
            css=_static_url(request, "style.css"),
            js=_static_url(request, "invoice.js"),
            csrf_field=csrf.FIELD,
            csrf_token=form_token,
            **context,
        )
    )
    response = web.Response(
        text=html,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={**PAGE_HEADERS, **(headers or {})},
    )
    csrf.set_cookie(request, response, form_token)
    return response


def error_page(
    request: web.Request,
    status: int,
    heading: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return render(
        request,
        "error.html",
        {"heading": heading, "message": message, "status": status},
        status=status,
        headers=headers,
    )


def not_found_page(request: web.Request) -> web.Response:
    """The friendly 404 for an unknown token (a mistyped or truncated link)."""
    return error_page(
        request,
        404,
        "Invoice not found",
        "We could not find this invoice. Check that the link is complete, "
        "or ask the shop for a new one.",
    )


def cross_site_page(request: web.Request) -> web.Response:
    """The 403 for a form post refused as cross-site (spec §7)."""
    return error_page(
        request,
        403,
        "This form was refused",
        "For your safety this form is accepted only from its own page, in the same "
        "browser. Please open the link again and send the form from there.",
    )


def html_errors(handler: Handler) -> Handler:
    """Answer a page route's failures with HTML pages instead of the API's JSON.

    The JSON error middleware only sees the response this returns, so the
    customer never gets a JSON body or a traceback on a page route.
    """

    @wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except InvoiceNotFound:
            return not_found_page(request)
        except ApiError as exc:
            if exc.status == 429:
                return error_page(
                    request,
                    429,
                    "Too many requests",
                    "Please wait a few seconds, then reload this page.",
                    exc.headers,
                )
            return error_page(request, exc.status, "Something went wrong", _api_message(exc))
        except web.HTTPRequestEntityTooLarge:
            return error_page(request, 413, "Too much data", "That form was too large to accept.")
        except web.HTTPException:
            raise
        except RedisError as exc:
            log.warning("redis_unavailable", error=type(exc).__name__)
            return error_page(
                request,
                503,
                "Temporarily unavailable",
                "Please try again in a minute. Your invoice is safe.",
                unavailable().headers,
            )
        except Exception:
            log.exception("page_failed", route=route_pattern(request), method=request.method)
            return error_page(
                request,
                500,
                "Something went wrong",
                "Please try again in a minute. Your invoice is safe.",
            )

    return wrapped


def _api_message(exc: ApiError) -> str:
    text = exc.body.get("error")
    return text if isinstance(text, str) else "Please try again."


# --------------------------------------------------------------------------- invoice page


def _display_amount(wire: str, precision: int) -> str:
    """An amount for reading: the currency's decimals, more only where it has more."""
    amount = Decimal(wire)
    quantum = Decimal(1).scaleb(-precision)
    if amount == amount.quantize(quantum):
        return f"{amount.quantize(quantum):f}"
    return f"{amount.normalize():f}"


def _precision(rates: FileRateProvider, code: str) -> int:
    try:
        return rates.currency(code).precision
    except UnknownCurrency:
        return 8


def _uri_scheme(rates: FileRateProvider, code: str) -> str | None:
    try:
        return rates.currency(code).uri_scheme
    except UnknownCurrency:
        return None


def _qr_svg(payload: str) -> Markup:
    """The QR code as inline SVG markup (segno's own output from our data, so safe)."""
    code = segno.make(payload, error="m")
    svg = code.svg_inline(scale=1, border=4, omitsize=True, svgclass="qr-code", lineclass=None)
    return Markup(svg)  # noqa: S704 - segno's markup of an address we allocated, not user input


def _payment(invoice: Invoice, rates: FileRateProvider) -> dict[str, Any] | None:
    """Where and how much to pay, with the QR code; None before an address is assigned."""
    if invoice.address is None or invoice.sender_amount is None:
        return None
    currency = invoice.address.currency
    remaining = remaining_amount(invoice)
    # After a part payment (instalments) the customer pays what is still missing.
    partial = Decimal(0) < remaining < invoice.sender_amount
    amount = remaining if partial else invoice.sender_amount
    try:
        uri = payment_uri(_uri_scheme(rates, currency), invoice.address.address, amount)
    except ValueError:
        uri = invoice.address.address
    wallet_uri = uri if uri != invoice.address.address else None
    return {
        "currency": currency,
        "network": NETWORKS.get(currency, currency),
        "address": invoice.address.address,
        "tag": invoice.address.tag,
        "amount": f"{amount:f}",
        "partial": partial,
        "qr": _qr_svg(uri),
        "wallet_uri": wallet_uri,
    }


def _conditions(public: Mapping[str, Any]) -> dict[str, bool]:
    """The named conditions `data-needs` refers to; static/invoice.js computes the same."""
    seconds_left = public["seconds_left"]
    paid = bool(public["transactions"])
    return {
        "timer": seconds_left is not None and seconds_left > 0,
        "timeup": seconds_left == 0,
        "open": seconds_left is None or seconds_left > 0,
        "payments": paid,
        "refund": paid and public["refund_address"] is None,
    }


def _shown(status: str, conditions: Mapping[str, bool]) -> Callable[[str, str], bool]:
    """Whether an element with `data-when`/`data-needs` starts visible (JS keeps it so)."""

    def shown(when: str, needs: str = "") -> bool:
        return status in when.split() and all(conditions[name] for name in needs.split())

    return shown


def _minutes_seconds(seconds: int | None) -> str:
    if seconds is None:
        return ""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


async def _invoice_context(
    request: web.Request,
    invoice: Invoice,
    *,
    form: Mapping[str, str] | None = None,
    error: str | None = None,
    field_errors: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    service = request.app[appkeys.SERVICE]
    rates = request.app[appkeys.RATES]
    public = views.public(invoice, await service.prices.current(), service.now())
    status = public["status"]
    payment = _payment(invoice, rates)
    conditions = _conditions(public)
    statuses = dict(STATUS_TEXTS)
    if payment is None:
        statuses["pending"] = (STATUS_TEXTS["pending"][0], _CHOOSE_DETAIL)
    elif payment["partial"]:
        statuses["pending"] = (STATUS_TEXTS["pending"][0], _PARTIAL_DETAIL)
    offers = [
        {
            "currency": offer["currency"],
            "network": NETWORKS.get(offer["currency"], offer["currency"]),
            "amount": offer["amount"],
        }
        for offer in public["offers"]
    ]
    chosen = (form or {}).get("sender_currency") or (
        offers[0]["currency"] if len(offers) == 1 else ""
    )
    email = (form or {}).get("email", public["email"] or "")
    live = not invoice.status.is_final
    return {
        "inv": public,
        "amount_display": _display_amount(public["amount"], _precision(rates, invoice.currency)),
        "statuses": statuses,
        "status_heading": statuses[status][0],
        "status_detail": public["error_text"] if status == "failed" else statuses[status][1],
        "countdown": _minutes_seconds(public["seconds_left"]),
        "shown": _shown(status, conditions),
        "payment": payment,
        "choose": payment is None and live,
        "offers": offers,
        "fixed_rates": invoice.invoice_type == 2,
        # Type 1 while the exchange rates are too old: no amounts to offer (spec §11).
        "prices_unavailable": public["prices_unavailable"],
        "prices_unavailable_text": PRICES_UNAVAILABLE,
        "chosen": chosen,
        "email": email,
        "email_required": invoice.email is None,
        "ask_email": payment is not None and invoice.email is None and live,
        "error": error,
        "field_errors": field_errors or {},
        "status_url": str(request.app.router["public_invoice"].url_for(token=invoice.token)),
        "poll_ms": POLL_MS,
        # Meta refresh only where no form could lose what the customer typed.
        "noscript_refresh": NOSCRIPT_REFRESH_SECONDS
        if live and payment is not None and invoice.email is not None
        else None,
    }


async def invoice_page(request: web.Request) -> web.Response:
    """`GET /invoice/{token}`: the page the merchant sends the customer to."""
    await public_rate_limit(request)
    stored = await request.app[appkeys.SERVICE].by_token(request.match_info["token"])
    return render(request, "invoice.html", await _invoice_context(request, stored.invoice))


def _text_fields(posted: Mapping[str, object], *names: str) -> dict[str, str]:
    """The named form fields as stripped strings (a file upload counts as empty)."""
    return {
        name: value.strip() if isinstance(value := posted.get(name), str) else "" for name in names
    }


def _see_other(location: str) -> web.Response:
    """Post/redirect/get: a reload after a form post never posts it again."""
    return web.Response(status=303, headers={"Location": location, **PAGE_HEADERS})


# Field messages for the confirm form, in the customer's words.
_CONFIRM_FIELD_TEXT = {
    "sender_currency": "Choose a currency to pay with.",
    "email": "Enter a valid e-mail address, like name@example.com.",
}


async def invoice_confirm(request: web.Request) -> web.Response:
    """`POST /invoice/{token}`: the confirm form (currency and e-mail), without JavaScript.

    The same service call as the JSON confirm; success redirects back to the
    page, a refusal shows the page again with the reason in plain words.
    """
    await public_rate_limit(request)
    token = request.match_info["token"]
    service = request.app[appkeys.SERVICE]
    posted = await request.post()
    if csrf.refused(request, posted):
        return cross_site_page(request)
    form = _text_fields(posted, "sender_currency", "email")
    stored = await service.by_token(token)
    invoice = stored.invoice

    async def again(status: int, error: str | None = None, **fields: str) -> web.Response:
        context = await _invoice_context(
            request, invoice, form=form, error=error, field_errors=fields
        )
        return render(request, "invoice.html", context, status=status)

    try:
        body = ConfirmInvoice.model_validate({k: v or None for k, v in form.items()})
    except ValidationError as exc:
        fields = {
            name: _CONFIRM_FIELD_TEXT.get(name, text) for name, text in describe_errors(exc).items()
        }
        return await again(400, None, **fields)
    if invoice.address is None and not (body.sender_currency or invoice.sender_currency):
        return await again(400, None, sender_currency=_CONFIRM_FIELD_TEXT["sender_currency"])
    if body.email is None and invoice.email is None:
        return await again(400, None, email=_CONFIRM_FIELD_TEXT["email"])
    try:
        await service.confirm(token, body.sender_currency, body.email)
    except InvalidState:
        invoice = (await service.by_token(token)).invoice
        return await again(409, "This invoice can no longer be paid. See its status below.")
    except DomainError as exc:
        return await again(409, exc.message)
    except NoAddressAvailable:
        log.error("no_deposit_address", currency=body.sender_currency)
        return await again(
            503, "We cannot hand out a payment address right now. Please try again in a minute."
        )
    except RatesUnavailable:
        return await again(503, PRICES_UNAVAILABLE)
    except ConcurrentModification:
        return await again(503, "The invoice was busy. Please try again.")
    return _see_other(request.path)


# --------------------------------------------------------------------------- refund page


def _refund_context(
    request: web.Request,
    invoice: Invoice,
    *,
    address: str = "",
    error: str | None = None,
    notice: str | None = None,
) -> dict[str, Any]:
    rates = request.app[appkeys.RATES]
    currency = invoice.sender_currency
    return {
        "title": invoice.title,
        "amount_display": _display_amount(
            f"{invoice.amount:f}", _precision(rates, invoice.currency)
        ),
        "invoice_currency": invoice.currency,
        "currency": currency,
        "network": NETWORKS.get(currency, currency) if currency else None,
        "status": invoice.status.value,
        "status_heading": STATUS_TEXTS[invoice.status.value][0],
        "refund_address": invoice.refund_address,
        "address": address,
        "error": error,
        "notice": notice,
        "invoice_url": str(request.app.router["invoice_page"].url_for(token=invoice.token)),
    }


async def refund_page(request: web.Request) -> web.Response:
    """`GET /refund/{refund_token}`: where the refund and payback e-mails send the customer.

    Named by the refund token, which exists only once a refund or payback is
    owed and travels only in those e-mails: the invoice link opens no refund
    page (404), so whoever holds it cannot choose where the money goes.
    """
    await public_rate_limit(request)
    stored = await request.app[appkeys.SERVICE].by_refund_token(request.match_info["refund_token"])
    return render(request, "refund.html", _refund_context(request, stored.invoice))


async def refund_submit(request: web.Request) -> web.Response:
    """`POST /refund/{refund_token}`: store the customer's refund address, once.

    The address is checked for the network of the currency the invoice was
    paid in and stored in its canonical spelling; the same address again is a
    harmless repeat, a different one is refused politely.
    """
    await public_rate_limit(request)
    token = request.match_info["refund_token"]
    service = request.app[appkeys.SERVICE]
    posted = await request.post()
    if csrf.refused(request, posted):
        return cross_site_page(request)
    typed = _text_fields(posted, "address")["address"]
    invoice = (await service.by_refund_token(token)).invoice
    currency = invoice.sender_currency

    def again(status: int, error: str) -> web.Response:
        context = _refund_context(request, invoice, address=typed, error=error)
        return render(request, "refund.html", context, status=status)

    if currency is None:
        return again(
            409, "No payment currency was chosen for this invoice, so nothing can be refunded."
        )
    if invoice.refund_address is not None and invoice.refund_address != _canonical(currency, typed):
        return again(409, _ALREADY_STORED)
    try:
        RefundAddress.model_validate({"address": typed})
    except ValidationError:
        return again(400, f"Enter your {currency} address.")
    if not validate_address(currency, typed):
        network = NETWORKS.get(currency, currency)
        return again(
            400,
            f"This is not a valid {currency} address on the {network} network. "
            "Check it and try again.",
        )
    address = canonical_address(currency, typed)
    if invoice.address is not None and address == invoice.address.address:
        return again(
            400, "This is the invoice's payment address. Enter an address of your own wallet."
        )
    try:
        await service.set_refund_address(token, address)
    except DomainError:
        # Another submission got there first (a second tab, a double click).
        invoice = (await service.by_refund_token(token)).invoice
        return again(409, _ALREADY_STORED)
    except ConcurrentModification:
        return again(503, "The invoice was busy. Please try again.")
    return _see_other(request.path)


_ALREADY_STORED = (
    "A refund address is already stored for this invoice, and it can be set only once. "
    "If it needs to change, please contact the shop."
)


def _canonical(currency: str, address: str) -> str | None:
    try:
        return canonical_address(currency, address)
    except ValueError:
        return None


# --------------------------------------------------------------------------- wiring


async def _static_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Cache headers for static files: forever when the URL carries the content hash."""
    if not request.path.startswith(STATIC_PREFIX + "/") or response.status != 200:
        return
    max_age = STATIC_MAX_AGE_SECONDS if "v" in request.query else STATIC_SHORT_MAX_AGE_SECONDS
    response.headers["Cache-Control"] = f"public, max-age={max_age}" + (
        ", immutable" if "v" in request.query else ""
    )
    response.headers["X-Content-Type-Options"] = "nosniff"


def setup_page_routes(app: web.Application) -> None:
    """The hosted pages, the confirm and refund forms, and their static files."""
    app.add_routes(
        [
            web.get("/invoice/{token}", html_errors(invoice_page), name="invoice_page"),
            web.post("/invoice/{token}", html_errors(invoice_confirm), name="invoice_confirm"),
            web.get("/refund/{refund_token}", html_errors(refund_page), name="refund_page"),
            web.post("/refund/{refund_token}", html_errors(refund_submit), name="refund_submit"),
            # Static files need no rate limit: no Redis behind them, and cached for a year.
            web.static(STATIC_PREFIX, STATIC_DIR, name="static", append_version=True),
        ]
    )
    app.on_response_prepare.append(_static_headers)
