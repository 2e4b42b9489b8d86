"""The event loop every coinvoice process runs on: uvloop's.

uvloop (libuv, in C) runs the same asyncio code with less CPU per callback,
socket read and write than asyncio's own loop: the receiver answers more
callbacks per second of one core, and the worker spends less on its Redis
round trips. Entry points call `run` (or `install` before a framework such as
arq creates its loop); library code never picks a loop.
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
