"""The arq worker: its settings, start-up and shutdown, cron jobs and health check.

arq runs the scheduled work (the timer sweep every second). The long-lived
loops (applying processing updates, delivering callbacks) are tasks started
by `startup`, because one arq job per update would cap a worker far below its
goal (see docs/architecture.md). A heartbeat in Redis records that this
process and its loops are alive; `coinvoice worker --check` reads it.

On SIGTERM (arq's signal handler, then `shutdown`) the worker stops taking
work, finishes what it holds within COINVOICE_SHUTDOWN_SECONDS, withdraws its
heartbeat, leaves the stream's consumer group and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, TypedDict

from arq import cron
from arq.connections import RedisSettings
from arq.worker import Worker
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

from worker.app.runtime import invoice_service, warn_if_demo_keys
from worker.config import Settings
from worker.domain.effects import LedgerEntry
from worker.ingest.consumer import Ingest
from worker.logs import configure_logging, get_logger
from worker.mail.loop import run_mail_loop
from worker.outbox.delivery import Deliverer
from worker.outbox.ledger import LedgerPoster
from worker.rates.refresher import Refresher
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.connection import REDIS_RETRIES, REDIS_UNAVAILABLE, connect, redis_url

log = get_logger(__name__)

# A worker writes its heartbeat this often (seconds)...
HEARTBEAT_SECONDS = 2.0
# ...and counts as alive while its last one is younger than this.
HEARTBEAT_STALE_SECONDS = 10
# Counters are logged this often when they changed (seconds).
STATS_EVERY_SECONDS = 10.0
# arq job names are global per Redis; ours carry a prefix.
QUEUE_NAME = "cv:arq"
# Of COINVOICE_SHUTDOWN_SECONDS, this much is kept for closing connections (seconds).
SHUTDOWN_MARGIN_SECONDS = 1.0
# Errors arq's connections retry with backoff. OSError is a refused connection while
# Redis restarts: redis-py raises it from connect() when a pooled connection is
# re-opened on checkout, outside the per-command retry (bench/faults/redis_restart.py
# saw workers exit on it).
ARQ_RETRY_ON = [ConnectionError, TimeoutError, OSError]


class Context(TypedDict, total=False):
    """What arq passes to every job and hook (plus arq's own keys)."""

    settings: Settings
    redis: Any  # arq's pool, used by arq itself
    store_redis: Redis
    service: InvoiceService
    ingest: Ingest
    deliverer: Deliverer
    refresher: Refresher
    name: str
    tasks: list[asyncio.Task[None]]
    ledger: LedgerPoster
    stopping: asyncio.Event  # set by shutdown: the mail loop ends its pass, the heartbeat knows


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def fire_timers(ctx: Context) -> int:
    """arq cron, every second: fail or extend the invoices whose timer is due."""
    return await ctx["service"].fire_due_timers()


async def _heartbeat(ctx: Context) -> None:
    """Record that this worker and its loops live; stop recording if a loop died."""
    redis, name = ctx["store_redis"], ctx["name"]
    while True:
        loops = [task for task in ctx["tasks"] if task.get_name() != "heartbeat"]
        dead = [task for task in loops if task.done()]
        # Once shutdown has asked them to stop, the finishing loops end on purpose.
        if dead and not ctx["stopping"].is_set():
            log.error(
                "worker_loop_died",
                loops=[task.get_name() for task in dead],
                errors=[repr(task.exception()) for task in dead if not task.cancelled()],
            )
        else:
            with contextlib.suppress(*REDIS_UNAVAILABLE):
                await redis.zadd(keys.WORKERS, {name: time.time()})
        await asyncio.sleep(HEARTBEAT_SECONDS)


async def _ingest(ctx: Context) -> None:
    """Apply processing updates from the stream (worker/ingest/consumer.py)."""
    await ctx["ingest"].run()


async def _deliver(ctx: Context) -> None:
    """Deliver merchant callbacks (worker/outbox/delivery.py)."""
    await ctx["deliverer"].run()


async def _mail(ctx: Context) -> None:
    """Send due customer e-mails (worker/mail/loop.py)."""
    await run_mail_loop(ctx["store_redis"], ctx["service"], ctx["settings"], stop=ctx["stopping"])


async def _ledger(ctx: Context) -> None:
    """Post committed ledger entries to the merchants' balances (worker/outbox/ledger.py)."""
    await ctx["ledger"].run()


async def _rates(ctx: Context) -> None:
    """Keep the live rate table fresh while this worker leads (worker/rates/refresher.py)."""
    await ctx["refresher"].run()


async def _log_stats(ctx: Context) -> None:
    """Periodic counters, so an operator sees throughput and suppressed duplicates."""
    last: dict[str, int] = {}
    while True:
        await asyncio.sleep(STATS_EVERY_SECONDS)
        stats = ctx["ingest"].stats.as_dict()
        if stats != last:
            log.info("ingest_stats", worker=ctx["name"], **stats)
            last = stats


# Long-lived loops started with the worker.
LOOPS: list[tuple[str, Callable[[Context], Coroutine[Any, Any, None]]]] = [
    ("heartbeat", _heartbeat),
    ("ingest", _ingest),
    ("delivery", _deliver),
    ("mail", _mail),
    ("ledger", _ledger),
    ("stats", _log_stats),
]


async def startup(ctx: Context) -> None:
    settings = ctx["settings"]
    redis = connect(settings)
    ctx["store_redis"] = redis
    ctx["service"] = invoice_service(redis, settings)
    warn_if_demo_keys(settings)
    ctx["name"] = worker_name()
    ctx["ingest"] = Ingest(
        redis,
        ctx["service"],
        consumer=ctx["name"],
        reclaim_idle_ms=int(settings.reclaim_idle_seconds * 1000),
        dead_after_seconds=HEARTBEAT_STALE_SECONDS,
    )
    deliverer = Deliverer(redis, ctx["service"].store, settings)
    await deliverer.start()
    ctx["deliverer"] = deliverer
    # A snapshot committed in this process is delivered without waiting for the next poll.
    ctx["service"].listeners.append(
        lambda transition: deliverer.wake() if transition.callback else None
    )
    # Ledger entries committed here are posted to the balances without waiting for a poll.
    poster = ctx["ledger"] = LedgerPoster(redis, ctx["service"].store.scripts)
    ctx["service"].listeners.append(
        lambda transition: (
            poster.wake() if any(isinstance(e, LedgerEntry) for e in transition.effects) else None
        )
    )
    loops = list(LOOPS)
    if settings.live_rates:
        # Every worker runs it; the lease in Redis lets one of them read the markets.
        ctx["refresher"] = Refresher(redis, settings, ctx["service"].rates, ctx["name"])
        loops.append(("rates", _rates))
    ctx["stopping"] = asyncio.Event()
    ctx["tasks"] = []
    for name, loop in loops:
        ctx["tasks"].append(asyncio.create_task(loop(ctx), name=name))
    log.info("worker_started", worker=ctx["name"], loops=[name for name, _ in loops])


# Loops that finish what they hold when asked to stop; the others are cancelled at once.
FINISHING_LOOPS = {"ingest", "delivery", "mail"}


async def shutdown(ctx: Context) -> None:
    """Stop taking work, finish what is in hand within the budget, leave the group, close."""
    started = time.monotonic()
    budget = max(0.0, ctx["settings"].shutdown_seconds - SHUTDOWN_MARGIN_SECONDS)
    tasks = ctx.get("tasks", [])
    if "ingest" in ctx:
        ctx["ingest"].stop()  # the batch in hand is applied and acknowledged
        ctx["deliverer"].stop()  # attempts in flight go on
        ctx["stopping"].set()  # the mail pass in hand ends
        finishing = [task for task in tasks if task.get_name() in FINISHING_LOOPS]
        if finishing:
            await asyncio.wait(finishing, timeout=budget)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if "ledger" in ctx:
        # The last batch's ledger entries onto the balances now, not by the next poster.
        posted = await ctx["ledger"].drain(budget - (time.monotonic() - started))
        log.info("ledger_drained", worker=ctx["name"], entries=posted)
    if "ingest" in ctx:
        log.info("ingest_stats", worker=ctx["name"], **ctx["ingest"].stats.as_dict())
    if "deliverer" in ctx:
        await ctx["deliverer"].close(budget - (time.monotonic() - started))
    redis = ctx.get("store_redis")
    if redis is not None:
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await redis.zrem(keys.WORKERS, ctx["name"])
            if "ingest" in ctx:
                left = await ctx["ingest"].leave_group()
                log.info("worker_left_group", worker=ctx["name"], left=left)
        await redis.aclose()
    log.info(
        "worker_stopped",
        worker=ctx.get("name"),
        after_s=round(time.monotonic() - started, 2),
    )


class ArqRedisMissing(RuntimeError):
    """Cluster mode without COINVOICE_ARQ_REDIS_URL."""


def arq_redis_settings(settings: Settings) -> RedisSettings:
    """arq's connection to the same Redis as ours, retrying through a restart like ours.

    In cluster mode arq gets a small Redis of its own (COINVOICE_ARQ_REDIS_URL):
    arq's client talks to one server, and what it keeps there (its queue, the
    cron job's uniqueness key, results) is bookkeeping only; the timers it
    sweeps live in the cluster. Losing that Redis loses no invoice state.

    In Sentinel mode arq asks the Sentinels for the primary on every
    connection (arq's own sentinel support), so it follows a failover too.
    """
    if settings.arq_redis_url:
        base = RedisSettings.from_dsn(settings.arq_redis_url)
    elif settings.redis_cluster_nodes:
        raise ArqRedisMissing(
            "cluster mode: arq speaks to one Redis, not a cluster;"
            " set COINVOICE_ARQ_REDIS_URL to a small Redis of its own"
        )
    elif settings.redis_sentinels:
        base = RedisSettings(
            host=list(settings.redis_sentinels),
            sentinel=True,
            sentinel_master=settings.redis_sentinel_master,
        )
    else:
        base = RedisSettings.from_dsn(redis_url(settings))
    return replace(
        base,
        retry_on_timeout=True,
        retry_on_error=ARQ_RETRY_ON,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=REDIS_RETRIES),
        conn_retries=REDIS_RETRIES,
    )


