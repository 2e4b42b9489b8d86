"""The event loop of the receiver and the worker: uvloop's.

uvloop (libuv, in C) runs the same asyncio code with less CPU per callback,
socket read and write than asyncio's own loop: the receiver answers more
callbacks per second of one core, and the worker spends less CPU per update
(docs/performance.md, §8 Stop 18). Entry points call `run` (the receiver) or
build arq's Worker inside `loop` (the worker: arq takes the loop that is
current when it is built and runs it itself); library code never picks a loop.

Not `coinvoice up`: it starts its children with `process_group=0`, which
uvloop's subprocess_exec refuses; it stays on asyncio's loop (the receiver and
worker it starts are processes of their own, on uvloop).

The worker once let a CancelledError out of arq's `Worker.close` on SIGTERM
under uvloop (exit 1, its batch unfinished); `ResilientWorker.close`
(worker/app/main.py) now awaits the cancelled job tasks itself, and
tests/test_shutdown.py stops real workers, on this loop, with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def install() -> None:
    """Loops created from now on in this process (asyncio.get_event_loop, …) are uvloop's."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on a uvloop event loop."""
    return uvloop.run(coro)


@contextlib.contextmanager
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A new uvloop event loop, current in this thread until the block ends, then closed.

    For code that runs the current loop itself (arq's `Worker.run`). On the way
    out it is closed the way `asyncio.run` closes its own: the tasks still
    pending cancelled and awaited, async generators finalised, the default
    executor shut down.
    """
    new = uvloop.new_event_loop()
    asyncio.set_event_loop(new)
    try:
        yield new
    finally:
        try:
            _cancel_all_tasks(new)
            new.run_until_complete(new.shutdown_asyncgens())
            new.run_until_complete(new.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            new.close()


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """As `asyncio.run` does on its way out: cancel what is left and let it finish."""
    pending = asyncio.all_tasks(loop)
    if not pending:
        return
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    for task in pending:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during the worker's shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )
