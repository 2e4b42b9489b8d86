"""The callback HTTP client alone: CPU µs per POST, ours (worker/outbox/http.py) and aiohttp's.

Run: `.venv/bin/python bench/callback_client.py` (about 20 s; prints one JSON object).

Both clients post the same signed callback (the headers `webhooks.headers`
makes) to the benchmarks' sink (bench/harness/sink_server.py, an aiohttp
server in its own process), CONCURRENCY requests in flight, over keep-alive
connections, reading the answer as the Deliverer does. They take turns, ROUNDS
rounds of N requests each, and each round is timed in CPU time of this process
only (the sink's CPU is not counted; on the shared machine the wall clock
counts other processes' time); the median round is reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from yarl import URL

from bench.harness import machine, stack
from worker.outbox.delivery import MAX_IN_FLIGHT, MAX_RESPONSE_BYTES
from worker.outbox.http import CallbackClient
from worker.outbox.webhooks import headers
from worker.store.merchants import make_merchant

ROUNDS = 7
N = 3_000
CONCURRENCY = 32  # the Deliverer's PER_MERCHANT_IN_FLIGHT


async def cpu_us_per_call(post: Callable[[], Awaitable[int]]) -> float:
    """CPU µs of this process per `post`, N of them CONCURRENCY at a time."""
    left = N

    async def lane() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            assert await post() == 200

    started = time.process_time()
    await asyncio.gather(*[lane() for _ in range(CONCURRENCY)])
    return (time.process_time() - started) / N * 1e6


async def main() -> dict[str, Any]:
    merchant = make_merchant("Bench shop", "http://127.0.0.1/callbacks")
    with tempfile.TemporaryDirectory(prefix="callback-client-") as tmp:
        sink = stack.SinkProcess(Path(tmp), merchant.secret).start()
        try:
            url = URL(sink.url)
            body = orjson.dumps({"id": 1, "sequence": 1, "status": "paid", "pad": "x" * 600})
            sent = {**headers(merchant, body, 1, 1, int(time.time())), "Host": "shop.example"}
            ours = CallbackClient(
                timeout=10, limit=MAX_IN_FLIGHT, max_response_bytes=MAX_RESPONSE_BYTES
            )
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

            async def post_ours() -> int:
                return await ours.post(url, body, sent, None)

            async def post_aiohttp() -> int:
                async with session.post(
                    url, data=body, headers=sent, allow_redirects=False
                ) as response:
                    await response.content.read(MAX_RESPONSE_BYTES)
                    return response.status

            clients = {"ours": post_ours, "aiohttp": post_aiohttp}
            rounds: dict[str, list[float]] = {name: [] for name in clients}
            for post in clients.values():
                await cpu_us_per_call(post)  # warm up: connections open, caches filled
            for _ in range(ROUNDS):
                for name, post in clients.items():
                    rounds[name].append(await cpu_us_per_call(post))
            await ours.close()
            await session.close()
        finally:
            sink.stop()
    median = {name: round(statistics.median(us), 1) for name, us in rounds.items()}
    return {
        "benchmark": "callback_client",
        "machine": machine.describe(),
        "requests_per_round": N,
        "concurrency": CONCURRENCY,
        "cpu_us_per_request_median": median,
        "cpu_us_per_request_rounds": {k: [round(x, 1) for x in v] for k, v in rounds.items()},
        "new_connections_ours": ours.connects,
        "ratio_aiohttp_to_ours": round(median["aiohttp"] / median["ours"], 2),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
