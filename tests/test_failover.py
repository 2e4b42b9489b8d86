"""The failover proof at test size (issue 11): bench/faults/failover.py with fewer invoices.

A Redis primary SIGKILLed under load (Sentinels promote its replica), then a
receiver behind HAProxy SIGKILLed, then a worker and a receiver SIGTERMed: nothing
acknowledged is lost, nothing applied twice, every final snapshot delivered.
`make failover` runs the full size three times.
"""

from __future__ import annotations

import pytest

from bench.faults import failover
from tests.support import record_artifact

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)  # a run takes about a minute; much longer on a loaded machine
async def test_primary_receiver_and_worker_lost_under_load_lose_nothing_acknowledged() -> None:
    """Failover, a killed receiver and a stopped worker: every acknowledged write survives once."""
    report = await failover.run(invoices=60, rate=6, creates=5, warm_up=2.0, step=2.0)
    record_artifact("failover", "short-run", report)
    assert report["ok"], report["problems"]
    assert report["acknowledged"] == report["sent"]
    assert report["creates"]["lost"] == 0 and report["creates"]["acknowledged"] > 0
    assert report["delivered"]["sequences_backwards"] == 0
    assert report["failover_seconds"] < failover.FAILOVER_LIMIT_SECONDS
    # The failover was felt (503s while no replica could confirm), and the retries were harmless.
    assert report["refused_then_retried"] > 0
    assert report["exit_codes_after_sigterm"] == {"worker_0": 0, "receiver_1": 0}
    assert len(report["consumers_in_group"]) == 1  # the stopped worker left the group
