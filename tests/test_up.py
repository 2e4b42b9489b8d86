"""`coinvoice up` as a newcomer runs it: real processes, the embedded Redis, Ctrl-C (spec §11)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from receiver.commands.up import SINK_PATH, sink_app
from worker.domain.signing import sign
from worker.store.connection import REDIS_URL_FILE
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import free_port

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds processes in /proc"
)

# A cold start imports aiohttp, arq and bip-utils in two children (seconds).
START_TIMEOUT_SECONDS = 40.0
# Spec §11: Ctrl-C stops everything; the supervisor allows children 10 s to drain.
STOP_TIMEOUT_SECONDS = 15.0
POLL_SECONDS = 0.05
BANNER_END = "Ctrl-C stops everything."


@dataclass(frozen=True)
class Banner:
    """What `coinvoice up` printed, parsed."""

    text: str
    receiver_url: str
    redis_url: str
    key: str
    secret: str
    body: str
    signature: str
    sink_url: str


def parse_banner(text: str) -> Banner:
    def one(pattern: str) -> str:
        match = re.search(pattern, text, re.MULTILINE)
        assert match, f"{pattern!r} not in the banner:\n{text}"
        return match.group(1)

    return Banner(
        text=text,
        receiver_url=one(r"^  receiver\s+(\S+)$"),
        redis_url=one(r"^  redis\s+(\S+)"),
        key=one(r"^  key\s+(\S+)$"),
        secret=one(r"^  secret\s+(\S+)$"),
        body=one(r"^  body='(.*)'$"),
        signature=one(r"X-Processing-Signature: ([0-9a-f]+)'"),
        sink_url=one(r"^  callback sink\s+(\S+)"),
    )


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields after the command name in /proc/PID/stat: [state, ppid, pgrp, ...]."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, grandchildren…), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))):
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def started_for(data_dir: Path) -> list[int]:
    """Running processes whose environment names `data_dir`: the supervisor, receiver and
    worker of one `up` (redis-server overwrites its environment with its process title,
    so tests check its port instead)."""
    marker = f"COINVOICE_DATA_DIR={data_dir}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes() and running(int(entry.name)):
                    found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


async def assert_closed(redis_url: str) -> None:
    """Nothing listens on the Redis URL's port any more."""
    port = int(redis_url.removeprefix("redis://").split("/")[0].split(":")[1])
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


@dataclass
class Up:
    """One `coinvoice up` process with its output files."""

    process: asyncio.subprocess.Process
    out: Path
    err: Path
    env: dict[str, str]
    data_dir: Path
    seen: set[int]

    async def banner(self) -> Banner:
        """Wait for the banner; fail with the log when the process dies first."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while BANNER_END not in _read(self.out):
            if self.process.returncode is not None:
                pytest.fail(f"`coinvoice up` exited {self.process.returncode}:\n{_read(self.err)}")
            if time.monotonic() > deadline:
                pytest.fail(f"no banner after {START_TIMEOUT_SECONDS} s:\n{_read(self.err)}")
            await asyncio.sleep(POLL_SECONDS)
        self.seen |= descendants(self.process.pid)
        return parse_banner(_read(self.out))

    async def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        """Send `sig` the way a terminal would reach the supervisor; its exit code."""
        self.seen |= descendants(self.process.pid)
        self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_SECONDS)

    async def command(self, *args: str) -> tuple[int, str]:
        """Run another `coinvoice` command in the same folder and settings."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "receiver.commands.cli",
            *args,
            env=self.env,
            cwd=self.data_dir.parent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT_SECONDS)
        assert process.returncode is not None
        return process.returncode, stdout.decode() + stderr.decode()


StartUp = Callable[..., Awaitable[Up]]


