"""The worker process's garbage-collector settings (worker/app/main.py `tune_gc`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import gc
from worker.app.main import GC_GEN0_THRESHOLD, tune_gc
before = gc.get_threshold()
tune_gc()
print(before[0], gc.get_threshold()[0] == GC_GEN0_THRESHOLD, gc.get_freeze_count() > 1000)
"""


def test_the_worker_freezes_what_start_up_made_and_collects_young_objects_less_often() -> None:
    """In its own process (freezing changes the interpreter it runs in)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["700", "True", "True"]
