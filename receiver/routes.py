"""Every route of the receiver, in one table (the OpenAPI document is built from it too)."""

from __future__ import annotations

from aiohttp import web

from receiver import health, metrics
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
            web.post("/api/v2/currencies/list", merchant_api.currencies_list, name="currencies"),
            web.post("/api/v2/currencies/rates", merchant_api.currencies_rates, name="rates"),
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
