"""A replicated Redis on loopback for the high-availability tests: primary, replicas, Sentinels.

Every process is a real `redis-server` (Sentinels are `redis-server --sentinel`)
bound to 127.0.0.1 on a free port, with its files in one folder, so a test
can SIGKILL the primary, SIGSTOP a replica or watch a failover happen.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from worker.store.redis_server import RedisServer, find_redis_server, free_port

MASTER_NAME = "coinvoice"
# Sentinels call the primary down after this long without an answer (milliseconds)...
DOWN_AFTER_MS = 1000
# ...and give up a failover attempt after this long (milliseconds).
FAILOVER_TIMEOUT_MS = 5000
# How long a Sentinel may take to answer PING after its start (seconds).
SENTINEL_START_SECONDS = 10.0


def _ping(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


@dataclass
class SentinelProcess:
    """One `redis-server --sentinel` watching the primary under MASTER_NAME."""

    data_dir: Path
    primary_port: int
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "sentinel.conf"  # Sentinel rewrites it: its own file
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.data_dir.resolve()}\n"
            f"logfile sentinel.log\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self.process = subprocess.Popen(
            [find_redis_server(), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + SENTINEL_START_SECONDS
        while not _ping(self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"sentinel on {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@dataclass
class ReplicatedRedis:
    """A primary (AOF, appendfsync always), its replicas and, optionally, three Sentinels."""

    data_dir: Path
    replica_count: int = 1
    sentinel_count: int = 3
    primary: RedisServer = field(init=False)
    replicas: list[RedisServer] = field(default_factory=list)
    sentinels: list[SentinelProcess] = field(default_factory=list)

    def start(self) -> ReplicatedRedis:
        self.primary = RedisServer(self.data_dir / "redis-0").start()
        for n in range(1, self.replica_count + 1):
            replica = RedisServer(
                self.data_dir / f"redis-{n}",
                extra_args=("--replicaof", "127.0.0.1", str(self.primary.port)),
            ).start()
            self.replicas.append(replica)
        self.wait_replicas(self.primary.port, self.replica_count)
        for n in range(self.sentinel_count):
            sentinel = SentinelProcess(self.data_dir / f"sentinel-{n}", self.primary.port)
            self.sentinels.append(sentinel.start())
        return self

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    @property
    def sentinel_setting(self) -> str:
        """The value of COINVOICE_REDIS_SENTINELS for this group."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def current_primary_port(self) -> int | None:
        """The primary's port as the first answering Sentinel names it."""
        for sentinel in self.sentinels:
            try:
                with redis.Redis(port=sentinel.port, socket_timeout=0.5) as client:
                    host_port = client.sentinel_get_master_addr_by_name(MASTER_NAME)
            except (redis.RedisError, OSError):
                continue
            if host_port:
                return int(host_port[1])
        return None

    def server_on(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    @staticmethod
    def wait_replicas(primary_port: int, count: int, seconds: float = 20.0) -> None:
        """Until `count` replicas are connected to the primary on `primary_port` and in sync."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with redis.Redis(port=primary_port, socket_timeout=0.5) as client:
                    info = client.info("replication")
                    online = [
                        v
                        for k, v in info.items()
                        if k.startswith("slave") and isinstance(v, dict) and v["state"] == "online"
                    ]
                    if len(online) >= count:
                        return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{count} replicas did not come online on {primary_port}")

    @staticmethod
    def pause(server: RedisServer) -> None:
        """SIGSTOP: the server is alive but answers nothing (a hung host)."""
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)

    @staticmethod
    def resume(server: RedisServer) -> None:
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            if server.process is not None and server.process.poll() is None:
                self.resume(server)
            server.stop()
