"""The currency endpoints of the merchant API (spec §6): list, pairs and rates.

Shapes follow the public CoinsPaid v2 reference, so client libraries written
against it decode them: `currencies/list` items carry `id`, `type`, `currency`,
`minimum_amount`, the fee percents and `precision`; a pair is
`{"currency_from": {...}, "currency_to": {...}, "rate_from": "1", "rate_to"}`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from aiohttp import web

from receiver import appkeys
from receiver.api.errors import field_errors
from receiver.api.merchant import data
from receiver.api.requests import merchant_request
from receiver.api.schemas import CurrenciesFilter, PairsFilter
from worker.domain.currencies import Currency, CurrencyType, RateProvider
from worker.domain.money import fmt8

# coinvoice makes no withdrawals, so none is ever charged for.
NO_WITHDRAWAL_FEE = "0"


def percent(value: Decimal) -> str:
    """A percentage as a plain decimal string: 1 → "1", 1.50 → "1.5"."""
    return f"{value.normalize():f}"


async def currencies_list(request: web.Request) -> web.Response:
    """Every configured currency; `visible` keeps only the offered (true) or hidden (false)."""
    merchant, body = await merchant_request(request, CurrenciesFilter)
    return data(
        [
            {
                "id": c.stable_id,
                "type": c.type.value,
                "currency": c.code,
                "minimum_amount": fmt8(c.minimum),
                # What §4 charges on a confirmed invoice: the merchant's own fee.
                "deposit_fee_percent": percent(merchant.fee_percent),
                "withdrawal_fee_percent": NO_WITHDRAWAL_FEE,
                "precision": c.precision,
            }
            for c in request.app[appkeys.RATES].currencies()
            if body.visible is None or c.visible is body.visible
        ]
    )


def _side(currency: Currency, source: bool) -> dict[str, Any]:
    side: dict[str, Any] = {"currency": currency.code, "type": currency.type.value}
    if source:
        side["min_amount"] = fmt8(currency.minimum)
        if currency.type is CurrencyType.CRYPTO:
            side["min_amount_deposit_with_exchange"] = fmt8(currency.minimum)
    return side


def _known(rates: RateProvider, body: PairsFilter) -> dict[str, Currency]:
    """The offered currencies by code; a filter naming another one is a field error."""
    offered = {c.code: c for c in rates.currencies() if c.visible}
    errors: dict[str, str] = {}
    if body.currency_from is not None and body.currency_from.upper() not in offered:
        errors["currency_from"] = "The selected currency from is invalid."
    if body.currency_to is not None and body.currency_to.upper() not in offered:
        errors["currency_to"] = "The selected currency to is invalid."
    if errors:
        raise field_errors(errors)
    return offered


def pairs(rates: RateProvider, body: PairsFilter) -> list[dict[str, Any]]:
    """What a customer can pay in (offered crypto) against every other offered currency."""
    offered = _known(rates, body)
    wanted_from = body.currency_from.upper() if body.currency_from else None
    wanted_to = body.currency_to.upper() if body.currency_to else None
    return [
        {
            "currency_from": _side(source, source=True),
            "currency_to": _side(target, source=False),
            "rate_from": "1",
            "rate_to": fmt8(rates.rate(source.code, target.code)),
        }
        for source in offered.values()
        if source.type is CurrencyType.CRYPTO and wanted_from in (None, source.code)
        for target in offered.values()
        if target.code != source.code and wanted_to in (None, target.code)
    ]


async def currency_pairs(request: web.Request) -> web.Response:
    """`currencies/pairs` and `currencies/rates`: each pair with its current rate, filtered.

    The reference gives both endpoints the same shape; coinvoice prices every pair it
    lists, so one answer serves both.
    """
    _, body = await merchant_request(request, PairsFilter)
    # Current prices (live or the file's); stale ones answer 503 rates_unavailable.
    rates = await request.app[appkeys.SERVICE].prices.current()
    return data(pairs(rates, body))
