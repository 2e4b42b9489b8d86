"""The container image (deploy/Dockerfile) as operators run it: receiver and worker containers.

The image is built by `make image` once per session (tests/containers.py); the containers use
the host network and the test session's Redis on 127.0.0.1, with a read-only root file system.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests import containers as podman_here
from tests import processes
from tests.containers import IMAGE, Containers, apodman, coinvoice, pay_an_invoice, podman
from tests.sink import Sink, running_sink
from worker.store.redis_server import RedisServer, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(podman_here.BUILD_TIMEOUT_SECONDS + 120)]

# A container's SIGTERM-to-exit: the receiver drains open requests for up to 10 s.
STOP_SECONDS = 15


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image of today's code (`make image`, cached layers), or a skip without podman."""
    podman_here.require_podman()
    podman_here.build_image()
    yield IMAGE


@pytest.fixture
def containers(image: str) -> Iterator[Containers]:
    """Starts containers of the image; every one is removed after the test."""
    running = Containers(prefix=f"cv-test-{os.getpid()}-{time.monotonic_ns()}", started=[])
    try:
        yield running
    finally:
        for container in running.started:
            container.remove()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async for running in running_sink():
        yield running


async def wait_ready(base: str, container: podman_here.Container) -> None:
    """Until the receiver in `container` answers /health/ready with 200."""
    deadline = time.monotonic() + processes.START_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{base}/health/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"receiver container not ready:\n{container.logs()}")


def test_the_image_runs_as_a_non_root_user_without_pip_or_compilers(image: str) -> None:
    """The runtime image runs as uid 10001 and holds no pip, compiler or package cache."""
    script = (
        "id -u; for tool in pip pip3 gcc cc c++ make; do command -v $tool; done; "
        "python3 -c 'import pip' 2>/dev/null && echo pip-module; "
        "ls /var/lib/apt/lists | grep -v -x -e lock -e partial; true"
    )
    done = podman("run", "--rm", "--network", "host", "--entrypoint", "sh", image, "-c", script)
    assert done.stdout.split() == ["10001"], done.stdout
    inspected = podman("image", "inspect", image, "--format", "{{.Config.User}} {{.Size}}")
    user, size = inspected.stdout.split()
    assert user == "10001:10001"
    print(f"image {image}: {int(size) / 1e6:.0f} MB")


async def test_an_invoice_is_paid_through_receiver_and_worker_containers(
    image: str, containers: Containers, redis_server: RedisServer, sink: Sink, redis: aioredis.Redis
) -> None:
    """Receiver and worker containers (read-only root) take a merchant, an invoice and its
    payment, and the merchant gets the signed `confirmed` callback; both pass their
    HEALTHCHECK and stop cleanly on SIGTERM."""
    port = free_port()
    env = processes.child_env(redis_server.url, COINVOICE_LOG_LEVEL="info")
    env |= {"COINVOICE_HOST": "127.0.0.1", "COINVOICE_PORT": str(port)}
    receiver = containers.run("receiver", env, "--read-only")
    worker = containers.run("worker", env, "--read-only", "--tmpfs", "/var/lib/coinvoice")
    base = f"http://127.0.0.1:{port}"
    await wait_ready(base, receiver)

    callbacks = await pay_an_invoice(base, env, sink)
    statuses = [c.json["status"] for c in callbacks]
    assert statuses[-1] == "confirmed" and set(statuses) <= {"processing", "confirmed"}, statuses
    print(f"callbacks: {statuses}")

    for container in (receiver, worker):
        health = await apodman("healthcheck", "run", container.name, check=False)
        assert health.returncode == 0, f"{container.name} unhealthy: {health.stdout}{health.stderr}"
    check = await coinvoice(env, "worker", "--check")
    assert check.returncode == 0

    for container in (receiver, worker):
        await apodman("stop", "--time", str(STOP_SECONDS), container.name)
        assert container.state("ExitCode") == "0", container.logs()
