"""The merchant API of spec §6: signed JSON requests, `{"data": ...}` answers."""

from __future__ import annotations

from decimal import Decimal

from aiohttp import web

from receiver import appkeys
from receiver.api import views
from receiver.api.errors import field_errors, invalid_state
from receiver.api.requests import merchant_request
from receiver.api.schemas import CreateInvoice, EmptyBody, ForeignIdBody
from worker.domain.currencies import Currency, CurrencyType, FileRateProvider, UnknownCurrency
from worker.domain.money import ZERO, fmt8
from worker.domain.snapshot import snapshot
from worker.services.invoices import InvoiceRequest
from worker.store.deliveries import delivery_log, redeliver


def data(payload: object) -> web.Response:
    return web.json_response({"data": payload})


async def ping(request: web.Request) -> web.Response:
    """The plain body `OK`, as the public reference answers: client libraries compare it."""
    return web.Response(text="OK")


def _offered(rates: FileRateProvider, code: str) -> Currency | None:
    """The currency if new invoices may use it (configured and not hidden)."""
    try:
        currency = rates.currency(code)
    except UnknownCurrency:
        return None
    return currency if currency.visible else None


def _amount_error(amount: Decimal, currency: Currency) -> str | None:
    """Why `amount` does not fit the currency: too many decimals, or under its minimum."""
    if amount != amount.quantize(Decimal(1).scaleb(-currency.precision)):
        return f"Amount must have at most {currency.precision} decimals."
    if amount < currency.minimum:
        return (
            f"The amount is too small. The minimum amount is {currency.minimum:f} {currency.code}."
        )
    return None


def _check_currencies(request: web.Request, body: CreateInvoice) -> None:
    rates = request.app[appkeys.RATES]
    errors: dict[str, str] = {}
    currency = _offered(rates, body.currency)
    if currency is None:
        errors["currency"] = "Unknown currency."
    elif (problem := _amount_error(body.amount, currency)) is not None:
        errors["amount"] = problem
    if body.sender_currency is not None:
        sender = _offered(rates, body.sender_currency)
        if sender is None or sender.type is not CurrencyType.CRYPTO:
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
    """Every configured currency with its type and the merchant's balance, zeros included."""
    merchant, _ = await merchant_request(request, EmptyBody)
    balances = await request.app[appkeys.SERVICE].store.balances(merchant.key)
    accounts: list[dict[str, str | None]] = [
        {"currency": c.code, "type": c.type.value, "balance": fmt8(balances.pop(c.code, ZERO))}
        for c in request.app[appkeys.RATES].currencies()
    ]
    # A balance in a currency since removed from the configuration is still money held:
    # listed, with the type no longer known.
    accounts += [
        {"currency": code, "type": None, "balance": fmt8(balance)}
        for code, balance in sorted(balances.items())
    ]
    return data(accounts)