@pytest.fixture
async def start_up(tmp_path: Path) -> AsyncIterator[StartUp]:
    """Start `coinvoice up` without COINVOICE_REDIS_URL; kill whatever a failed test left."""
    started: list[Up] = []
    port = free_port()

    async def start(data_dir: Path | None = None, port: int = port) -> Up:
        data_dir = data_dir or tmp_path / "data"
        # Only our settings: a developer's COINVOICE_REDIS_URL must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("COINVOICE_")}
        env |= {
            "COINVOICE_PORT": str(port),
            "COINVOICE_DATA_DIR": str(data_dir),
            "COINVOICE_MAILDIR": str(tmp_path / "maildir"),
            "COINVOICE_LOG_FORMAT": "json",
        }
        run = len(started)
        out, err = tmp_path / f"up-{run}.out", tmp_path / f"up-{run}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "receiver.commands.cli",
                "up",
                env=env,
                cwd=tmp_path,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        up = Up(process, out, err, env, data_dir, set())
        started.append(up)
        return up

    yield start
    for up in started:
        leftovers = up.seen | descendants(up.process.pid)
        if up.process.returncode is None:
            up.process.kill()
            await up.process.wait()
        for pid in leftovers:
            # Only ours: a PID seen earlier may belong to someone else by now.
            if running(pid) and (
                "receiver.commands.cli" in command_line(pid) or "redis" in command_line(pid)
            ):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
async def test_up_serves_and_its_printed_example_works(start_up: StartUp) -> None:
    """After `up` the receiver is ready, other commands find the embedded Redis, and the
    printed curl example creates an invoice."""
    up = await start_up()
    banner = await up.banner()
    assert (up.data_dir / REDIS_URL_FILE).read_text().strip() == banner.redis_url

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{banner.receiver_url}/health/ready") as response:
            assert response.status == 200
        headers = {
            "Content-Type": "application/json",
            "X-Processing-Key": banner.key,
            "X-Processing-Signature": banner.signature,
        }
        create = f"{banner.receiver_url}/api/v2/invoices/create"
        async with http.post(create, data=banner.body.encode(), headers=headers) as response:
            assert response.status == 200, await response.text()
            created = (await response.json())["data"]
    assert created["foreign_id"] == json.loads(banner.body)["foreign_id"]
    assert created["status"] == "pending"

    code, output = await up.command(
        "merchant", "add", "--name", "Second shop", "--callback-url", "http://127.0.0.1:9/cb"
    )
    assert code == 0, output
    added = json.loads(output)
    assert {
        "name",
        "key",
        "secret",
        "callback_url",
        "fee_percent",
        "underpayment_tolerance_percent",
    } <= added.keys()
    redis = aioredis.Redis.from_url(banner.redis_url)
    try:
        assert await redis.sismember("cv:merchants", added["key"])
    finally:
        await redis.aclose()

    code, output = await up.command("worker", "--check")
    assert code == 0, output
    assert await up.stop() == 0


@pytest.mark.slow
async def test_ctrl_c_stops_everything_and_exits_0(start_up: StartUp) -> None:
    """SIGINT ends `up` with 0 within the time limit, with no receiver, worker or
    redis-server left and the Redis URL file removed."""
    up = await start_up()
    banner = await up.banner()
    children = descendants(up.process.pid)
    commands = " | ".join(command_line(pid) for pid in children)
    assert "receiver.commands.cli receiver" in commands
    assert "receiver.commands.cli worker" in commands
    assert "redis-server" in commands

    assert await up.stop(signal.SIGINT) == 0
    assert not [pid for pid in children if running(pid)]
    assert not started_for(up.data_dir)
    assert not (up.data_dir / REDIS_URL_FILE).exists()
    await assert_closed(banner.redis_url)


@pytest.mark.slow
async def test_sigterm_stops_like_ctrl_c(start_up: StartUp) -> None:
    """SIGTERM (a service manager's stop) is handled like Ctrl-C."""
    up = await start_up()
    await up.banner()
    children = descendants(up.process.pid)
    assert await up.stop(signal.SIGTERM) == 0
    assert not [pid for pid in children if running(pid)]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["receiver.commands.cli worker", "redis-server"])
