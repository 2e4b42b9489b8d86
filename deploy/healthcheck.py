"""The image's HEALTHCHECK: one command for both roles the image runs.

The container's main process (PID 1) says which role this is:

* `coinvoice receiver`: `GET /health/live` on the receiver's own port must answer 200
  (liveness, not readiness: a Redis outage must not get every receiver restarted;
  load balancers check `/health/ready` themselves);
* `coinvoice worker`: `coinvoice worker --check --this-host` (a fresh heartbeat of a worker
  on this container's host name, i.e. this container's own unless host names are shared);
* anything else (a one-off `coinvoice merchant add`): healthy.

Standard library only, and no new process for the receiver, so a check costs little.
"""

from __future__ import annotations

import itertools
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# The check must answer well inside the image's HEALTHCHECK --timeout (10 s).
TIMEOUT_SECONDS = 3.0


def role(cmdline: bytes) -> str:
    """`receiver`, `worker` or `other`: the subcommand after `coinvoice` in a command line
    (NUL-separated, as /proc/PID/cmdline has it)."""
    args = [arg.decode(errors="replace") for arg in cmdline.split(b"\0") if arg]
    for script, command in itertools.pairwise(args):
        if Path(script).name == "coinvoice" and command in ("receiver", "worker"):
            return command
    return "other"


def receiver_url() -> str:
    """The receiver's liveness URL from the same settings it listens with."""
    host = os.environ.get("COINVOICE_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = os.environ.get("COINVOICE_PORT", "8080")
    return f"http://{host}:{port}/health/live"


def receiver_alive() -> bool:
    try:
        with urllib.request.urlopen(receiver_url(), timeout=TIMEOUT_SECONDS) as response:  # noqa: S310 - our own http URL
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def main() -> int:
    which = role(Path("/proc/1/cmdline").read_bytes())
    if which == "receiver":
        return 0 if receiver_alive() else 1
    if which == "worker":
        os.execvp("coinvoice", ["coinvoice", "worker", "--check", "--this-host"])  # noqa: S606, S607 - on PATH in the image
    return 0


if __name__ == "__main__":
    sys.exit(main())
