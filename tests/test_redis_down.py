"""Redis down (spec §11, issue 15 item 5): every endpoint that needs Redis answers 503
`unavailable` with Retry-After, never a 500; /metrics keeps serving the process's own
metrics; readiness fails; everything works again once Redis is back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import RedisError
from structlog.testing import capture_logs

from receiver.api.errors import UNAVAILABLE_RETRY_AFTER_SECONDS
from receiver.app import create_app
from receiver.connections import ConnectionGuard
from receiver.health import Lifecycle
from receiver.metrics import Metrics
from receiver.middleware import receiver_middleware
from tests.support import (
    PROCESSING_KEY,
    PROCESSING_SECRET,
    create_payload,
    deposit,
    make_settings,
    merchant_post,
    signed_headers,
)
from worker.domain.models import Merchant
from worker.store.connection import connect
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer

Client = TestClient[Any, Any]
UNAVAILABLE = {"error": "Service unavailable", "code": "unavailable"}

# name → (method, path, who signs the body: "merchant" | "processing" | None, body)
API_CALLS: dict[str, tuple[str, str, str | None, object]] = {
    "create": ("POST", "/api/v2/invoices/create", "merchant", create_payload("new")),
    "cancel": ("POST", "/api/v2/invoices/down/cancel/", "merchant", {}),
    "status": ("POST", "/api/v2/invoices/status", "merchant", {"foreign_id": "down"}),
    "callbacks": ("POST", "/api/v2/invoices/callbacks", "merchant", {"foreign_id": "down"}),
    "redeliver": (
        "POST",
        "/api/v2/invoices/callbacks/redeliver",
        "merchant",
        {"foreign_id": "down"},
    ),
    "accounts": ("POST", "/api/v2/accounts/list", "merchant", {}),
    "currencies": ("POST", "/api/v2/currencies/list", "merchant", {}),
    "pairs": ("POST", "/api/v2/currencies/pairs", "merchant", {}),
    "rates": ("POST", "/api/v2/currencies/rates", "merchant", {}),
    "public_invoice": ("GET", "/api/v2/public/invoices/{token}", None, None),
    "public_confirm": (
        "POST",
        "/api/v2/public/invoices/{token}/confirm",
        None,
        {"sender_currency": "BTC", "email": "a@b.example"},
    ),
    "processing_callback": (
        "POST",
        "/api/v2/processing/callbacks",
        "processing",
        deposit("bc1qnobody", "0.1"),
    ),
}
# Pages answer HTML (the customer never gets JSON there); forms may be refused earlier (403).
PAGE_CALLS = {
    "invoice_page": ("GET", "/invoice/{token}"),
    "invoice_confirm": ("POST", "/invoice/{token}"),
    "refund_page": ("GET", "/refund/{token}"),
    "refund_submit": ("POST", "/refund/{token}"),
}
# Routes that need no Redis.
WITHOUT_REDIS = {"ping": 200, "live": 200, "openapi": 200, "metrics": 200, "ready": 503}


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test alone, so stopping it disturbs no other test."""
    server = RedisServer(data_dir=tmp_path / "redis").start()
    yield server
    server.stop()


async def call(
    client: Client,
    merchant: Merchant,
    token: str,
    method: str,
    path: str,
    signer: str | None,
    body: object,
) -> tuple[int, dict[str, str], bytes]:
    raw = b"" if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if signer == "merchant":
        headers = signed_headers(merchant.key, merchant.secret, raw)
    elif signer == "processing":
        headers = signed_headers(PROCESSING_KEY, PROCESSING_SECRET, raw)
    response = await client.request(
        method, path.format(token=token), data=raw or None, headers=headers
    )
    return response.status, dict(response.headers), await response.read()


