"""Access log: one structured event per request, without secrets or noise.

The route pattern is logged instead of the path, because public paths carry
the invoice's token (which opens the invoice); health checks and metric
scrapes, which arrive every few seconds from the load balancer, are left out.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

# Requests under these paths are not logged.
QUIET_PREFIXES = ("/health/", "/metrics")


def route_pattern(request: web.BaseRequest) -> str:
    """The matched route's pattern (`/invoice/{token}`), never the path with its token."""
    resource = request.match_info.route.resource if isinstance(request, web.Request) else None
    return resource.canonical if resource is not None else "unmatched"


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path.startswith(QUIET_PREFIXES):
            return
        self.logger.info(
            "http_request",
            extra={
                "method": request.method,
                "route": route_pattern(request),
                "status": response.status,
                "duration_ms": round(time * 1000, 2),
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
