"""Every route of the receiver, in one table (the OpenAPI document is built from it too).

Each route also answers with the other trailing-slash form (`/api/v2/accounts/list/`,
`/api/v2/invoices/{foreign_id}/cancel`): client libraries written against the
public reference use both (spec §6). A redirect would not do: clients do not
re-send a signed POST body to it.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from receiver import health, metrics
from receiver.api import currencies as currencies_api
from receiver.api import merchant as merchant_api
from receiver.api import openapi
from receiver.api import processing as processing_api
from receiver.api import public as public_api
from receiver.pages import handlers as pages


def setup_routes(app: web.Application) -> None:
    app.add_routes(
        [
            web.get("/api/v2/ping", merchant_api.ping, name="ping"),
            web.post("/api/v2/invoices/create", merchant_api.create_invoice, name="create"),
            web.post(
                "/api/v2/invoices/{foreign_id}/cancel/", merchant_api.cancel_invoice, name="cancel"
            ),
            web.post("/api/v2/invoices/status", merchant_api.invoice_status, name="status"),
            web.post("/api/v2/invoices/callbacks", merchant_api.callbacks_log, name="callbacks"),
            web.post(
                "/api/v2/invoices/callbacks/redeliver",
                merchant_api.callbacks_redeliver,
                name="redeliver",
            ),
            web.post("/api/v2/accounts/list", merchant_api.accounts_list, name="accounts"),
            web.post("/api/v2/currencies/list", currencies_api.currencies_list, name="currencies"),
            web.post("/api/v2/currencies/pairs", currencies_api.currency_pairs, name="pairs"),
            web.post("/api/v2/currencies/rates", currencies_api.currency_pairs, name="rates"),
            web.get("/api/v2/public/invoices/{token}", public_api.show, name="public_invoice"),
            web.post(
                "/api/v2/public/invoices/{token}/confirm", public_api.confirm, name="public_confirm"
            ),
            web.post(
                "/api/v2/processing/callbacks", processing_api.receive, name="processing_callback"
            ),
            web.get("/health/live", health.live, name="live"),
            web.get("/health/ready", health.ready, name="ready"),
            web.get("/metrics", metrics.serve, name="metrics"),
            web.get("/api/v2/openapi.json", openapi.serve, name="openapi"),
        ]
    )
    pages.setup_page_routes(app)
    add_slash_twins(app)


def add_slash_twins(app: web.Application) -> None:
    """Register every named route once more under its other trailing-slash form.

    The twin is unnamed, so the OpenAPI document lists each endpoint once; static
    files and the root keep their single form.
    """
    twins: list[tuple[str, str, Handler]] = []
    for resource in app.router.resources():
        path = resource.canonical
        if resource.name is None or isinstance(resource, web.StaticResource) or path == "/":
            continue
        twin = path.removesuffix("/") if path.endswith("/") else path + "/"
        twins += [
            (route.method, twin, route.handler) for route in resource if route.method != "HEAD"
        ]
    for method, path, handler in twins:
        app.router.add_route(method, path, handler)
