"""What a benchmark ran on: every result carries it, since numbers mean nothing without it."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from worker.store.redis_server import find_redis_server


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def redis_version() -> str:
    out = subprocess.run(
        [find_redis_server(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"v=(\S+)", out)
    return found.group(1) if found else out.strip()


def describe() -> dict[str, Any]:
    """The machine, the versions that matter, and how busy the machine was at the start."""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "redis": redis_version(),
        "aiohttp": metadata.version("aiohttp"),
        "redis_py": metadata.version("redis"),
        "arq": metadata.version("arq"),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")
