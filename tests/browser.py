"""Helpers for the browser tests of the hosted pages: Chromium, a live receiver, screenshots.

The pages are tested in the Debian `chromium` package driven by Playwright
(no Playwright browser download). The receiver runs in the test's event loop
on a real port, with an in-process ingest loop applying processing callbacks,
so a page watches its invoice change exactly as it would in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from playwright.async_api import Page

from receiver import appkeys
from receiver.app import create_app
from receiver.pages import csrf
from receiver.pages.handlers import POLL_MS
from tests.support import PROCESSING_KEY, PROCESSING_SECRET, make_settings, signed_headers
from worker.domain.models import Merchant
from worker.ingest.consumer import Ingest
from worker.outbox.ledger import LedgerPoster
from worker.services.invoices import InvoiceService
from worker.store.ledger import pending_entries
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import free_port
from worker.store.streams import stream_backlog

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# A phone (iPhone 12-15 size): the pages are designed for it first.
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
# apt may need a while on a cold mirror (seconds).
APT_TIMEOUT_SECONDS = 600
# How long the in-process ingest loop may take to apply a callback (seconds).
APPLY_TIMEOUT_SECONDS = 10.0


def ensure_chromium() -> Path:
    """The Debian Chromium, installed with apt when missing; raise if that is impossible."""
    if CHROMIUM.exists():
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(f"{CHROMIUM} is missing and there is no apt-get to install it")
    install = [apt, "install", "-y", "chromium"]
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    result = subprocess.run(install, env=env, capture_output=True, timeout=APT_TIMEOUT_SECONDS)
    if result.returncode != 0:
        # A fresh container has no package lists yet.
        subprocess.run([apt, "update"], env=env, capture_output=True, timeout=APT_TIMEOUT_SECONDS)
        result = subprocess.run(install, env=env, capture_output=True, timeout=APT_TIMEOUT_SECONDS)
    if result.returncode != 0 or not CHROMIUM.exists():
        tail = result.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"apt-get install -y chromium failed ({result.returncode}): {tail}")
    return CHROMIUM


@dataclass
class Live:
    """A receiver on a real port with an ingest loop, and a signed client for its APIs."""

    base: str
    app: web.Application
    merchant: Merchant
    session: aiohttp.ClientSession

    @property
    def service(self) -> InvoiceService:
        return self.app[appkeys.SERVICE]

    async def merchant_post(self, path: str, payload: object) -> Any:
        """A signed merchant API call; its `data`."""
        body = json.dumps(payload).encode()
        headers = signed_headers(self.merchant.key, self.merchant.secret, body)
        async with self.session.post(self.base + path, data=body, headers=headers) as response:
            answer = await response.json()
            assert response.status == 200, answer
            return answer["data"]

    async def create(self, foreign_id: str, **fields: Any) -> dict[str, Any]:
        payload = {
            "timer": True,
            "title": "Green tea, 250 g",
            "description": "Sencha from Shizuoka.\nShipped within two days.",
            "currency": "EUR",
            "amount": "106.75",
            "foreign_id": foreign_id,
            **fields,
        }
        created: dict[str, Any] = await self.merchant_post("/api/v2/invoices/create", payload)
        return created

    async def status(self, foreign_id: str) -> dict[str, Any]:
        status: dict[str, Any] = await self.merchant_post(
            "/api/v2/invoices/status", {"foreign_id": foreign_id}
        )
        return status

    async def public(self, token: str) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/api/v2/public/invoices/{token}") as response:
            assert response.status == 200
            data: dict[str, Any] = (await response.json())["data"]
            return data

    async def form_token(self, url: str) -> tuple[dict[str, str], dict[str, str]]:
        """Open a page as a browser would: the form field and cookie a post from it carries.

        (The session's cookie jar keeps no cookies of an IP address host, so the
        cookie travels as a header.)
        """
        async with self.session.get(url) as response:
            field = re.search(rf'name="{csrf.FIELD}" value="([^"]+)"', await response.text())
            cookie = response.cookies.get(csrf.COOKIE)
        value = cookie.value if cookie is not None else field.group(1) if field else ""
        return {csrf.FIELD: value}, {"Cookie": f"{csrf.COOKIE}={value}"}

    async def refund_token(self, invoice_id: int) -> str:
        """The refund page's token, as the refund or payback e-mail carries it."""
        stored = await self.service.store.get(invoice_id)
        assert stored is not None and stored.invoice.refund_token is not None
        return stored.invoice.refund_token

    async def processing(self, payload: dict[str, Any]) -> None:
        """Send a signed processing callback (spec §8) and wait until the ingest loop applied it.

        The ingest loop deletes a stream entry only after committing its effect,
        so an empty stream means the invoice has changed.
        """
        body = json.dumps(payload).encode()
        headers = signed_headers(PROCESSING_KEY, PROCESSING_SECRET, body)
        async with self.session.post(
            self.base + "/api/v2/processing/callbacks", data=body, headers=headers
        ) as response:
            assert response.status == 200, await response.text()
        redis = self.app[appkeys.REDIS]
        deadline = asyncio.get_running_loop().time() + APPLY_TIMEOUT_SECONDS
        while await stream_backlog(redis) or await pending_entries(redis):
            assert asyncio.get_running_loop().time() < deadline, "update not applied"
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def live_receiver(redis_url: str) -> AsyncIterator[Live]:
    """Serve the receiver on 127.0.0.1 and apply processing updates in this loop."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    app = create_app(make_settings(redis_url, public_url=base, port=port))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    redis = app[appkeys.REDIS]
    await redis.flushall()
    merchant = make_merchant("Tea Shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(redis).add(merchant)
    ingest = Ingest(redis, app[appkeys.SERVICE], consumer="pages-test", reclaim_idle_ms=60_000)
    poster = LedgerPoster(redis, app[appkeys.SERVICE].store.scripts)
    tasks = [
        asyncio.create_task(ingest.run(), name="ingest"),
        asyncio.create_task(poster.run(), name="ledger"),
    ]
    session = aiohttp.ClientSession()
    try:
        yield Live(base, app, merchant, session)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        await runner.cleanup()


async def poll_now(page: Page) -> None:
    """Run the page's clock one poll interval ahead, so its next poll happens now.

    The page still fetches the public JSON and updates itself; the test only
    does not sit through the real interval (one test does, to prove it).
    """
    await page.clock.run_for(POLL_MS)


async def screenshot(page: Page, name: str) -> Path:
    """Save a full-page screenshot under test-artifacts/screenshots/ (looked at by people)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True, animations="disabled")
    return path
