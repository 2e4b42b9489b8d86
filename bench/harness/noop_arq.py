"""The baseline of the worker benchmark: an arq worker whose jobs do nothing.

`python -m bench.harness.noop_arq --redis URL --queue NAME` runs an arq
worker with the same arq settings as coinvoice's (worker/app/main.py:
`poll_delay` 0.2 s, `max_jobs` 20, no kept results) and one job, `noop`.
`enqueue` fills its queue from the bench process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker

# arq settings of coinvoice's worker (worker/app/main.py build_worker).
POLL_DELAY_SECONDS = 0.2
MAX_JOBS = 20
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
    # As in coinvoice's worker: arq's per-job INFO lines are not written.
    logging.basicConfig(level=logging.WARNING)
    Worker(
        functions=[noop],
        queue_name=args.queue,
        redis_settings=RedisSettings.from_dsn(args.redis),
        keep_result=0,
        poll_delay=POLL_DELAY_SECONDS,
        max_jobs=MAX_JOBS,
        handle_signals=True,
    ).run()


if __name__ == "__main__":
    main()
