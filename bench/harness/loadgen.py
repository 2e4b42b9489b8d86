"""A lean HTTP/1.1 load generator on asyncio streams (keep-alive, prebuilt requests).

aiohttp's client costs more CPU per request than the server it measures, so
on two cores it would measure itself. This one writes prebuilt request bytes
and reads the answer with a minimal parser: a few tens of microseconds per
request.

* `fixed_rate`: open loop, request i is due at start + i / rate whatever
  happened before (latency counts from that due time, so a stall is not
  hidden by the generator waiting for it);
* `closed_loop`: N connections, each sending as soon as its last answer
  came: the fallback of the throughput benchmark when `wrk` is not installed
  (`python -m bench.harness.loadgen`, in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.harness.stats import summary_ms


def build_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The exact bytes of one POST with a body."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> int:
        """Send a request, read the whole answer; its status code."""
        return (await self.exchange(request))[0]

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send a request, read the whole answer; its status code and body."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


@dataclass
class Result:
    """What a run saw: per request, its due (or send) time, its answer time and status."""

    due: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    errors: int = 0

    def add(self, due: float, status: int) -> None:
        self.due.append(due)
        self.done.append(time.monotonic())
        self.status.append(status)

    def latencies(self) -> list[float]:
        return [d - s for s, d in zip(self.due, self.done, strict=True)]


async def fixed_rate(
    port: int, requests: Sequence[bytes], rate: float, max_connections: int = 64
) -> tuple[Result, list[float]]:
    """Send `requests` at `rate` per second (open loop); the results and each one's due time."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    opened = 0
    result = Result()
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic() + 0.05
    due_times = [start + i / rate for i in range(len(requests))]

    async def one(request: bytes, due: float) -> None:
        nonlocal opened
        if idle.empty() and opened < max_connections:
            opened += 1
            conn = await Connection.open(port)
        else:
            conn = await idle.get()
        try:
            result.add(due, await conn.send(request))
            idle.put_nowait(conn)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            result.errors += 1
            conn.close()
            opened -= 1

    for request, due in zip(requests, due_times, strict=True):
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(request, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    while not idle.empty():
        idle.get_nowait().close()
    return result, due_times


async def closed_loop(
    port: int, requests: Sequence[bytes], connections: int, seconds: float
) -> Result:
    """`connections` senders cycling through `requests` for `seconds`."""
    result = Result()
    stop_at = time.monotonic() + seconds

    async def sender(offset: int) -> None:
        conn = await Connection.open(port)
        i = offset
        try:
            while time.monotonic() < stop_at:
                sent = time.monotonic()
                result.add(sent, await conn.send(requests[i % len(requests)]))
                i += connections
        finally:
            conn.close()

    await asyncio.gather(*(sender(n) for n in range(connections)))
    return result


def main() -> None:
    """Closed-loop run from a file of prebuilt requests (JSON list of latin-1 strings)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with open(args.requests) as f:
        requests = [r.encode("latin-1") for r in json.load(f)]
    started = time.monotonic()
    result = asyncio.run(closed_loop(args.port, requests, args.connections, args.seconds))
    elapsed = time.monotonic() - started
    ok = sum(1 for s in result.status if s == 200)
    print(
        json.dumps(
            {
                "requests": len(result.status),
                "ok": ok,
                "seconds": round(elapsed, 3),
                "latency": summary_ms(result.latencies()),
            }
        )
    )


if __name__ == "__main__":
    main()
