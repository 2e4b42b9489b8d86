"""deploy/compose.yaml brought up with podman-compose: the production shape pays an invoice.

Redis primary + replica + three Sentinels, two receivers behind HAProxy, two workers, all on
the host network on the fixed ports compose.yaml names; the image is today's (`make image`),
Redis and HAProxy come from `make infra-image` (no registry here for the official images).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests import containers as podman_here
from tests.containers import REPO, apodman, pay_an_invoice, podman
from tests.sink import Sink, running_sink
from tests.support import PROCESSING_KEY, PROCESSING_SECRET
from worker.store import keys

# Ten containers up and down take about 90 s: `make test` leaves this to `make compose-test`
# (which .ci/run also runs), so the everyday suite stays short.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(podman_here.BUILD_TIMEOUT_SECONDS + 600),
    pytest.mark.skipif(
        os.environ.get("COINVOICE_COMPOSE_TEST") != "1",
        reason="brings up deploy/compose.yaml (10 containers, ~90 s): run by make compose-test",
    ),
]

COMPOSE = REPO / "deploy" / "compose.yaml"
PODMAN_COMPOSE = Path(sys.executable).parent / "podman-compose"
INFRA_IMAGE = "localhost/coinvoice-infra:dev"
# The addresses compose.yaml gives HAProxy, the Redis primary and the Sentinels.
BALANCER = "http://127.0.0.1:18080"
PRIMARY_PORT = 16379
SENTINELS = "127.0.0.1:26391,127.0.0.1:26392,127.0.0.1:26393"
# Ten containers start, then receivers import and wait for Sentinel to name a primary.
UP_TIMEOUT_SECONDS = 90.0
LOCK = Path("/tmp/coinvoice-compose-test.lock")


def compose(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """`podman-compose -f deploy/compose.yaml -p … ARGS`; what it printed."""
    done = subprocess.run(
        [str(PODMAN_COMPOSE), "-f", str(COMPOSE), "-p", env["PROJECT"], *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"podman-compose {args[0]} failed:\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def deployment() -> Iterator[dict[str, str]]:
    """compose.yaml up (images built first); its variables; everything removed afterwards.

    compose.yaml's ports are fixed, so test runs on one machine take turns (a file lock).
    """
    podman_here.require_podman()
    podman_here.build_image("image")
    podman_here.build_image("infra-image")
    env = podman_here.podman_env() | {
        "PROJECT": f"cvtest{os.getpid()}",
        "COINVOICE_IMAGE": podman_here.IMAGE,
        "REDIS_IMAGE": INFRA_IMAGE,
        "HAPROXY_IMAGE": INFRA_IMAGE,
        "COINVOICE_PROCESSING_KEY": PROCESSING_KEY,
        "COINVOICE_PROCESSING_SECRET": PROCESSING_SECRET,
        "COINVOICE_ALLOW_PRIVATE_CALLBACKS": "true",
    }
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            compose(env, "up", "-d")
            yield env
        finally:
            compose(env, "down", "--volumes")


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async for running in running_sink():
        yield running


def logs(env: dict[str, str], service: str) -> str:
    done = podman("logs", f"{env['PROJECT']}_{service}_1", check=False)
    return done.stdout + done.stderr


async def wait_ready(env: dict[str, str]) -> None:
    """Until HAProxy answers /health/ready with 200 (a receiver behind it is ready)."""
    deadline = time.monotonic() + UP_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{BALANCER}/health/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise AssertionError(f"not ready through HAProxy:\n{logs(env, 'receiver-1')[-3000:]}")


async def wait_replica_synced() -> None:
    """Until the replica's link to the primary is up (a fresh deployment syncs first)."""
    replica = aioredis.Redis(port=PRIMARY_PORT + 1)
    try:
        deadline = time.monotonic() + UP_TIMEOUT_SECONDS
        while (await replica.info("replication")).get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced with the primary"
            await asyncio.sleep(0.5)
    finally:
        await replica.aclose()


async def test_compose_pays_an_invoice_through_haproxy(
    deployment: dict[str, str], sink: Sink
) -> None:
    """Through HAProxy: merchant, invoice, payment; the merchant gets the signed `confirmed`
    callback. Both receivers are in rotation and every coinvoice container passes its
    HEALTHCHECK (a worker's: its own heartbeat); both workers heartbeat under their own names,
    the primary writes every command to its AOF and the replica holds the invoice."""
    await wait_ready(deployment)
    # Until then every write is refused (503: no replica confirms it), as it should be.
    await wait_replica_synced()
    cli_env = {
        "COINVOICE_REDIS_SENTINELS": SENTINELS,
        # As the deployment's workers: the merchant's sink listens on loopback.
        "COINVOICE_ALLOW_PRIVATE_CALLBACKS": "true",
        "COINVOICE_PROCESSING_KEY": PROCESSING_KEY,
        "COINVOICE_PROCESSING_SECRET": PROCESSING_SECRET,
        "COINVOICE_LOG_FORMAT": "json",
    }
    callbacks = await pay_an_invoice(BALANCER, cli_env, sink)
    print(f"callbacks through HAProxy: {[c.json['status'] for c in callbacks]}")

    for service in ("receiver-1", "receiver-2", "worker-1", "worker-2"):
        health = await apodman("healthcheck", "run", f"{deployment['PROJECT']}_{service}_1")
        assert health.returncode == 0, service
    balancer_log = logs(deployment, "haproxy")
    for server in ("receiver1", "receiver2"):
        assert f"Server receivers/{server} is UP" in balancer_log
    primary = aioredis.Redis(port=PRIMARY_PORT)
    try:
        workers = await primary.zrangebyscore(keys.WORKERS, time.time() - 10, "+inf")
        assert sorted(workers) == [b"coinvoice-worker-1:1", b"coinvoice-worker-2:1"]
        assert await primary.config_get("appendfsync") == {"appendfsync": "always"}
        replication = await primary.info("replication")
        assert replication["role"] == "master" and replication["connected_slaves"] == 1
    finally:
        await primary.aclose()
    paid = callbacks[-1]
    replica = aioredis.Redis(port=PRIMARY_PORT + 1)
    try:
        fid = keys.foreign_id_index(paid.headers["X-Processing-Key"], paid.json["foreign_id"])
        assert await replica.hexists(fid.key, fid.field)
    finally:
        await replica.aclose()


async def test_a_backup_streamed_from_the_replica_is_a_valid_snapshot(
    deployment: dict[str, str],
) -> None:
    """deploy/README.md's backup command, `redis-cli --rdb` against the replica, writes an
    RDB file that redis-check-rdb accepts."""
    replica = f"{deployment['PROJECT']}_redis-replica_1"
    backup = "/tmp/coinvoice-backup.rdb"
    await wait_replica_synced()
    taken = await apodman(
        "exec", replica, "redis-cli", "-p", str(PRIMARY_PORT + 1), "--rdb", backup
    )
    assert "Transfer finished" in taken.stdout + taken.stderr
    checked = await apodman("exec", replica, "redis-check-rdb", backup)
    assert "RDB looks OK" in checked.stdout + checked.stderr
