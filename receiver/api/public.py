"""The customer's JSON API behind the hosted page (spec §7): token in the URL, no signature."""

from __future__ import annotations

from aiohttp import web

from receiver import appkeys
from receiver.api import views
from receiver.api.errors import cross_site, field_errors
from receiver.api.merchant import data
from receiver.api.requests import parse_json, public_rate_limit, read_body, validate
from receiver.api.schemas import ConfirmInvoice
from receiver.pages.csrf import foreign


async def show(request: web.Request) -> web.Response:
    await public_rate_limit(request)
    service = request.app[appkeys.SERVICE]
    stored = await service.by_token(request.match_info["token"])
    return data(views.public(stored.invoice, await service.prices.current(), service.now()))


async def confirm(request: web.Request) -> web.Response:
    """Spec §7 confirm: type 1 fixes rate, address and timer; type 2 assigns the address;
    type 3 only records the e-mail.

    A browser that names another site as the caller is refused (spec §7): its
    page may not confirm for the customer. (A cross-site page cannot send a
    JSON body without a CORS preflight, which is never granted; this is the
    second lock.)
    """
    await public_rate_limit(request)
    if foreign(request):
        raise cross_site()
    body = validate(ConfirmInvoice, parse_json(request, await read_body(request)))
    service = request.app[appkeys.SERVICE]
    token = request.match_info["token"]
    stored = await service.by_token(token)
    if body.email is None and stored.invoice.email is None:
        raise field_errors({"email": "This field is required."})
    invoice = await service.confirm(token, body.sender_currency, body.email)
    return data(views.public(invoice, await service.prices.current(), service.now()))
