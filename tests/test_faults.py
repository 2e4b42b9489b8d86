"""Fault runs with real processes: the scripts of bench/faults/, at test size (issue: benchmarks).

tests/test_crash_safety.py proves the invoices, ledger and e-mails survive
crashes and duplicates; these runs add what the merchant sees: with workers
killed, Redis restarted, the merchant's endpoint down, or a duplicate storm,
every invoice's final snapshot is delivered, signed, and no invoice's
sequence goes backwards. Each writes its report to test-artifacts/faults.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.faults import duplicate_storm, merchant_down, redis_restart, worker_kills

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def record(report: dict[str, Any]) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with (ARTIFACTS / "faults.jsonl").open("a") as out:
        out.write(json.dumps(report) + "\n")


async def test_workers_killed_under_load_lose_and_double_nothing() -> None:
    """Workers SIGKILLed every second while updates flow: applied once, every final callback."""
    report = await worker_kills.run(invoices=120, rate=100, kill_every=1.0)
    record(report)
    assert report["kills"] >= 2
    assert report["ok"], report["problems"]


async def test_redis_restarted_under_load_loses_nothing_acknowledged() -> None:
    """Redis crashes and replays its AOF mid-flow: nothing acknowledged is lost or doubled."""
    report = await redis_restart.run(invoices=100, rate=100, every=1.0)
    record(report)
    assert report["redis_restarts"] >= 1
    assert report["ok"], report["problems"]


async def test_merchant_down_then_back_gets_every_final_snapshot() -> None:
    """The merchant's endpoint refuses connections for 3 s: retries deliver every final one."""
    report = await merchant_down.run(invoices=100, rate=100, down_after=1.0, down_for=3.0)
    record(report)
    assert report["ok"], report["problems"]


async def test_duplicate_storm_changes_nothing_twice() -> None:
    """Every update ten times, shuffled, two workers: the same result as each once."""
    report = await duplicate_storm.run(invoices=60, copies=10)
    record(report)
    assert report["ok"], report["problems"]
