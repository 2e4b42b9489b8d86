"""Liveness and readiness for load balancers and orchestrators (spec §11).

On SIGTERM the receiver drains (receiver/app.py `serve`): readiness answers
503 at once while requests are still served, each answer asks its client to
close the connection (receiver/middleware.py), and the listener closes only
once the balancer had time to notice.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from receiver import appkeys
from worker.store.connection import REDIS_UNAVAILABLE

# Readiness answers within this many seconds (a load balancer's check times out soon after).
READY_TIMEOUT_SECONDS = 1.0


class Lifecycle:
    """Mutable process state (the app itself is frozen once started)."""

    shutting_down = False


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)


async def live(request: web.Request) -> web.Response:
    """The process answers."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Redis answers and the process is not shutting down; 503 otherwise."""
    if request.app[LIFECYCLE].shutting_down:
        return web.json_response({"status": "shutting_down"}, status=503)
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            await request.app[appkeys.REDIS].ping()
    except REDIS_UNAVAILABLE:  # includes the timeout: TimeoutError is an OSError
        return web.json_response({"status": "redis_unavailable"}, status=503)
    return web.json_response({"status": "ok"})


async def mark_shutting_down(app: web.Application) -> None:
    """on_shutdown: readiness fails at once, so the load balancer drains this process."""
    app[LIFECYCLE].shutting_down = True
