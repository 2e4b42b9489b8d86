"""Liveness and readiness for load balancers and orchestrators (spec §11)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from redis.exceptions import RedisError

from receiver import appkeys

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
    except (RedisError, OSError, TimeoutError):
        return web.json_response({"status": "redis_unavailable"}, status=503)
    return web.json_response({"status": "ok"})


async def mark_shutting_down(app: web.Application) -> None:
    """on_shutdown: readiness fails at once, so the load balancer drains this process."""
    app[LIFECYCLE].shutting_down = True
