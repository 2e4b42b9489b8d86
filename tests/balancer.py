"""HAProxy in front of receivers, and client traffic through it, for the load-balancer tests.

`Balancer` runs the shipped `deploy/haproxy.cfg` unchanged, its addresses
given through the environment variables the file reads, so what is tested is
what ships. `Traffic` plays merchants and the processing layer: each client
creates an invoice, then reports a deposit to it, and retries any answer but
a success the way a real caller does, counting every refusal it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import grp
import json
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.processes import post_update
from tests.support import create_payload, deposit, signed_headers
from worker.domain.models import Merchant
from worker.store.redis_server import free_port

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
# How long HAProxy may take to see every receiver up (seconds): two checks a second apart.
UP_TIMEOUT_SECONDS = 10.0
# A client waits this long before retrying a refused request (seconds).
RETRY_DELAY_SECONDS = 0.05
# A request a client gives up on: an operation needing more attempts fails the test.
MAX_ATTEMPTS = 200


def haproxy_binary() -> str:
    """HAProxy from the distribution (the Makefile installs it when missing)."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError("haproxy not installed: run `make venv` (apt-get install haproxy)")
    return found


@dataclass
class Balancer:
    """One HAProxy process on a free loopback port, balancing over `receivers` (host:port)."""

    receivers: list[str]
    work_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket_path(self) -> Path:
        return self.work_dir / "haproxy.sock"

    def start(self) -> Balancer:
        env = {
            **os.environ,
            "COINVOICE_LB_BIND": f"127.0.0.1:{self.port}",
            "COINVOICE_LB_STATS_SOCKET": str(self.socket_path),
            # Run as whoever runs the tests (the file defaults to the `haproxy` user).
            "COINVOICE_LB_USER": pwd.getpwuid(os.getuid()).pw_name,
            "COINVOICE_LB_GROUP": grp.getgrgid(os.getgid()).gr_name,
        }
        for n, address in enumerate(self.receivers, start=1):
            env[f"COINVOICE_RECEIVER{n}"] = address
        log = (self.work_dir / "haproxy.log").open("ab")
        # -db: stay in the foreground, a child of the test.
        self.process = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(CONFIG)], env=env, stdout=log, stderr=log
        )
        log.close()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def states(self) -> dict[str, str]:
        """Each receiver's state as HAProxy sees it (`UP`, `DOWN`, …), from `show stat`."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(b"show stat\n")
            await writer.drain()
            text = (await reader.read()).decode()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        rows = csv.DictReader(text.lstrip("# ").splitlines())
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "receivers" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    async def wait_states(
        self, expected: dict[str, str], seconds: float = UP_TIMEOUT_SECONDS
    ) -> None:
        """Until every named receiver has the expected state (e.g. `{"receiver1": "UP"}`)."""
        deadline = time.monotonic() + seconds
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, "haproxy exited"
            with contextlib.suppress(OSError):
                seen = await self.states()
                if all(seen.get(name, "").startswith(state) for name, state in expected.items()):
                    return
            await asyncio.sleep(0.1)
        raise AssertionError(f"haproxy states {seen}, expected {expected}")


@dataclass
class Done:
    """One client operation that succeeded: an invoice created and its deposit acknowledged."""

    foreign_id: str
    address: str
    tx_id: int
    finished_at: float


@dataclass
class Traffic:
    """Clients that create invoices and report deposits through `base` until stopped."""

    base: str
    merchant: Merchant
    done: list[Done] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # client-visible, by status
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def _refused(self, status: int) -> None:
        key = str(status) if status else "network error"
        self.refusals[key] = self.refusals.get(key, 0) + 1

    async def run(self, clients: int) -> None:
        """Run `clients` concurrent clients until `stop` is set."""
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, n) for n in range(clients)))

    async def _client(self, session: aiohttp.ClientSession, client: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            foreign_id = f"lb-{client}-{n}"
            address, amount = await self._create(session, foreign_id)
            tx_id = client * 1_000_000 + n
            payload = json.dumps(deposit(address, amount, tx_id=tx_id)).encode()
            for _ in range(MAX_ATTEMPTS):
                status = await post_update(session, self.base, payload)
                if status == 200:
                    break
                self._refused(status)
                await asyncio.sleep(RETRY_DELAY_SECONDS)
            else:
                raise AssertionError(f"callback for {foreign_id} never acknowledged")
            self.done.append(Done(foreign_id, address, tx_id, time.monotonic()))

    async def _create(self, session: aiohttp.ClientSession, foreign_id: str) -> tuple[str, str]:
        """Create until it answers; the deposit address and amount.

        A 400 "already taken" means an earlier attempt did create it and its
        answer was lost: the client looks the invoice up, as a merchant would.
        """
        body = json.dumps(create_payload(foreign_id, sender_currency="BTC")).encode()
        for _ in range(MAX_ATTEMPTS):
            status, answer = await self._merchant_post(session, "/api/v2/invoices/create", body)
            if status == 200:
                return answer["data"]["address"], answer["data"]["sender_amount"]
            if status == 400 and "foreign_id" in (answer or {}).get("errors", {}):
                lookup = json.dumps({"foreign_id": foreign_id}).encode()
                status, answer = await self._merchant_post(
                    session, "/api/v2/invoices/status", lookup
                )
                if status == 200:  # the §9 snapshot
                    data = answer["data"]
                    return data["crypto_address"]["address"], data["currency_sent"]["amount"]
            self._refused(status)
            await asyncio.sleep(RETRY_DELAY_SECONDS)
        raise AssertionError(f"create of {foreign_id} never succeeded")

    async def _merchant_post(
        self, session: aiohttp.ClientSession, path: str, body: bytes
    ) -> tuple[int, Any]:
        headers = signed_headers(self.merchant.key, self.merchant.secret, body)
        try:
            async with session.post(self.base + path, data=body, headers=headers) as response:
                answer = await response.json(content_type=None)
                return response.status, answer
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return 0, None
