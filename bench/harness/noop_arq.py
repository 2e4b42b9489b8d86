"""The baseline of the worker benchmark: an arq worker whose jobs do nothing.

`python -m bench.harness.noop_arq --redis URL --queue NAME` runs an arq
worker tuned for throughput, as an arq user would tune it to drain a queue
fast: burst mode (it exits once the queue is empty), `max_jobs` 100,
`poll_delay` 0.01 s, no kept results, logging off. (coinvoice's own arq
settings, `max_jobs` 20 and `poll_delay` 0.2 s, cap arq near 500 jobs/s: a
baseline that flatters us.) `enqueue` fills its queue from the bench process
before the worker starts, so what is measured is the drain rate.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker

# arq's throughput settings (not coinvoice's: see the module's docstring).
POLL_DELAY_SECONDS = 0.01
MAX_JOBS = 100
# Concurrent enqueue calls from the bench process.
ENQUEUE_CONCURRENCY = 64


async def noop(ctx: dict[str, Any]) -> None:
    """A job that does nothing: what is measured is arq's own cost per job."""


async def enqueue(redis_url: str, queue: str, count: int) -> None:
    """Queue `count` no-op jobs."""
    pool: ArqRedis = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        for start in range(0, count, ENQUEUE_CONCURRENCY):
            n = min(ENQUEUE_CONCURRENCY, count - start)
            await asyncio.gather(*(pool.enqueue_job("noop", _queue_name=queue) for _ in range(n)))
    finally:
        await pool.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--queue", required=True)
    args = parser.parse_args()
    # Logging off: arq's per-job lines cost it more than the job itself.
    logging.disable(logging.CRITICAL)
    Worker(
        functions=[noop],
        queue_name=args.queue,
        redis_settings=RedisSettings.from_dsn(args.redis),
        keep_result=0,
        poll_delay=POLL_DELAY_SECONDS,
        max_jobs=MAX_JOBS,
        handle_signals=True,
        burst=True,
    ).run()


if __name__ == "__main__":
    main()
