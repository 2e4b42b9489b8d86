"""A memory debug hook for bench/soak.py --tracemalloc: never on in production.

bench/soak.py puts this folder on the PYTHONPATH of the receiver and the worker and
sets COINVOICE_BENCH_TRACEMALLOC to a folder; Python imports `sitecustomize` at start,
so this starts a daemon thread that starts tracemalloc and, every
COINVOICE_BENCH_TRACEMALLOC_EVERY seconds (default 60), writes a tracemalloc snapshot
and the live object count per type (gc, objgraph-style) into that folder as
`{pid}-{n}.snap` and `{pid}-{n}.types.json`. Without the variable it does nothing.
"""

from __future__ import annotations

import os

FOLDER = os.environ.get("COINVOICE_BENCH_TRACEMALLOC")

if FOLDER:
    import collections
    import gc
    import json
    import threading
    import time
    import tracemalloc

    EVERY = float(os.environ.get("COINVOICE_BENCH_TRACEMALLOC_EVERY", "60"))

    def _dump_forever() -> None:
        # Tracing starts once the process is up (imports untraced: start-up stays fast);
        # growth is what the snapshots after that are compared for.
        time.sleep(EVERY / 2)
        tracemalloc.start(1)
        n = 0
        while True:
            time.sleep(EVERY)
            base = os.path.join(FOLDER, f"{os.getpid()}-{n:03d}")
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            snapshot.dump(base + ".snap")
            counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            with open(base + ".types.json", "w") as out:
                json.dump({"t": time.monotonic(), "types": dict(counts.most_common(200))}, out)
            n += 1

    threading.Thread(target=_dump_forever, name="memdebug", daemon=True).start()
