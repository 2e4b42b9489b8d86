"""Per-process footprint under load: the figures deploy/k8s/ requests and limits come from.

Run: `.venv/bin/python bench/footprint.py` (about a minute; prints one JSON object).

Runs bench/end_to_end.py (one receiver and one worker process, 10,000 signed processing
callbacks at 500/s for 20 s, the default log level as in production) and samples, every
half second, the receiver and worker processes it starts: resident memory (VmRSS in
/proc/PID/status) and CPU time (utime + stime in /proc/PID/stat). Reports each one's
RSS once started and at its peak, its CPU seconds over the run and its busiest 5-second
window, with the end-to-end result beside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent / "end_to_end.py"
SAMPLE_SECONDS = 0.5
# The load deploy/k8s/ was sized for (end_to_end.py's own default is 1,000/s).
RATE_PER_S = 500
WINDOW_SECONDS = 5.0
TICKS = os.sysconf("SC_CLK_TCK")


def children_of(root: int) -> dict[int, str]:
    """Every receiver or worker below `root`: PID → role."""
    parents: dict[int, int] = {}
    commands: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = {}
    for pid, args in commands.items():
        ancestor = parents.get(pid, 0)
        while ancestor not in (0, 1, root):
            ancestor = parents.get(ancestor, 0)
        if ancestor == root and "receiver.commands.cli" in args:
            role = args[args.index("receiver.commands.cli") + 1]
            if role in ("receiver", "worker"):
                found[pid] = role
    return found


def sample(pid: int) -> tuple[int, float] | None:
    """(RSS in KiB, CPU seconds) of `pid`, or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return rss, (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def summary(role: str, points: list[tuple[float, int, float]]) -> dict[str, Any]:
    busiest = 0.0
    for i, (start, _, cpu_start) in enumerate(points):
        later = [p for p in points[i:] if p[0] - start >= WINDOW_SECONDS]
        if later:
            end, _, cpu_end = later[0]
            busiest = max(busiest, (cpu_end - cpu_start) / (end - start))
    return {
        "role": role,
        "rss_started_mib": round(points[0][1] / 1024, 1),
        "rss_peak_mib": round(max(p[1] for p in points) / 1024, 1),
        "cpu_seconds": round(points[-1][2] - points[0][2], 2),
        "busiest_5s_cores": round(busiest, 2),
    }


def main() -> int:
    bench = subprocess.Popen(
        [sys.executable, str(BENCH), f"--rate={RATE_PER_S}"], stdout=subprocess.PIPE, text=True
    )
    series: dict[int, list[tuple[float, int, float]]] = defaultdict(list)
    roles: dict[int, str] = {}
    while bench.poll() is None:
        roles |= children_of(bench.pid)
        for pid in roles:
            if (point := sample(pid)) is not None:
                series[pid].append((time.monotonic(), *point))
        time.sleep(SAMPLE_SECONDS)
    result = json.loads(bench.stdout.read() if bench.stdout else "{}")
    report = {
        "benchmark": "footprint",
        "loadavg_1m_at_end": os.getloadavg()[0],
        "processes": [summary(roles[pid], points) for pid, points in series.items() if points],
        "end_to_end": {k: result.get(k) for k in ("sent", "accepted", "callbacks_received")},
    }
    print(json.dumps(report, indent=2))
    return bench.returncode


if __name__ == "__main__":
    sys.exit(main())
