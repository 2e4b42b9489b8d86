"""Sentinel mode (spec §11): after the primary dies, every process finds the new one by itself.

A primary, one replica and three Sentinels on loopback (tests/replication.py);
the primary is SIGKILLed and the clients built from the settings keep working
without a restart: ours (receiver, worker, CLI) and arq's.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import create_pool

from receiver.app import create_app
from tests.processes import child_env
from tests.replication import ReplicatedRedis
from tests.support import create_payload, make_settings, merchant_post
from worker.app.main import arq_redis_settings
from worker.config import Settings
from worker.store.connection import connect
from worker.store.merchants import MerchantStore, make_merchant

pytestmark = pytest.mark.slow

# A failover takes down-after (1 s) plus an election; give it this long (seconds).
FAILOVER_SECONDS = 30.0


@pytest.fixture
def group(tmp_path: Path) -> Iterator[ReplicatedRedis]:
    """A fresh primary, replica and three Sentinels for each test (a failover ends them)."""
    replicated = ReplicatedRedis(tmp_path / "ha", replica_count=1, sentinel_count=3).start()
    yield replicated
    replicated.stop()


def sentinel_settings(group: ReplicatedRedis, **overrides: object) -> Settings:
    return make_settings(
        None, redis_sentinels=group.sentinel_setting, redis_min_replicas=1, **overrides
    )


async def until_primary_changes(group: ReplicatedRedis, old: int) -> int:
    """The port of the new primary, once the Sentinels name one."""
    deadline = time.monotonic() + FAILOVER_SECONDS
    while time.monotonic() < deadline:
        port = group.current_primary_port()
        if port not in (None, old):
            assert port is not None
            return port
        await asyncio.sleep(0.1)
    raise AssertionError("no failover")


async def test_clients_follow_a_failover_without_restart(group: ReplicatedRedis) -> None:
    """Our client and arq's reach the promoted replica after the primary is SIGKILLed."""
    settings = sentinel_settings(group)
    client = connect(settings)
    arq = await create_pool(arq_redis_settings(settings))
    try:
        merchant = make_merchant("Before", "http://127.0.0.1:9/a")
        await MerchantStore(client).add(merchant)  # WAITed: the replica has it
        old = group.primary.port
        group.primary.stop(kill=True)
        new = await until_primary_changes(group, old)
        assert new == group.replicas[0].port
        # The next command reconnects through the Sentinels: same client, no restart.
        assert await MerchantStore(client).get(merchant.key) == merchant
        # No replica is left to confirm writes until the old primary returns.
        client.min_replicas = 0
        await MerchantStore(client).add(make_merchant("After", "http://127.0.0.1:9/b"))
        info = await client.info("replication")
        assert info["role"] == "master"
        await arq.set("arq-probe", "1")
        assert await arq.get("arq-probe") in ("1", b"1")
    finally:
        await arq.aclose()
        for sentinel in arq.connection_pool.sentinel_manager.sentinels:  # arq leaves them open
            await sentinel.aclose()
        await client.aclose()


async def test_cli_command_reaches_the_primary_through_sentinels(
    group: ReplicatedRedis, tmp_path: Path
) -> None:
    """`coinvoice merchant add` with only COINVOICE_REDIS_SENTINELS set registers the merchant."""
    env = child_env("", COINVOICE_REDIS_SENTINELS=group.sentinel_setting)
    env.pop("COINVOICE_REDIS_URL")
    env["COINVOICE_DATA_DIR"] = str(tmp_path / "none")  # no embedded Redis to fall back on
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "receiver.commands.cli", "merchant", "add",
        "--name", "Via Sentinel", "--callback-url", "http://127.0.0.1:9/cb",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    key = json.loads(stdout)["key"]
    client = connect(sentinel_settings(group))
    try:
        stored = await MerchantStore(client).get(key)
        assert stored is not None and stored.name == "Via Sentinel"
    finally:
        await client.aclose()


async def test_a_fresh_primary_behind_sentinels_creates_its_first_invoice(
    group: ReplicatedRedis,
) -> None:
    """The deployment's first create: no script is loaded yet (NOSCRIPT, load, send again)
    and the WAIT after it must still count the replica."""
    settings = sentinel_settings(group)
    client = connect(settings)
    try:
        merchant = make_merchant("Shop", "http://127.0.0.1:9/callbacks")
        await MerchantStore(client).add(merchant)
        await client.script_flush()
        async with TestClient(TestServer(create_app(settings))) as http:
            status, body = await merchant_post(
                http, merchant, "/api/v2/invoices/create", create_payload("first-1")
            )
        assert status == 200, body
    finally:
        await client.aclose()
