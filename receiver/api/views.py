"""JSON views of an invoice for the merchant's create answer and the customer's page."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from worker.domain import machine
from worker.domain.currencies import RateProvider, crypto_codes, quote
from worker.domain.machine import remaining_amount
from worker.domain.models import Invoice, Quote
from worker.domain.money import fmt8
from worker.domain.prices import RatesUnavailable

# The failure texts of spec §5 are written for merchants; the customer's page says the
# same in plain words and tells them what happens next.
_CUSTOMER_ERRORS = {
    machine.NOT_PAID: "The time to pay ran out before a payment arrived. "
    "Please do not send anything to this address any more.",
    machine.PROCESSING_TOO_LONG: "Your payment was not confirmed by the network in time. "
    "We will e-mail you how to get it refunded.",
    machine.TIMER_UNDERPAID: "The time to pay ran out and less than the requested amount "
    "arrived. We will e-mail you how to get the payment back.",
    machine.UNDERPAID: "Less than the requested amount arrived. "
    "We will e-mail you how to get the payment back.",
    machine.FLAGGED: "Your payment could not be accepted after a compliance check. "
    "We will e-mail you how to claim a refund.",
    machine.CANCELLED: "This invoice was cancelled. If you paid anything, "
    "we will e-mail you how to get it back.",
}


def customer_error(error: str) -> str | None:
    """Why the invoice failed, in words for the customer; None while it has not failed."""
    if not error:
        return None
    return _CUSTOMER_ERRORS.get(error, f"The payment failed: {error}")


def _seconds_left(invoice: Invoice, now: int) -> int | None:
    return None if invoice.expires_at is None else max(0, invoice.expires_at - now)


def invoice_url(base_url: str, invoice: Invoice) -> str:
    return f"{base_url}/invoice/{invoice.token}"


def created(invoice: Invoice, base_url: str, now: int) -> dict[str, Any]:
    """The answer of `invoices/create` (spec §6)."""
    return {
        "id": invoice.id,
        "url": invoice_url(base_url, invoice),
        "foreign_id": invoice.foreign_id,
        "address": invoice.address.address if invoice.address else None,
        "title": invoice.title,
        "status": invoice.status.value,
        "currency": invoice.currency,
        "amount": fmt8(invoice.amount),
        "sender_currency": invoice.sender_currency,
        "sender_amount": fmt8(invoice.sender_amount) if invoice.sender_amount is not None else None,
        "fixed_at": invoice.fixed_at,
        "release_at": invoice.expires_at,
        "seconds_left": _seconds_left(invoice, now),
    }


def offers(invoice: Invoice, rates: RateProvider) -> list[Quote]:
    """What the customer may pay in: current rates (type 1), fixed quotes (type 2), or the one.

    Raises `RatesUnavailable` when a type 1 invoice needs prices that are too old.
    """
    if invoice.sender_amount is not None and invoice.sender_currency is not None:
        return [Quote(invoice.sender_currency, invoice.sender_amount, invoice.rate or Decimal(0))]
    if invoice.quotes:
        return list(invoice.quotes)
    codes = [invoice.sender_currency] if invoice.sender_currency else crypto_codes(rates)
    return [quote(rates, invoice.currency, invoice.amount, code) for code in codes]


def _offers(invoice: Invoice, rates: RateProvider) -> tuple[list[dict[str, str]], bool]:
    """The offers as JSON, and whether prices were unavailable for them."""
    if invoice.status.is_final:
        return [], False
    try:
        return [
            {"currency": q.currency, "amount": fmt8(q.amount)} for q in offers(invoice, rates)
        ], False
    except RatesUnavailable:
        return [], True


def public(invoice: Invoice, rates: RateProvider, now: int) -> dict[str, Any]:
    """The customer's view (`GET /api/v2/public/invoices/{token}`): nothing secret.

    `prices_unavailable` is true while a type 1 invoice cannot show what to pay
    because the exchange rates are too old (spec §11); `offers` is then empty.
    """
    offered, prices_unavailable = _offers(invoice, rates)
    return {
        "title": invoice.title,
        "description": invoice.description,
        "currency": invoice.currency,
        "amount": fmt8(invoice.amount),
        "invoice_type": invoice.invoice_type,
        "type": invoice.payment_type.value,
        "status": invoice.status.value,
        "error": invoice.error,
        "error_text": customer_error(invoice.error),
        "email": invoice.email,
        "sender_currency": invoice.sender_currency,
        "sender_amount": fmt8(invoice.sender_amount) if invoice.sender_amount is not None else None,
        "remaining_amount": fmt8(remaining_amount(invoice)),
        "address": invoice.address.address if invoice.address else None,
        "tag": invoice.address.tag if invoice.address else None,
        "fixed_at": invoice.fixed_at,
        "expires_at": invoice.expires_at,
        "seconds_left": _seconds_left(invoice, now),
        "offers": offered,
        "prices_unavailable": prices_unavailable,
        "transactions": [
            {
                "amount": fmt8(tx.amount),
                "status": tx.status.value,
                "confirmations": tx.confirmations,
                "txid": tx.txid,
            }
            for tx in invoice.transactions
        ],
        "refund_address": invoice.refund_address,
        "url_success": invoice.url_success if invoice.status.value == "confirmed" else None,
        "url_failed": invoice.url_failed if invoice.status.value == "failed" else None,
    }
