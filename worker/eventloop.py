"""The receiver's event loop: uvloop's.

uvloop (libuv, in C) runs the same asyncio code with less CPU per callback,
socket read and write than asyncio's own loop: the receiver answers more
callbacks per second of one core. Entry points call `run`; library code never
picks a loop.

Not the other processes:

* the worker: it ran on uvloop (commit d7889ab, reverted) and passed every
  test that starts or stops one (the CancelledError that once escaped arq's
  `Worker.close` on SIGTERM is gone since `ResilientWorker.close` awaits the
  cancelled jobs itself), but it did not pay: its CPU per update stayed
  within the benchmark's noise (docs/performance.md, §8 Stop 18). asyncio's
  own loop code was ~7 % of the worker's CPU in a profile (it works in
  batches of 256 updates; its time goes to the state machine, decoding,
  Redis replies, logging and the garbage collector), so no loop can save
  much there;
* `coinvoice up`: it starts its children with `process_group=0`, which
  uvloop's subprocess_exec refuses.

`install` is here for a process that would switch.
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