class ResilientWorker(Worker):
    """arq's Worker, but a Redis error in one poll does not end the process.

    arq polls its queue and runs cron jobs every `poll_delay`; an error there
    (Redis restarting: a pooled connection re-opened on checkout, outside
    redis-py's per-command retry) would end `Worker.main` and with it the
    process and its loops. Here it is logged and the next poll tries again.
    """

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except REDIS_UNAVAILABLE as exc:
            log.warning("arq_poll_redis_error", error=repr(exc))

    async def close(self) -> None:
        """arq's close, but a job cancelled by the stop signal cannot skip `shutdown`.

        On SIGTERM arq cancels its job tasks, then gathers them without
        `return_exceptions`: the once-a-second `fire_timers` job, cut off at the
        wrong await, let CancelledError out of `close` before `on_shutdown` ran
        (exit 1, the batch in hand and the ledger drain skipped). They are
        cancelled (as the signal did already) and awaited here, so arq's own
        gather has none left.
        """
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
        await super().close()


def build_worker(settings: Settings) -> Worker:
    """An arq Worker for these settings (`coinvoice worker`)."""
    return ResilientWorker(
        functions=[],
        cron_jobs=[
            cron(
                fire_timers,  # type: ignore[arg-type]  # arq types ctx as dict[Any, Any]
                second=set(range(60)),
                run_at_startup=True,
                unique=True,
                timeout=60,
                keep_result=0,
                max_tries=1,
            )
        ],
        queue_name=QUEUE_NAME,
        redis_settings=arq_redis_settings(settings),
        on_startup=startup,  # type: ignore[arg-type]  # arq types ctx as dict[Any, Any]
        on_shutdown=shutdown,  # type: ignore[arg-type]
        ctx={"settings": settings},
        handle_signals=True,
        keep_result=0,
        poll_delay=0.2,
        max_jobs=20,
    )


# Allocations between two young-generation collections (CPython's default: 700).
GC_GEN0_THRESHOLD = 5_000


def tune_gc() -> None:
    """Fewer, cheaper garbage collections in the worker process (~5–8 % of its CPU).

    The collector took ~11 % of the worker's CPU (py-spy): every 700 allocations
    it walked the young objects, and its full passes walked every module and
    class loaded at start-up. What exists now lives as long as the process, so
    it is frozen out of every pass; the young generation is collected every
    5,000 allocations. (At 20,000 the CPU fell a little more, but in the 10-minute
    soak the worker's RSS kept creeping up, ~2 MB after the first minute: garbage
    that lives longer scatters over more memory pages.)
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def run(settings: Settings) -> None:
    configure_logging(settings.log_format, settings.log_level)
    tune_gc()
    build_worker(settings).run()


async def check(settings: Settings, host: str | None = None) -> bool:
    """Is at least one worker alive with all its loops? (`coinvoice worker --check`)

    With `host`, only workers running there count (`--this-host`): a container or pod has
    a host name of its own, so its probe then asks about its own worker, not the fleet.
    """
    redis = connect(settings)
    try:
        since = time.time() - HEARTBEAT_STALE_SECONDS
        alive = await redis.zrangebyscore(keys.WORKERS, since, "+inf")
        if host is not None:
            alive = [name for name in alive if name.decode().rpartition(":")[0] == host]
        return bool(alive)
    except REDIS_UNAVAILABLE:
        return False
    finally:
        await redis.aclose()
