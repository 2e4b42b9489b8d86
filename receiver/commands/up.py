"""`coinvoice up`: Redis, a receiver, a worker and a demo merchant on one machine.

For a first look, not for production (there: `coinvoice receiver` and
`coinvoice worker` under a process manager, against a managed Redis).

The supervisor starts the embedded Redis when COINVOICE_REDIS_URL is unset,
runs one receiver and one worker as child processes in their own process
groups, so a terminal's Ctrl-C reaches only the supervisor, which then stops
them in order: children first (they drain against a live Redis), Redis last.
It also serves a small merchant callback sink in its own event loop, registers
a demo merchant whose callback URL is that sink, and prints what a newcomer
needs to create a first invoice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.app.main import check as worker_alive
from worker.config import Settings
from worker.domain.models import Merchant
from worker.domain.signing import sign, verify
from worker.logs import configure_logging, get_logger
from worker.store.connection import REDIS_URL_FILE, connect_url
from worker.store.merchants import (
    MerchantStore,
    make_merchant,
    merchant_from_json,
    merchant_to_json,
)
from worker.store.redis_server import RedisServer, free_port

log = get_logger(__name__)

# How long the receiver and the worker get to become ready (seconds).
READY_TIMEOUT_SECONDS = 30.0
# Poll interval while waiting for readiness and while watching the children (seconds).
POLL_SECONDS = 0.1
# After SIGTERM a child gets this long before SIGKILL (seconds): well over the
# shutdown budget given to the children below.
STOP_TIMEOUT_SECONDS = 10.0
# The children's COINVOICE_SHUTDOWN_SECONDS at most: no load balancer watches a
# `coinvoice up` receiver, so its drain (a quarter of this) only delays Ctrl-C.
CHILD_SHUTDOWN_SECONDS = 4.0
# The demo merchant (with its secret) is kept in this file of the data folder, so
# a restart shows the same keys.
DEMO_MERCHANT_FILE = "demo-merchant.json"
DEMO_MERCHANT_NAME = "Demo shop"
SINK_PATH = "/callbacks"
# Loopback addresses to reach a receiver that listens on every interface.
_WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


class StartFailed(RuntimeError):
    """Something `coinvoice up` started did not come up; the message says what."""


@dataclass
class Child:
    """A receiver or worker process, leader of its own process group."""

    name: str
    process: asyncio.subprocess.Process

    @property
    def exit_code(self) -> int | None:
        return self.process.returncode

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal the child's whole process group (anything it started goes too)."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)


def up(settings: Settings) -> int:
    """Run everything until Ctrl-C or SIGTERM; 0 after a clean stop, 1 on a failure."""
    configure_logging(settings.log_format, settings.log_level)
    if settings.port == 0:
        # The children must listen where we look for them: pick the port here.
        settings = settings.model_copy(update={"port": free_port()})
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    return asyncio.run(Supervisor(settings).run())


class Supervisor:
    """Starts, watches and stops what `coinvoice up` runs, in that order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.stop = asyncio.Event()
        self.children: list[Child] = []
        self.embedded: RedisServer | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop, sig)
        try:
            async with contextlib.AsyncExitStack() as stack:
                url = await stack.enter_async_context(self._redis())
                redis = connect_url(url)
                stack.push_async_callback(redis.aclose)
                merchant, sink_url = await stack.enter_async_context(self._sink(redis))
                stack.push_async_callback(self._stop_children)
                await self._start_children(url)
                if not await self._wait_ready(url):
                    return 0  # stopped while starting
                self._print_banner(url, merchant, sink_url)
                return await self._watch()
        except StartFailed as exc:
            log.error("up_failed", reason=str(exc))
            return 1
        finally:
            log.info("up_stopped")

    def _request_stop(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            log.info("up_stopping", signal=sig.name)
        self.stop.set()

    # ----------------------------------------------------------------------- Redis

    @contextlib.asynccontextmanager
    async def _redis(self) -> AsyncIterator[str]:
        """COINVOICE_REDIS_URL as is, else an embedded redis-server for our lifetime."""
        if self.settings.redis_url:
            log.info("redis_external", url=self.settings.redis_url)
            yield self.settings.redis_url
            return
        url_file = self.data_dir / REDIS_URL_FILE
        await self._refuse_second_up(url_file)
        server = RedisServer(data_dir=self.data_dir / "redis")
        try:
            await asyncio.to_thread(server.start)
        except RuntimeError as exc:  # RedisNotFound, or it exited at start
            raise StartFailed(f"the embedded Redis did not start: {exc}") from exc
        self.embedded = server
        try:
            # Other `coinvoice` commands in this folder find the embedded Redis here.
            url_file.write_text(server.url + "\n")
            log.info("redis_embedded_started", url=server.url, data_dir=str(server.data_dir))
            yield server.url
        finally:
            with contextlib.suppress(FileNotFoundError):
                url_file.unlink()
            await asyncio.to_thread(server.stop)
            log.info("redis_embedded_stopped")

    async def _refuse_second_up(self, url_file: Path) -> None:
        """Two embedded Redis servers on one data folder would corrupt its AOF."""
        url = _read_text(url_file)
        if not url:
            return
        client: Redis = Redis.from_url(url, socket_connect_timeout=0.5)
        try:
            await client.ping()
        except (RedisError, OSError, ValueError):
            return  # left behind by a `coinvoice up` that was killed: take over
        finally:
            await client.aclose()
        raise StartFailed(
            f"another `coinvoice up` runs in {self.data_dir} (its Redis answers at {url}); "
            "stop it or set COINVOICE_DATA_DIR"
        )

    # ----------------------------------------------------------------------- demo merchant

    @contextlib.asynccontextmanager
    async def _sink(self, redis: Redis) -> AsyncIterator[tuple[Merchant, str]]:
        """Serve the callback sink and make sure the demo merchant posts to it."""
        stored = self._load_demo_merchant()
        runner = web.AppRunner(sink_app(MerchantStore(redis)), access_log=None)
        await runner.setup()
        try:
            port = await _start_site(runner, _port_of(stored.callback_url) if stored else 0)
            sink_url = f"http://127.0.0.1:{port}{SINK_PATH}"
            try:
                merchant = await self._ensure_demo_merchant(redis, stored, sink_url)
            except RedisError as exc:
                raise StartFailed(f"cannot use Redis to register the demo merchant: {exc}") from exc
            yield merchant, sink_url
        finally:
            await runner.cleanup()

    def _load_demo_merchant(self) -> Merchant | None:
        path = self.data_dir / DEMO_MERCHANT_FILE
        if not path.exists():
            return None
        try:
            return merchant_from_json(path.read_text())
        except ValueError:
            log.warning("demo_merchant_file_unreadable", path=str(path), hint="a new one is made")
            return None

    async def _ensure_demo_merchant(
        self, redis: Redis, stored: Merchant | None, sink_url: str
    ) -> Merchant:
        """The same demo merchant across restarts, registered in Redis, posting to the sink."""
        merchant = stored or make_merchant(DEMO_MERCHANT_NAME, sink_url)
        if merchant.callback_url != sink_url:
            merchant = replace(merchant, callback_url=sink_url)
        merchants = MerchantStore(redis)
        current = await merchants.get(merchant.key)
        if current is None:
            await merchants.add(merchant)
        elif current.callback_url != sink_url:
            await merchants.replace(merchant)  # the sink's old port was taken this time
        _write_private(self.data_dir / DEMO_MERCHANT_FILE, merchant_to_json(merchant))
        log.info("demo_merchant_ready", merchant=merchant.key, reused=stored is not None)
        return merchant

    # ----------------------------------------------------------------------- children

    def _child_env(self, url: str) -> dict[str, str]:
        env = dict(os.environ)
        env["COINVOICE_REDIS_URL"] = url
        env["COINVOICE_PORT"] = str(self.settings.port)
        env["COINVOICE_DATA_DIR"] = str(self.data_dir)
        # The demo merchant's sink listens on 127.0.0.1, which delivery refuses by default.
        env["COINVOICE_ALLOW_PRIVATE_CALLBACKS"] = "1"
        env["COINVOICE_SHUTDOWN_SECONDS"] = str(
            min(self.settings.shutdown_seconds, CHILD_SHUTDOWN_SECONDS)
        )
        return env

    async def _start_children(self, url: str) -> None:
        env = self._child_env(url)
        for name in ("receiver", "worker"):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "receiver.commands.cli",
                name,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                # Our own group: the terminal's Ctrl-C is ours to turn into an ordered stop.
                process_group=0,
            )
            self.children.append(Child(name, process))
            log.info("child_started", child=name, pid=process.pid)

    async def _wait_ready(self, url: str) -> bool:
        """Poll until the receiver is ready and the worker beats; False if asked to stop."""
        ready_url = f"{self.receiver_url}/health/ready"
        settings = self.settings.model_copy(update={"redis_url": url})
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        receiver_ready = worker_ready = False
        timeout = aiohttp.ClientTimeout(total=1)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not (receiver_ready and worker_ready):
                if self.stop.is_set():
                    return False
                dead = await self._unexpected_deaths()
                if dead:
                    name, code = next(iter(dead.items()))
                    raise StartFailed(
                        f"the {name} exited with code {code} while starting (its log is above)"
                    )
                if time.monotonic() > deadline:
                    waiting = [
                        name
                        for name, ready in (("receiver", receiver_ready), ("worker", worker_ready))
                        if not ready
                    ]
                    raise StartFailed(
                        f"not ready after {READY_TIMEOUT_SECONDS:.0f} s: {', '.join(waiting)}"
                    )
                if not receiver_ready:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with http.get(ready_url) as response:
                            receiver_ready = response.status == 200
                if not worker_ready:
                    worker_ready = await worker_alive(settings)
                await asyncio.sleep(POLL_SECONDS)
        log.info("up_ready", receiver=self.receiver_url)
        return True

    async def _watch(self) -> int:
        """Wait for a stop request (0) or for a child to die (1)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), POLL_SECONDS)
            if self.stop.is_set():
                return 0
            dead = await self._unexpected_deaths()
            if dead:
                log.error("child_died", children=dead, hint="stopping everything")
                return 1

    def _exit_codes(self) -> dict[str, int]:
        """Name → exit code of every process we started that has ended."""
        codes = {c.name: c.exit_code for c in self.children if c.exit_code is not None}
        if self.embedded is not None and self.embedded.process is not None:
            code = self.embedded.process.poll()  # non-blocking (WNOHANG)
            if code is not None:
                codes["embedded Redis"] = code
        return codes

    async def _unexpected_deaths(self) -> dict[str, int]:
        """The processes that ended although nobody asked us to stop.

        Every child runs in a session of its own, so a terminal's Ctrl-C reaches
        only this process: a child that ended before we signalled it died.
        """
        return {} if self.stop.is_set() else self._exit_codes()

    async def _stop_children(self) -> None:
        """SIGTERM every child, give them STOP_TIMEOUT_SECONDS to drain, then SIGKILL."""
        for child in self.children:
            child.signal_group(signal.SIGTERM)
        waits = asyncio.gather(*(child.process.wait() for child in self.children))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waits, STOP_TIMEOUT_SECONDS)
        for child in self.children:
            if child.exit_code is None:
                log.warning("child_killed", child=child.name, after_seconds=STOP_TIMEOUT_SECONDS)
                child.signal_group(signal.SIGKILL)
            code = await child.process.wait()
            log.info("child_stopped", child=child.name, exit_code=code)

    # ----------------------------------------------------------------------- banner

    @property
    def receiver_url(self) -> str:
        """Where this machine reaches the receiver (not COINVOICE_PUBLIC_URL)."""
        host = _WILDCARD_HOSTS.get(self.settings.host, self.settings.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.settings.port}"

    def _print_banner(self, url: str, merchant: Merchant, sink_url: str) -> None:
        print(banner(self.settings, self.receiver_url, url, merchant, sink_url), flush=True)


def banner(
    settings: Settings, receiver_url: str, redis_url: str, merchant: Merchant, sink_url: str
) -> str:
    """What a newcomer reads after `coinvoice up`: URLs, demo keys and a working curl."""
    body = create_example_body()
    signature = sign(merchant.secret, body.encode())
    redis_note = "(COINVOICE_REDIS_URL)" if settings.redis_url else "(embedded)"
    lines = [
        "",
        "coinvoice is up.",
        "",
        f"  receiver      {receiver_url}",
        f"  hosted pages  {settings.base_url}/invoice/<token>",
        f"  redis         {redis_url}  {redis_note}",
        f"  callback sink {sink_url}  (demo merchant; each callback is printed below)",
        "",
        f"Demo merchant {merchant.name!r}",
        f"  key     {merchant.key}",
        f"  secret  {merchant.secret}",
        "",
        "Create an invoice (the signature is the HMAC-SHA512 of exactly this body):",
        "",
        f"  body={shlex.quote(body)}",
        f"  curl -sS {receiver_url}/api/v2/invoices/create \\",
        "    -H 'Content-Type: application/json' \\",
        f"    -H 'X-Processing-Key: {merchant.key}' \\",
        f"    -H 'X-Processing-Signature: {signature}' \\",
        '    --data "$body"',
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def create_example_body() -> str:
    """A create request with a fresh foreign_id, so the example works on every run."""
    payload = {
        "timer": True,
        "title": "Tea",
        "currency": "EUR",
        "amount": "106.75",
        "sender_currency": "BTC",
        "foreign_id": f"demo-{secrets.token_hex(4)}",
    }
    return json.dumps(payload, separators=(",", ":"))


# --------------------------------------------------------------------------- callback sink


def sink_app(merchants: MerchantStore) -> web.Application:
    """A stand-in merchant: checks each callback's signature and prints one line."""

    async def receive(request: web.Request) -> web.Response:
        raw = await request.read()
        key = request.headers.get("X-Processing-Key", "")
        merchant = await merchants.get(key) if key else None
        signed = merchant is not None and verify(
            merchant.secret, raw, request.headers.get("X-Processing-Signature")
        )
        try:
            payload = json.loads(raw)
        except ValueError:
            print(f"callback  not JSON ({len(raw)} bytes)  signature {_ok(signed)}", flush=True)
            return web.json_response({"error": "not JSON"}, status=400)
        print(callback_line(payload, signed), flush=True)
        # A real merchant would refuse a bad signature; the demo answers 200 so
        # that a mistake shows up once above instead of as a retry storm.
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post(SINK_PATH, receive)
    return app


