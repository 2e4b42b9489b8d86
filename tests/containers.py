"""podman for the container tests: set it up, build the image once a session, run containers.

Where `../shared/tools/containers-here.sh` exists (these machines, CI), it installs podman and
the local Debian base image and names the containers.conf podman needs here. The image is
built with `make image` at the start of a session, so the tests run today's code; podman's
layer cache makes that a few seconds when only coinvoice's own wheel changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from hmac import compare_digest
from pathlib import Path

import aiohttp
import pytest

from tests.sink import Received, Sink
from worker.domain.signing import sign

REPO = Path(__file__).resolve().parent.parent
CONTAINERS_HERE = REPO.parent / "shared" / "tools" / "containers-here.sh"
# A tag per checkout: test runs of two checkouts on one machine never run each other's code.
IMAGE = os.environ.get(
    "COINVOICE_IMAGE", f"localhost/coinvoice:test-{hashlib.sha256(bytes(REPO)).hexdigest()[:10]}"
)
# A first build on a fresh machine: a Debian root, apt in two stages, the wheelhouse.
BUILD_TIMEOUT_SECONDS = 900
# From the confirmed deposit to the merchant's callback: a worker's start-up included.
CALLBACK_TIMEOUT_SECONDS = 60.0


@cache
def podman_env() -> dict[str, str]:
    """The environment podman runs with here (CONTAINERS_CONF from containers-here.sh)."""
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env and CONTAINERS_HERE.exists():
        done = subprocess.run(
            ["bash", str(CONTAINERS_HERE)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_SECONDS,
            check=False,
        )
        found = re.search(r"export CONTAINERS_CONF=(\S+)", done.stdout)
        if done.returncode != 0 or not found:
            raise RuntimeError(f"containers-here.sh failed: {done.stderr[-2000:]}")
        env["CONTAINERS_CONF"] = found.group(1)
    return env


def require_podman() -> dict[str, str]:
    """podman's environment, or skip when this machine has no way to get podman."""
    if shutil.which("podman") is None and not CONTAINERS_HERE.exists():
        pytest.skip("podman is not installed and no containers-here.sh is beside the repository")
    return podman_env()


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run one podman command; its output as text."""
    done = subprocess.run(
        ["podman", *args],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}… failed: {done.stderr[-3000:]}")
    return done


async def apodman(
    *args: str, seconds: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`podman` from async code, without blocking the event loop."""
    return await asyncio.to_thread(podman, *args, timeout=seconds, check=check)


def build_image(target: str = "image") -> str:
    """`make image` (or another image target) for `IMAGE`; what it printed."""
    done = subprocess.run(
        ["make", "--no-print-directory", target, f"IMAGE={IMAGE}"],
        cwd=REPO,
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, (
        f"make {target} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def env_args(env: dict[str, str]) -> list[str]:
    """`-e NAME=VALUE` for every COINVOICE_ variable of `env`."""
    return [f"-e{name}={value}" for name, value in env.items() if name.startswith("COINVOICE_")]


@dataclass
class Container:
    """One detached container of the test, removed at the end whatever happened."""

    name: str

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return (done.stdout + done.stderr)[-4000:]

    def state(self, field: str) -> str:
        return podman("inspect", "--format", f"{{{{.State.{field}}}}}", self.name).stdout.strip()

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


@dataclass
class Containers:
    """Starts detached containers of `IMAGE` on the host network with unique names."""

    prefix: str
    started: list[Container]

    def run(
        self, role: str, env: dict[str, str], *options: str, args: Sequence[str] = ()
    ) -> Container:
        container = Container(f"{self.prefix}-{role}")
        self.started.append(container)
        podman(
            "run", "--detach", "--name", container.name, "--network", "host",
            *options, *env_args(env), IMAGE, *(args or [role]),
        )  # fmt: skip
        return container


async def coinvoice(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """A one-off `coinvoice …` in a throwaway container of the image (host network)."""
    return await apodman(
        "run", "--rm", "--network", "host", "--read-only", "--health-cmd", "none",
        *env_args(env), IMAGE, *args,
    )  # fmt: skip


async def pay_an_invoice(base: str, env: dict[str, str], sink: Sink) -> list[Received]:
    """The paid invoice of spec §6-§9 through a running deployment at `base`.

    A merchant is added and a BTC invoice created with a signed request; `coinvoice
    simulate deposit` reports the payment seen, then confirmed; the merchant's callback
    sink must then get a correctly signed `confirmed` snapshot. Returns the callbacks.
    """
    added = await coinvoice(
        env, "merchant", "add", "--name", "Shop", "--callback-url", sink.url("/shop")
    )
    merchant = json.loads(added.stdout)
    foreign_id = f"container-{os.getpid()}-{time.time_ns()}"
    body = json.dumps(
        {"timer": True, "title": "Tea", "currency": "EUR", "amount": "106.75",
         "sender_currency": "BTC", "foreign_id": foreign_id}
    ).encode()  # fmt: skip
    headers = {
        "Content-Type": "application/json",
        "X-Processing-Key": merchant["key"],
        "X-Processing-Signature": sign(merchant["secret"], body),
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/api/v2/invoices/create", data=body, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        invoice = (await response.json())["data"]
    pay = ["simulate", "deposit", "--address", invoice["address"], "--url", base,
           "--amount", invoice["sender_amount"]]  # fmt: skip
    seen = json.loads((await coinvoice(env, *pay)).stdout)
    assert seen["http_status"] == 200, seen
    confirmed = await coinvoice(
        env, *pay, "--tx-id", str(seen["tx_id"]), "--status", "confirmed", "--confirmations", "3"
    )
    assert json.loads(confirmed.stdout)["http_status"] == 200, confirmed.stdout

    def callbacks() -> list[Received]:
        return [r for r in sink.received if r.path == "/shop"]

    async with asyncio.timeout(CALLBACK_TIMEOUT_SECONDS), sink.arrived:
        await sink.arrived.wait_for(
            lambda: any(r.json["status"] == "confirmed" for r in callbacks())
        )
    for callback in callbacks():
        assert callback.json["foreign_id"] == foreign_id
        assert callback.headers["X-Processing-Key"] == merchant["key"]
        assert compare_digest(
            callback.headers["X-Processing-Signature"], sign(merchant["secret"], callback.body)
        )
    return callbacks()
