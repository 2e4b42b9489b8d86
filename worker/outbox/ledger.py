"""The loop that posts committed ledger entries to the merchants' balances.

commit.lua leaves a transition's ledger entries in its partition's ledger
outbox; `post_ledger` (worker/store/ledger.py) moves them onto the balances
exactly once. This loop runs it in every worker: at once when this process
committed entries (`wake`), else every `POLL_SECONDS` for other processes'.
On SIGTERM the worker's shutdown cancels the loop and calls `drain`, so the
entries of the last batch it applied are on the balances before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from redis.asyncio import Redis

from worker.logs import get_logger
from worker.store.connection import REDIS_UNAVAILABLE
from worker.store.ledger import POST_BATCH, post_ledger
from worker.store.scripts import Scripts

log = get_logger(__name__)

# The loop looks for entries at least this often (seconds); local commits wake it at once.
POLL_SECONDS = 0.2


@dataclass
class LedgerPoster:
    """Posts ledger entries of every partition; any number may run at once."""

    redis: Redis
    scripts: Scripts
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        """Post now (called when this process committed ledger entries)."""
        self._wakeup.set()

    async def run(self) -> None:
        """Post forever; ride out Redis errors (the entries wait in the outbox)."""
        while True:
            try:
                if await post_ledger(self.redis, self.scripts):
                    continue  # more may be waiting
            except REDIS_UNAVAILABLE as exc:
                log.warning("ledger_redis_error", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), POLL_SECONDS)
            self._wakeup.clear()

    async def drain(self, seconds: float) -> int:
        """Post what the outboxes hold now, for at most `seconds`; how many were posted.

        Called once the loop is cancelled and nothing more is applied here. Rounds go
        on while one reads a full batch (POST_BATCH), so other workers' later entries
        do not keep it going. Stopping mid-post is safe: post_ledger is idempotent,
        the next poster finishes it.
        """
        posted = 0

        async def post_all() -> None:
            nonlocal posted
            while True:
                count = await post_ledger(self.redis, self.scripts)
                posted += count
                if count < POST_BATCH:
                    return

        try:
            await asyncio.wait_for(post_all(), max(0.0, seconds))
        except TimeoutError:
            log.warning("ledger_drain_timeout", posted=posted, seconds=seconds)
        except REDIS_UNAVAILABLE as exc:
            log.warning("ledger_redis_error", error=repr(exc))
        return posted