async def test_every_endpoint_answers_503_while_redis_is_down(own_redis: RedisServer) -> None:
    """Stop the real redis-server: no 500 anywhere, 503 `unavailable` with Retry-After."""
    settings = make_settings(own_redis.url)
    redis = connect(settings)
    merchant = make_merchant("Shop", "http://127.0.0.1:9/cb")
    await MerchantStore(redis).add(merchant)
    await redis.aclose()
    async with TestClient(TestServer(create_app(settings))) as client:
        status, created = await merchant_post(
            client, merchant, "/api/v2/invoices/create", create_payload("down")
        )
        assert status == 200
        token = created["data"]["url"].rsplit("/", 1)[1]
        named = {r.name for r in client.server.app.router.resources() if r.name}
        assert named - {"static"} == set(API_CALLS) | set(PAGE_CALLS) | set(WITHOUT_REDIS)

        own_redis.stop()
        with capture_logs() as logs:
            answers = await asyncio.gather(
                *(call(client, merchant, token, *spec) for spec in API_CALLS.values()),
                *(call(client, merchant, token, m, p, None, None) for m, p in PAGE_CALLS.values()),
            )
        for name, (status, headers, body) in zip([*API_CALLS, *PAGE_CALLS], answers, strict=True):
            assert status != 500, name
            if name in API_CALLS:
                assert (status, json.loads(body)) == (503, UNAVAILABLE), name
            if status == 503:
                assert int(headers["Retry-After"]) > 0, name
        assert answers[len(API_CALLS)][0] == 503  # the invoice page: an HTML 503
        assert not [e for e in logs if e["log_level"] == "error"]

        for name, expected in WITHOUT_REDIS.items():
            path = {"ping": "/api/v2/ping", "live": "/health/live", "ready": "/health/ready"}
            url = path.get(name, "/metrics" if name == "metrics" else "/api/v2/openapi.json")
            assert (await client.get(url)).status == expected, name
        text = await (await client.get("/metrics")).text()
        assert 'coinvoice_http_requests_total{route="/api/v2/invoices/create",status="503"}' in text
        assert "coinvoice_redis_up 0.0" in text
        assert "coinvoice_backlog{" not in text

        own_redis.start()  # same port and data: the merchant is still there
        status, _ = await merchant_post(
            client, merchant, "/api/v2/invoices/status", {"foreign_id": "down"}
        )
        assert status == 200
        assert (await client.get("/health/ready")).status == 200
        text = await (await client.get("/metrics")).text()
        assert "coinvoice_redis_up 1.0" in text and 'coinvoice_backlog{queue="updates"}' in text


class WaitShortfall(RedisError):
    """Stands for any RedisError subclass a store raises (e.g. too few replicas after WAIT)."""


async def test_any_redis_error_escaping_a_handler_is_a_503() -> None:
    """The receiver's middleware maps RedisError and every subclass to 503 `unavailable`."""

    async def failing(request: web.Request) -> web.Response:
        raise WaitShortfall("1 of 2 replicas acknowledged")

    metrics = Metrics()
    settings = make_settings("redis://127.0.0.1:9")
    guard = ConnectionGuard.from_settings(settings, metrics.connection_closed)
    app = web.Application(middlewares=[receiver_middleware(metrics, guard, Lifecycle(), 1.0)])
    app.router.add_get("/x", failing)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/x")
        assert response.status == 503
        assert await response.json() == UNAVAILABLE
        assert response.headers["Retry-After"] == str(UNAVAILABLE_RETRY_AFTER_SECONDS)


async def test_openapi_lists_the_503_of_every_operation_that_needs_redis(
    client: TestClient[Any, Any],
) -> None:
    """The OpenAPI document describes 503 with Retry-After where Redis is reached, and 408
    where a body is read."""
    document = await (await client.get("/api/v2/openapi.json")).json()
    for path, method in (
        ("/api/v2/invoices/create", "post"),
        ("/api/v2/processing/callbacks", "post"),
        ("/api/v2/public/invoices/{token}", "get"),
    ):
        responses = document["paths"][path][method]["responses"]
        assert responses["503"]["headers"]["Retry-After"], path
        assert ("408" in responses) is (method == "post"), path
    assert "503" not in document["paths"]["/api/v2/ping"]["get"]["responses"]
