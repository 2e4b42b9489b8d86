"""Group commit: concurrent callers share one Redis round trip instead of one each.

A caller submits an item and waits for its own result. The first submission
starts a flush; everything submitted while a flush is in flight goes into
the next one. An idle process therefore flushes at once (no timer, no added
latency) and a busy one spends one round trip on many items: the receiver
uses it for stream appends, the delivery loop for attempt records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# A flush returns one result per item, or the exception that item's write raised.
Flush = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class GroupCommit(Generic[T, R]):
    """Batches `submit` calls into calls of `flush`, at most `max_batch` items each."""

    def __init__(self, flush: Flush[T, R], max_batch: int) -> None:
        self._flush_items = flush
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Hand `item` to the next flush and wait for its result (or its exception)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        """Flush until nobody waits; each round takes what arrived during the previous one."""
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    results = await self._flush_items([item for item, _ in batch])
                except Exception as exc:  # the whole round trip failed: every caller learns it
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # the caller was cancelled
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        except BaseException:  # cancelled (shutdown): nobody may wait forever
            for _, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting = []
            raise
        finally:
            self._flusher = None