async def test_a_child_that_dies_stops_everything_with_a_failure(
    start_up: StartUp, victim: str
) -> None:
    """When the worker or the embedded Redis dies, `up` stops the rest and exits non-zero."""
    up = await start_up()
    await up.banner()
    children = descendants(up.process.pid)
    os.kill(next(pid for pid in children if victim in command_line(pid)), signal.SIGKILL)
    code = await asyncio.wait_for(up.process.wait(), STOP_TIMEOUT_SECONDS)
    assert code != 0
    assert not [pid for pid in children if running(pid)]
    assert "child_died" in _read(up.err)


@pytest.mark.slow
async def test_a_receiver_that_cannot_start_fails_up_clearly(start_up: StartUp) -> None:
    """With the port taken the receiver exits at start; `up` names it and its exit code,
    stops the rest and exits non-zero."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        up = await start_up(port=taken.getsockname()[1])
        code = await asyncio.wait_for(up.process.wait(), START_TIMEOUT_SECONDS)
    assert code == 1
    events = [json.loads(line) for line in _read(up.err).splitlines() if line.startswith("{")]
    failure = next(event for event in events if event["event"] == "up_failed")
    assert re.search(r"the receiver exited with code \d+ while starting", failure["reason"])
    assert not started_for(up.data_dir)
    assert not (up.data_dir / REDIS_URL_FILE).exists()
    redis = next(event for event in events if event["event"] == "redis_embedded_started")
    await assert_closed(redis["url"])


@pytest.mark.slow
async def test_a_restart_keeps_the_demo_merchant_and_the_data(start_up: StartUp) -> None:
    """A second `up` on the same data folder prints the same demo keys, moves the demo
    merchant's callback URL when the old sink port is taken, and an invoice created
    before the restart is still there (the embedded Redis persists to disk)."""
    first = await start_up()
    banner = await first.banner()
    headers = {
        "Content-Type": "application/json",
        "X-Processing-Key": banner.key,
        "X-Processing-Signature": banner.signature,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{banner.receiver_url}/api/v2/invoices/create",
            data=banner.body.encode(),
            headers=headers,
        ) as response,
    ):
        assert response.status == 200
    assert await first.stop() == 0

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", urlsplit(banner.sink_url).port or 0))
        taken.listen()
        second = await start_up(first.data_dir)
        again = await second.banner()
    assert (again.key, again.secret) == (banner.key, banner.secret)
    assert again.sink_url != banner.sink_url
    redis = aioredis.Redis.from_url(again.redis_url)
    try:
        merchant = await MerchantStore(redis).get(again.key)
    finally:
        await redis.aclose()
    assert merchant is not None
    assert merchant.callback_url == again.sink_url
    status_body = json.dumps({"foreign_id": json.loads(banner.body)["foreign_id"]}).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Processing-Key": again.key,
        "X-Processing-Signature": sign(again.secret, status_body),
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{again.receiver_url}/api/v2/invoices/status", data=status_body, headers=headers
        ) as response,
    ):
        assert response.status == 200, await response.text()
    assert await second.stop() == 0


async def test_the_demo_sink_checks_signatures_and_prints_one_line_each(
    redis: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """The callback sink answers 200 and prints foreign_id, status, sequence and whether
    the signature matched the merchant's secret."""
    merchant = make_merchant("Shop", "http://127.0.0.1:9/callbacks")
    await MerchantStore(redis).add(merchant)
    body = json.dumps({"foreign_id": "f-1", "status": "pending", "sequence": 3}).encode()
    async with TestClient(TestServer(sink_app(MerchantStore(redis)))) as client:
        for signature in (sign(merchant.secret, body), "0" * 128):
            headers = {"X-Processing-Key": merchant.key, "X-Processing-Signature": signature}
            response = await client.post(SINK_PATH, data=body, headers=headers)
            assert response.status == 200
    assert capsys.readouterr().out.splitlines() == [
        "callback  foreign_id=f-1  status=pending  sequence=3  signature ok",
        "callback  foreign_id=f-1  status=pending  sequence=3  signature BAD",
    ]
