"""The loop that posts committed ledger entries to the merchants' balances.

commit.lua leaves a transition's ledger entries in its partition's ledger
outbox; `post_ledger` (worker/store/ledger.py) moves them onto the balances
exactly once. This loop runs it in every worker: at once when this process
committed entries (`wake`), else every `POLL_SECONDS` for other processes'.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from redis.asyncio import Redis

from worker.logs import get_logger
from worker.store.connection import REDIS_UNAVAILABLE
from worker.store.ledger import post_ledger
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
