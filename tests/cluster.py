"""A real Redis Cluster on loopback for the tests: 3 masters and 3 replicas (or none).

Six `redis-server --cluster-enabled yes` processes on free ports (each with
its own bus port) and one `redis-cli --cluster create … --cluster-replicas 1`,
exactly as an operator would build one, so a test can SIGKILL a master and
watch its replica take over.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from worker.store.redis_server import RedisServer, free_port

# A master that does not answer for this long is failed over (milliseconds).
NODE_TIMEOUT_MS = 1500
# How long the cluster may take to form, or to settle after a failover (seconds).
SETTLE_SECONDS = 30.0


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)


@dataclass
class LocalCluster:
    """3 masters + 3 replicas, every node a real redis-server bound to 127.0.0.1."""

    root: Path
    # Replicas per master (the benchmarks also run without any, to compare with one Redis).
    replicas: int = 1
    # Durability in the tests comes from replica acknowledgements (WAIT), as in the issue;
    # the benchmarks use "always" like every other one.
    appendfsync: str = "everysec"
    nodes: list[RedisServer] = field(default_factory=list)

    def start(self) -> LocalCluster:
        for n in range(3 * (1 + self.replicas)):
            node = RedisServer(
                data_dir=self.root / f"node{n}",
                appendfsync=self.appendfsync,
                extra_args=(
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                    # A replica may always take over, however long since it heard from its
                    # master (a busy 2-core machine delays replication pings).
                    "--cluster-replica-validity-factor", "0",
                    # Replicas sync at once instead of after Redis' 5 s batching delay.
                    "--repl-diskless-sync-delay", "0",
                    "--cluster-port", str(free_port()),
                ),
            )  # fmt: skip
            self.nodes.append(node.start())
        subprocess.run(
            [
                "redis-cli", "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        self.wait_settled(replicas_each=self.replicas)
        return self

    @property
    def startup_nodes(self) -> str:
        """COINVOICE_REDIS_CLUSTER_NODES for this cluster."""
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def master_ports(self) -> list[int]:
        """Ports of the masters serving slots, as a live node sees them."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            try:
                rows = _client(node.port).execute_command("CLUSTER", "NODES")
            except (redis.RedisError, OSError):
                continue
            text = rows.decode() if isinstance(rows, bytes) else str(rows)
            ports = []
            for line in text.splitlines():
                fields = line.split()
                if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8:
                    ports.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
            return sorted(ports)
        raise RuntimeError("no cluster node answers")

    def wait_settled(self, masters: int = 3, replicas_each: int = 1) -> None:
        """Until every live node says the cluster is ok and each master has its replicas."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            if self._settled(masters, replicas_each):
                return
            time.sleep(0.2)
        raise RuntimeError("the cluster did not settle")

    def _settled(self, masters: int, replicas_each: int) -> bool:
        try:
            live = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
            for node in live:
                info = _client(node.port).execute_command("CLUSTER", "INFO")
                if b"cluster_state:ok" not in info:
                    return False
            ports = self.master_ports()
            if len(ports) != masters:
                return False
            for port in ports:
                replication = _client(port).info("replication")
                online = [
                    value
                    for name, value in replication.items()
                    if name.startswith("slave")
                    and isinstance(value, dict)
                    and value.get("state") == "online"
                ]
                if len(online) < replicas_each:  # a replica still syncing holds nothing yet
                    return False
                if replication.get("role") != "master":
                    return False
            return True
        except (redis.RedisError, OSError):
            return False

    def key_counts(self) -> dict[int, int]:
        """Keys per master (DBSIZE), by port."""
        return {port: int(_client(port).dbsize()) for port in self.master_ports()}

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
