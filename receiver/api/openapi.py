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
from receiver.api.schemas import ConfirmInvoice, CreateInvoice, EmptyBody, ForeignIdBody


@dataclass(frozen=True)
class Doc:
    summary: str
    auth: str | None = None  # "merchant" | "processing" | None
    body: type[BaseModel] | None = None
    public_limit: bool = False  # per-address rate limit (customer endpoints)


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


DOCS: dict[str, Doc] = {
    "ping": Doc("Liveness of the API; no authentication."),
    "create": Doc(
        "Create an invoice (types 1–3 by `timer` and `sender_currency`).", "merchant", CreateInvoice
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
    "accounts": Doc("The merchant's balances per currency.", "merchant", EmptyBody),
    "currencies": Doc("Supported currencies with type and precision.", "merchant", EmptyBody),
    "rates": Doc("Exchange rates from each crypto currency.", "merchant", EmptyBody),
    "public_invoice": Doc("The customer's view of an invoice (no secrets).", public_limit=True),
    "public_confirm": Doc(
        "The customer confirms a currency and an e-mail.", body=ConfirmInvoice, public_limit=True
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
    "refund_page": Doc("The refund page linked from the e-mails (HTML).", public_limit=True),
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
        responses["403"] = _error("Bad or missing signature.")
    if doc.auth == "merchant" or doc.public_limit:
        responses["429"] = {
            **_error("Rate limited; retry after the `Retry-After` seconds."),
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        }
    if "foreign_id" in path or doc.body is ForeignIdBody or "token" in path:
        responses["404"] = _error("Invoice not found.")
    if method == "POST":
        responses["408"] = _error("The request body did not arrive in time; the connection closes.")
    if doc.auth is not None or doc.public_limit:  # these reach Redis
        responses["503"] = {
            **_error("Redis unreachable (`unavailable`); safe to retry after `Retry-After`."),
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
            "X-Processing-Key and X-Processing-Signature = hex HMAC-SHA512 of the raw body.",
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
