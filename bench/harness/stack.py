"""The processes a benchmark runs: its own Redis, receivers, workers, a merchant sink.

Receivers and workers are the real `python -m receiver.commands.cli …` children of
tests/processes.py, with warning-level logs unless a bench asks for the default level.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests import processes
from worker.logs import configure_logging
from worker.store.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
# How long a helper process may take to listen (seconds).
START_TIMEOUT_SECONDS = 20.0
# Scratch folders (Redis's AOF among them) live in memory where the machine has a tmpfs:
# an fsync there costs nothing, so `appendfsync always` does not hold back a baseline that
# waits on every write (arq drains ~1,000 no-op jobs/s with its AOF on this machine's disk,
# ~2,100/s on tmpfs, what an outside harness measured). The strongest baseline, not ours.
SCRATCH_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


def quiet_logging() -> None:
    """Only errors from the bench process itself, on stderr: stdout carries the JSON result."""
    configure_logging("json", "error")


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder for Redis data and process logs, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"coinvoice-{prefix}-", dir=SCRATCH_ROOT))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def redis_server(data_dir: Path, appendfsync: str = "always") -> Iterator[RedisServer]:
    """A private redis-server (AOF, `appendfsync always` unless told otherwise)."""
    server = RedisServer(data_dir=data_dir / "redis", appendfsync=appendfsync).start()
    try:
        yield server
    finally:
        server.stop()


def child_env(redis_url: str, log_level: str | None = "warning", **extra: str) -> dict[str, str]:
    """Receiver/worker environment: test keys, JSON logs, fast reclaim.

    Logs at warning level unless told otherwise; `log_level=None` leaves the product's
    default (info: a JSON line per state change, the access log on), as in production.
    """
    env = processes.child_env(redis_url, **extra)
    if log_level is None:
        env.pop("COINVOICE_LOG_LEVEL", None)
    else:
        env["COINVOICE_LOG_LEVEL"] = log_level
    return env


def wait_listening(port: int, child: subprocess.Popen[bytes] | None = None) -> None:
    """Until something accepts TCP connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            raise RuntimeError(f"helper process exited with {child.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def python_module(module: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start `python -m bench.harness.<module>` from the repository root."""
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", f"bench.harness.{module}", *args],
            cwd=ROOT,
            stdout=out,
            stderr=out,
        )
    finally:
        out.close()


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def receiver(env: dict[str, str], log_dir: Path) -> tuple[processes.Child, str, int]:
    """A ready receiver process: the child, its base URL and its port."""
    child, base = await processes.receiver(env, log_dir)
    return child, base, int(base.rsplit(":", 1)[1])


def worker(env: dict[str, str], log_dir: Path, n: int = 0) -> processes.Child:
    return processes.worker(env, log_dir, n)


class SinkProcess:
    """A merchant callback endpoint in its own process (bench/harness/sink_server.py).

    Every callback it receives is appended to a JSONL file with its arrival
    time, so its record survives the process being stopped and started again.
    """

    def __init__(self, log_dir: Path, secret: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.secret = secret
        self.records = log_dir / "sink.jsonl"
        self.log = log_dir / "sink.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/callbacks"

    def start(self) -> SinkProcess:
        self.process = python_module(
            "sink_server",
            f"--port={self.port}",
            f"--out={self.records}",
            f"--secret={self.secret}",  # one argument: a secret may start with "-"
            log=self.log,
        )  # fmt: skip
        wait_listening(self.port, self.process)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def received(self) -> list[dict[str, object]]:
        """Every callback recorded so far, in arrival order."""
        if not self.records.exists():
            return []
        lines = self.records.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]


async def sleep_until(deadline: float) -> None:
    """Sleep until `time.monotonic()` reaches `deadline`."""
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
