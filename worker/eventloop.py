"""The receiver's event loop: uvloop's.

uvloop (libuv, in C) runs the same asyncio code with less CPU per callback,
socket read and write than asyncio's own loop: the receiver answers more
callbacks per second of one core. Entry points call `run`; library code never
picks a loop.

Not (yet) the other processes: under uvloop an arq worker stopped by SIGTERM
let a CancelledError out of `Worker.close` and exited 1 with its batch
unfinished (tests/test_shutdown.py), and `coinvoice up` starts its children
with `process_group=0`, which uvloop's subprocess_exec refuses. `install`
is here for the worker once that is solved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def install() -> None:
    """Loops created from now on in this process (asyncio.get_event_loop, …) are uvloop's."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on a uvloop event loop."""
    return uvloop.run(coro)
