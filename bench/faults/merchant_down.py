"""Fault: the merchant's callback endpoint is down for a while, then back.

Run: `.venv/bin/python bench/faults/merchant_down.py` (about 20 seconds).

One receiver and one worker; the distinct updates of INVOICES payment
scenarios are sent at RATE_PER_S. DOWN_AFTER_SECONDS in, the merchant's
endpoint stops (connections refused) for DOWN_SECONDS, then listens again
on the same port. Callbacks retry on the (shortened) schedule; every
invoice's final snapshot must arrive, and no invoice's sequence may go
backwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncio
import random
from typing import Any

from bench.faults import common

INVOICES = 400
RATE_PER_S = 100
DOWN_AFTER_SECONDS = 3.0
DOWN_SECONDS = 8.0


async def run(
    invoices: int = INVOICES,
    rate: float = RATE_PER_S,
    down_after: float = DOWN_AFTER_SECONDS,
    down_for: float = DOWN_SECONDS,
) -> dict[str, Any]:
    rng = random.Random(41)
    async with common.rig("merchant-down", invoices, seed=41) as rig:
        base = await rig.receiver()
        rig.worker(0)
        payloads = rig.payloads()
        rng.shuffle(payloads)
        sending = asyncio.create_task(common.send_paced(base, payloads, rate))
        await asyncio.sleep(down_after)
        before = len(rig.sink.received())
        rig.sink.stop()
        await asyncio.sleep(down_for)
        rig.sink.start()
        sent = await sending
        return await common.verify(
            rig,
            sent,
            merchant_down_s=down_for,
            callbacks_before_outage=before,
        )


if __name__ == "__main__":
    common.main(asyncio.run(run()))
