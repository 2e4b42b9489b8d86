"""Fault: a duplicate storm, every processing callback sent COPIES times, shuffled.

Run: `.venv/bin/python bench/faults/duplicate_storm.py` (about 10 seconds).

One receiver and two workers; CONCURRENCY senders deliver COPIES copies of
each distinct update of INVOICES payment scenarios in random order as fast
as the receiver takes them. Duplicates must change nothing: the invoices,
ledger, e-mails and callbacks are those of each update applied once, and the
`applied` counter never exceeds the number of distinct updates.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncio
import random
from typing import Any

from bench.faults import common

INVOICES = 300
COPIES = 10
CONCURRENCY = 32
UNPACED_RATE_PER_S = 100_000  # as fast as the receiver answers


async def run(invoices: int = INVOICES, copies: int = COPIES) -> dict[str, Any]:
    rng = random.Random(51)
    async with common.rig("duplicate-storm", invoices, seed=51) as rig:
        base = await rig.receiver()
        rig.worker(0)
        rig.worker(1)
        payloads = [p for p in rig.payloads() for _ in range(copies)]
        rng.shuffle(payloads)
        sent = await common.send_paced(base, payloads, UNPACED_RATE_PER_S, CONCURRENCY)
        report = await common.verify(rig, sent, copies=copies)
        if report["applied"].get("applied", 0) > report["distinct_updates"]:
            report["problems"].append("a duplicate counted as a change")
            report["ok"] = False
        return report


if __name__ == "__main__":
    common.main(asyncio.run(run()))
