"""Operational endpoints and commands of spec §11: health, metrics, OpenAPI, limits, --check."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from receiver.api.openapi import DOCS
from receiver.app import create_app
from tests import processes
from tests.support import eventually, make_settings, merchant_post
from worker.app.main import HEARTBEAT_STALE_SECONDS, check
from worker.domain.models import Merchant
from worker.store import keys
from worker.store.redis_server import RedisServer, free_port

Client = TestClient[Any, Any]


async def test_live_and_ready(client: Client) -> None:
    """/health/live and /health/ready answer 200 while Redis is reachable."""
    assert (await client.get("/health/live")).status == 200
    response = await client.get("/health/ready")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_not_ready_without_redis() -> None:
    """With Redis unreachable, readiness fails (503) and liveness still answers."""
    settings = make_settings(f"redis://127.0.0.1:{free_port()}/0")
    async with TestClient(TestServer(create_app(settings))) as client:
        assert (await client.get("/health/live")).status == 200
        response = await client.get("/health/ready")
        assert response.status == 503
        assert (await response.json())["status"] == "redis_unavailable"


async def test_metrics_are_prometheus_text(client: Client, merchant: Merchant) -> None:
    """GET /metrics: Prometheus text, names prefixed coinvoice_, requests and backlogs counted."""
    await merchant_post(client, merchant, "/api/v2/currencies/list", {})
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    assert 'coinvoice_http_requests_total{route="/api/v2/currencies/list",status="200"} 1.0' in text
    assert 'coinvoice_backlog{queue="updates"}' in text
    names = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert names and all(name.startswith("coinvoice_") for name in names)


async def test_openapi_describes_every_route(client: Client) -> None:
    """GET /api/v2/openapi.json is OpenAPI 3.1 covering every named route, 429 where limited."""
    response = await client.get("/api/v2/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"] == "3.1.0"
    named = {
        r.resource.name for r in client.server.app.router.routes() if r.resource and r.resource.name
    }
    assert named <= set(DOCS), f"undocumented routes: {named - set(DOCS)}"
    create = document["paths"]["/api/v2/invoices/create"]["post"]
    assert {"200", "400", "403", "413", "429"} <= set(create["responses"])
    assert create["responses"]["429"]["headers"]["Retry-After"]
    schema = document["components"]["schemas"][
        create["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    ]
    assert {"timer", "title", "currency", "amount", "foreign_id"} <= set(schema["required"])
    assert "429" in document["paths"]["/api/v2/public/invoices/{token}"]["get"]["responses"]
    assert "429" not in document["paths"]["/api/v2/processing/callbacks"]["post"]["responses"]


async def test_public_rate_limit_per_address(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """Public endpoints allow N requests per second per client address, then 429 + Retry-After."""
    settings = make_settings(redis_server.url, rate_limit_public=2)
    async with TestClient(TestServer(create_app(settings))) as client:
        answers = []
        for _ in range(6):
            response = await client.get("/api/v2/public/invoices/nope")
            answers.append(
                (response.status, response.headers.get("Retry-After"), await response.json())
            )
    statuses = [status for status, _, _ in answers]
    assert statuses.count(404) >= 2  # at most 2 per second pass, even across a second boundary
    assert (429, "1", {"error": "Too many requests", "code": "rate_limited"}) in answers


async def test_behind_a_proxy_the_last_forwarded_line_is_the_client(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A client's own X-Forwarded-For line cannot dodge the limit: the proxy's last line counts."""
    settings = make_settings(redis_server.url, rate_limit_public=2, trust_forwarded=True)
    async with TestClient(TestServer(create_app(settings))) as client:
        statuses = []
        for n in range(6):
            # What HAProxy forwards: the client's claim, then its own line with the real peer.
            headers = CIMultiDict(
                [("X-Forwarded-For", f"198.51.100.{n}"), ("X-Forwarded-For", "203.0.113.7")]
            )
            response = await client.get("/api/v2/public/invoices/nope", headers=headers)
            statuses.append(response.status)
    assert 429 in statuses


async def test_processing_callbacks_are_never_rate_limited(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """Processing callbacks are exempt from every rate limit."""
    from tests.support import deposit, processing_post

    settings = make_settings(redis_server.url, rate_limit_public=1, rate_limit_merchant=1)
    async with TestClient(TestServer(create_app(settings))) as client:
        results = [
            await processing_post(client, deposit("bc1qx", "0.1", tx_id=n)) for n in range(1, 6)
        ]
    assert [status for status, _ in results] == [200] * 5


def _check(env: dict[str, str]) -> int:
    return subprocess.run(
        [sys.executable, "-m", "receiver.commands.cli", "worker", "--check"],
        env=env,
        timeout=30,
        check=False,
    ).returncode


@pytest.mark.slow
async def test_worker_check(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """`coinvoice worker --check` exits 0 while a worker lives, 1 when none does."""
    env = processes.child_env(redis_server.url)
    assert await asyncio.to_thread(_check, env) == 1
    worker = processes.worker(env, tmp_path)
    try:
        await eventually(lambda: asyncio.to_thread(_check, env), expect=0, seconds=20)
    finally:
        assert worker.stop() == 0  # a clean shutdown on SIGTERM
    assert await asyncio.to_thread(_check, env) == 1  # it deregistered on the way out


@pytest.mark.parametrize(
    ("host", "alive"),
    [(None, True), ("pod-a", True), ("pod-b", False), ("pod", False), ("pod-c", False)],
)
async def test_worker_check_on_this_host_counts_only_its_own_workers(
    redis: aioredis.Redis, redis_server: RedisServer, host: str | None, alive: bool
) -> None:
    """`worker --check --this-host` passes only on a fresh heartbeat of a worker named
    `{host}:{pid}`: a pod's probe is about its own worker, not about any in the fleet."""
    now = time.time()
    stale = now - HEARTBEAT_STALE_SECONDS - 1
    await redis.zadd(keys.WORKERS, {"pod-a:1": now, "pod-b:1": stale, "pod-b:7": stale})
    assert await check(make_settings(redis_server.url), host) is alive
