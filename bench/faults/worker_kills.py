"""Fault: a worker is killed with SIGKILL every few seconds while updates flow.

Run: `.venv/bin/python bench/faults/worker_kills.py` (about 20 seconds).

Two workers and a receiver; the distinct updates of INVOICES payment
scenarios are sent (shuffled) at RATE_PER_S; every KILL_EVERY_SECONDS one
worker, at random, gets SIGKILL wherever it is (mid-batch, mid-delivery) and
a new one starts (every other kill waits until the victim holds a batch it
has not acknowledged). Its unacknowledged updates are taken over by the others;
its leased callbacks are delivered after the lease.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncio
import random
from typing import Any

from bench.faults import common
from tests import processes

INVOICES = 600
RATE_PER_S = 150
KILL_EVERY_SECONDS = 2.0
WORKERS = 2


async def run(
    invoices: int = INVOICES, rate: float = RATE_PER_S, kill_every: float = KILL_EVERY_SECONDS
) -> dict[str, Any]:
    rng = random.Random(21)
    async with common.rig("worker-kills", invoices, seed=21) as rig:
        base = await rig.receiver()
        workers = [rig.worker(n) for n in range(WORKERS)]
        payloads = rig.payloads()
        rng.shuffle(payloads)
        sending = asyncio.create_task(common.send_paced(base, payloads, rate))
        kills = holding = 0
        while not sending.done():
            await asyncio.wait({sending}, timeout=kill_every)
            if sending.done():
                break
            victim = rng.randrange(WORKERS)
            # Every other kill waits (at most one kill interval, so a busy machine still
            # gets several kills into the flow) until the victim holds updates it has not
            # acknowledged, so some kills land between reading a batch and its ack.
            wait = kills % 2 == 0
            if await processes.kill_holding_entries(
                rig.redis, workers[victim], wait=wait, seconds=kill_every
            ):
                holding += 1
            kills += 1
            workers[victim] = rig.worker(100 + kills)
        sent = await sending
        return await common.verify(
            rig, sent, kills=kills, kills_holding_unacknowledged_updates=holding
        )


if __name__ == "__main__":
    common.main(asyncio.run(run()))
