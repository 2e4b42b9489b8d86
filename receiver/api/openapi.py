"""The OpenAPI 3.1 document of the receiver (`GET /api/v2/openapi.json`).

Built from the app's route table plus a short description per route; request
schemas come from the pydantic models the handlers validate with, so the
document cannot drift from what the API accepts. A test checks that every
route is described.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from receiver.api.processing import ProcessingCallback
from receiver.api.schemas import (
    ConfirmInvoice,
    CreateInvoice,
    CurrenciesFilter,
    EmptyBody,
    ForeignIdBody,
    PairsFilter,
)


@dataclass(frozen=True)
class Doc:
    summary: str
    auth: str | None = None  # "merchant" | "processing" | None
    body: type[BaseModel] | None = None
    public_limit: bool = False  # per-address rate limit (customer endpoints)
    quotes: bool = False  # needs current prices: 503 rates_unavailable when they are stale


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


DOCS: dict[str, Doc] = {
    "ping": Doc("Liveness of the API; no authentication; the plain-text body `OK`."),
    "create": Doc(
        "Create an invoice (types 1–3 by `timer` and `sender_currency`).",
        "merchant",
        CreateInvoice,
        quotes=True,
    ),
    "cancel": Doc(
        "Cancel an invoice in created/pending/processing: it fails.", "merchant", EmptyBody
    ),
    "status": Doc(
        "The invoice in the callback format, with its sequence and refund address.",
        "merchant",
        ForeignIdBody,
    ),
    "callbacks": Doc(
        "The invoice's callbacks with state and attempts, oldest first.", "merchant", ForeignIdBody
    ),
    "redeliver": Doc(
        "Deliver the newest snapshot again now (dead-lettered too).", "merchant", ForeignIdBody
    ),
    "accounts": Doc(
        "The merchant's balance in every currency, zeros included.", "merchant", EmptyBody
    ),
    "currencies": Doc(
        "Currencies with id, type, minimum amount, fee percents and precision.",
        "merchant",
        CurrenciesFilter,
    ),
    "pairs": Doc(
        "Exchangeable pairs (from each crypto currency), filtered by currency_from/currency_to.",
        "merchant",
        PairsFilter,
        quotes=True,
    ),
    "rates": Doc(
        "The current rate of each pair, filtered by currency_from/currency_to.",
        "merchant",
        PairsFilter,
        quotes=True,
    ),
    "public_invoice": Doc("The customer's view of an invoice (no secrets).", public_limit=True),
    "public_confirm": Doc(
        "The customer confirms a currency and an e-mail.",
        body=ConfirmInvoice,
        public_limit=True,
        quotes=True,
    ),
    "processing_callback": Doc(
        "A deposit transaction update from the processing layer; 200 once durably queued.",
        "processing",
        ProcessingCallback,
    ),
    "live": Doc("The process answers."),
    "ready": Doc("Redis reachable and not shutting down; 503 otherwise."),
    "metrics": Doc("Prometheus metrics (text format)."),
    "openapi": Doc("This document."),
    "invoice_page": Doc("The hosted invoice page (HTML).", public_limit=True),
    "invoice_confirm": Doc("The invoice page's confirm form (HTML form post).", public_limit=True),
    "refund_page": Doc(
        "The refund page, named by the refund token that only the refund and payback "
        "e-mails carry (HTML); 404 before a refund or payback is owed.",
        public_limit=True,
    ),
    "refund_submit": Doc(
        "Store the customer's refund address (HTML form post).", public_limit=True
    ),
    "static": Doc("Static files of the hosted pages."),
}


def _operation(name: str, doc: Doc, method: str, path: str) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "OK"}}
    operation: dict[str, Any] = {
        "operationId": name,
        "summary": doc.summary,
        "responses": responses,
    }
    params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
    if params:
        operation["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    if doc.body is not None and method == "POST":
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{doc.body.__name__}"}
                }
            },
        }
        responses["400"] = _error(
            'Bad content format, or field errors `{"errors": {field: message}}`.'
        )
        responses["413"] = _error("Request body over 64 KiB.")
    if doc.auth is not None:
        operation["security"] = [{"ProcessingKey": [], "ProcessingSignature": []}]
        responses["403"] = _error(
            "Bad or missing signature; for a merchant with replay protection also a "
            "missing or stale X-Processing-Timestamp, or a request received before."
        )
    if doc.auth == "merchant" or doc.public_limit:
        responses["429"] = {
            **_error("Rate limited; retry after the `Retry-After` seconds."),
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        }
    if "foreign_id" in path or doc.body is ForeignIdBody or "token" in path:
        responses["404"] = _error("Invoice not found.")
    if method == "POST":
        responses["408"] = _error("The request body did not arrive in time; the connection closes.")
    unavailable = []
    if doc.auth is not None or doc.public_limit:  # these reach Redis
        unavailable.append("`unavailable`: Redis unreachable; safe to retry.")
    if doc.quotes:
        unavailable.append(
            "`rates_unavailable`: the exchange rates are older than "
            "COINVOICE_RATES_MAX_AGE_SECONDS; nothing was created or changed."
        )
    if unavailable:
        responses["503"] = {
            **_error(" ".join(unavailable) + " Retry after `Retry-After` seconds."),
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        }
    return operation


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document for every named route of `app`."""
    paths: dict[str, dict[str, Any]] = {}
    models: set[type[BaseModel]] = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD" or resource.name is None:
            continue
        name = resource.name
        doc = DOCS.get(name, Doc(name))  # tests/test_ops.py insists every route is in DOCS
        path = resource.canonical
        paths.setdefault(path, {})[route.method.lower()] = _operation(name, doc, route.method, path)
        if doc.body is not None:
            models.add(doc.body)
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "properties": {
                "error": {"type": "string"},
                "code": {"type": "string"},
                "errors": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    }
    for model in sorted(models, key=lambda m: m.__name__):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "coinvoice",
            "version": "2",
            "description": "AlphaPo / CoinsPaid v2 invoice API. Authenticated requests carry "
            "X-Processing-Key and X-Processing-Signature = hex HMAC-SHA512 of the raw body. "
            "Merchants with replay protection also send X-Processing-Timestamp (unix seconds) "
            "and sign `{timestamp}.{body}` instead.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "ProcessingKey": {"type": "apiKey", "in": "header", "name": "X-Processing-Key"},
                "ProcessingSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Processing-Signature",
                },
            },
        },
    }


async def serve(request: web.Request) -> web.Response:
    return web.json_response(document(request.app))
