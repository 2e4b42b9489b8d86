"""The merchant API of spec §6: signed JSON requests, `{"data": ...}` answers."""

from __future__ import annotations

from aiohttp import web

from receiver import appkeys
from receiver.api import views
from receiver.api.errors import field_errors, invalid_state
from receiver.api.requests import merchant_request
from receiver.api.schemas import CreateInvoice, EmptyBody, ForeignIdBody
from worker.domain.currencies import CurrencyType, UnknownCurrency
from worker.domain.money import fmt8
from worker.domain.snapshot import snapshot
from worker.services.invoices import InvoiceRequest
from worker.store.deliveries import delivery_log, redeliver


def data(payload: object) -> web.Response:
    return web.json_response({"data": payload})


async def ping(request: web.Request) -> web.Response:
    return data({"status": "ok"})


def _check_currencies(request: web.Request, body: CreateInvoice) -> None:
    rates = request.app[appkeys.RATES]
    errors: dict[str, str] = {}
    try:
        rates.currency(body.currency)
    except UnknownCurrency:
        errors["currency"] = "Unknown currency."
    if body.sender_currency is not None:
        try:
            crypto = rates.currency(body.sender_currency).type is CurrencyType.CRYPTO
        except UnknownCurrency:
            crypto = False
        if not crypto:
            errors["sender_currency"] = "Unknown currency."
    if errors:
        raise field_errors(errors)


async def create_invoice(request: web.Request) -> web.Response:
    merchant, body = await merchant_request(request, CreateInvoice)
    _check_currencies(request, body)
    service = request.app[appkeys.SERVICE]
    invoice = await service.create(
        merchant,
        InvoiceRequest(
            foreign_id=body.foreign_id,
            title=body.title,
            currency=body.currency,
            amount=body.amount,
            timer=body.timer,
            description=body.description,
            payment_type=body.type,
            sender_currency=body.sender_currency,
            email=body.email_user,
            url_success=body.url_success,
            url_failed=body.url_failed,
        ),
    )
    base_url = request.app[appkeys.SETTINGS].base_url
    return data(views.created(invoice, base_url, service.now()))


async def cancel_invoice(request: web.Request) -> web.Response:
    merchant, _ = await merchant_request(request, EmptyBody)
    service = request.app[appkeys.SERVICE]
    invoice = await service.cancel(merchant.key, request.match_info["foreign_id"])
    return data(snapshot(invoice))


async def invoice_status(request: web.Request) -> web.Response:
    merchant, body = await merchant_request(request, ForeignIdBody)
    stored = await request.app[appkeys.SERVICE].by_foreign_id(merchant.key, body.foreign_id)
    return data(snapshot(stored.invoice))


async def callbacks_log(request: web.Request) -> web.Response:
    """Every callback sequence of an invoice with its state and attempts, oldest first."""
    merchant, body = await merchant_request(request, ForeignIdBody)
    stored = await request.app[appkeys.SERVICE].by_foreign_id(merchant.key, body.foreign_id)
    return data(await delivery_log(request.app[appkeys.REDIS], stored.invoice))


async def callbacks_redeliver(request: web.Request) -> web.Response:
    """Deliver the newest snapshot again now, with its existing sequence (dead ones too)."""
    merchant, body = await merchant_request(request, ForeignIdBody)
    service = request.app[appkeys.SERVICE]
    stored = await service.by_foreign_id(merchant.key, body.foreign_id)
    sequence = await redeliver(service.store, stored.invoice, service.now())
    if not sequence:
        raise invalid_state("The invoice has no callback to redeliver yet.", "nothing_to_redeliver")
    return data({"foreign_id": body.foreign_id, "sequence": sequence, "state": "pending"})


async def accounts_list(request: web.Request) -> web.Response:
    merchant, _ = await merchant_request(request, EmptyBody)
    balances = await request.app[appkeys.SERVICE].store.balances(merchant.key)
    return data(
        [{"currency": code, "balance": fmt8(balance)} for code, balance in sorted(balances.items())]
    )


async def currencies_list(request: web.Request) -> web.Response:
    await merchant_request(request, EmptyBody)
    return data(
        [
            {"currency": c.code, "type": c.type.value, "precision": c.precision}
            for c in request.app[appkeys.RATES].currencies()
        ]
    )


async def currencies_rates(request: web.Request) -> web.Response:
    """Every crypto currency against every other currency."""
    await merchant_request(request, EmptyBody)
    # Current prices (live or the file's); stale ones answer 503 rates_unavailable.
    rates = await request.app[appkeys.SERVICE].prices.current()
    codes = [c.code for c in rates.currencies()]
    pairs = [
        {
            "currency_from": c.code,
            "currency_to": to,
            "rate": fmt8(rates.rate(c.code, to)),
        }
        for c in rates.currencies()
        if c.type is CurrencyType.CRYPTO
        for to in codes
        if to != c.code
    ]
    return data(pairs)