def callback_line(payload: object, signed: bool) -> str:
    """`callback  foreign_id=…  status=…  sequence=…  signature ok|BAD` for one callback."""
    fields: Mapping[str, object] = payload if isinstance(payload, dict) else {}
    return (
        f"callback  foreign_id={fields.get('foreign_id')}  status={fields.get('status')}  "
        f"sequence={fields.get('sequence')}  signature {_ok(signed)}"
    )


def _ok(signed: bool) -> str:
    return "ok" if signed else "BAD"


async def _start_site(runner: web.AppRunner, preferred_port: int) -> int:
    """Listen on 127.0.0.1, on the port of the last run when it is free (the demo
    merchant's callback URL then stays the same), else on any free port."""
    for port in dict.fromkeys((preferred_port, 0)):
        site = web.TCPSite(runner, "127.0.0.1", port)
        try:
            await site.start()
        except OSError:
            await site.stop()  # unregister the site that could not bind
            continue
        return int(runner.addresses[-1][1])
    raise StartFailed("could not open a port for the demo callback sink")


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read: the demo merchant's holds its signing secret."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as file:
        file.write(data)
    path.chmod(0o600)  # a file from an older run may have had wider rights


def _read_text(path: Path) -> str:
    """The stripped content of a small state file; empty when it does not exist."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _port_of(url: str) -> int:
    try:
        return urlsplit(url).port or 0
    except ValueError:
        return 0
