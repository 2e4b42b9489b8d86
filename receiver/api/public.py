"""The customer's JSON API behind the hosted page (spec §7): token in the URL, no signature."""

from __future__ import annotations

from aiohttp import web

from receiver import appkeys
from receiver.api import views
from receiver.api.errors import field_errors
from receiver.api.merchant import data
from receiver.api.requests import parse_json, public_rate_limit, read_body, validate
from receiver.api.schemas import ConfirmInvoice


async def show(request: web.Request) -> web.Response:
    await public_rate_limit(request)
    service = request.app[appkeys.SERVICE]
    stored = await service.by_token(request.match_info["token"])
    return data(views.public(stored.invoice, await service.prices.current(), service.now()))


async def confirm(request: web.Request) -> web.Response:
    """Spec §7 confirm: type 1 fixes rate, address and timer; type 2 assigns the address;
    type 3 only records the e-mail."""
    await public_rate_limit(request)
    body = validate(ConfirmInvoice, parse_json(request, await read_body(request)))
    service = request.app[appkeys.SERVICE]
    token = request.match_info["token"]
    stored = await service.by_token(token)
    if body.email is None and stored.invoice.email is None:
        raise field_errors({"email": "This field is required."})
    invoice = await service.confirm(token, body.sender_currency, body.email)
    return data(views.public(invoice, await service.prices.current(), service.now()))
