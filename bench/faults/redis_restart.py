"""Fault: Redis is killed (SIGKILL) and restarted from its AOF while updates flow.

Run: `.venv/bin/python bench/faults/redis_restart.py` (about 20 seconds).

One receiver and one worker; the distinct updates of INVOICES payment
scenarios are sent (shuffled) at RATE_PER_S, and every RESTART_EVERY_SECONDS
Redis crashes and comes back on the same port from its append-only file
(appendfsync always). Senders retry what was refused; everything that was
acknowledged must survive, be applied once and be delivered.
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
RESTART_EVERY_SECONDS = 4.0


async def run(
    invoices: int = INVOICES, rate: float = RATE_PER_S, every: float = RESTART_EVERY_SECONDS
) -> dict[str, Any]:
    rng = random.Random(31)
    async with common.rig("redis-restart", invoices, seed=31) as rig:
        base = await rig.receiver()
        rig.worker(0)
        payloads = rig.payloads()
        rng.shuffle(payloads)
        sending = asyncio.create_task(common.send_paced(base, payloads, rate))
        restarts = 0
        while not sending.done():
            await asyncio.wait({sending}, timeout=every)
            if sending.done():
                break
            rig.server.restart(kill=True)
            restarts += 1
        sent = await sending
        alive = all(child.alive() for child in rig.children)
        report = await common.verify(rig, sent, redis_restarts=restarts, processes_alive=alive)
        if not alive:
            report["problems"].append("a receiver or worker died with Redis")
            report["ok"] = False
        return report


if __name__ == "__main__":
    common.main(asyncio.run(run()))
