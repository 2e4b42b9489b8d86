"""Test session fixtures: a real redis-server of our own on a free port.

Tests never use a fake Redis and never depend on a Redis the machine happens
to run: the session starts its own (AOF, appendfsync always) and every test
gets it flushed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from receiver import appkeys
from receiver.app import create_app
from tests.support import make_settings
from worker.config import Settings
from worker.domain.models import Merchant
from worker.ingest.consumer import Ingest
from worker.services.invoices import InvoiceService
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session."""
    server = RedisServer(data_dir=Path(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client on a freshly flushed database."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    return make_settings(redis_server.url)


@pytest.fixture
async def client(redis: aioredis.Redis, settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The receiver app on a test server, on a flushed Redis."""
    async with TestClient(TestServer(create_app(settings))) as test_client:
        yield test_client


@pytest.fixture
def service(client: TestClient[Any, Any]) -> InvoiceService:
    """The receiver app's invoice service (same Redis, same settings)."""
    return client.server.app[appkeys.SERVICE]


@pytest.fixture
def ingest(client: TestClient[Any, Any], service: InvoiceService) -> Ingest:
    """A stream consumer in this process; tests apply queued updates with `support.drain`."""
    return Ingest(client.server.app[appkeys.REDIS], service, consumer="test", reclaim_idle_ms=0)


@pytest.fixture
async def merchant(redis: aioredis.Redis) -> Merchant:
    """A registered merchant whose callback URL nobody listens on."""
    created = make_merchant("Shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(redis).add(created)
    return created
