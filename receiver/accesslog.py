"""Access log: one structured event per request, without secrets or noise.

The route pattern is logged instead of the path, because public paths carry
the invoice's token (which opens the invoice); health checks and metric
scrapes, which arrive every few seconds from the load balancer, are left out.

The line is written once per request, so it has a fast path: when the process
logs JSON lines (worker/logs.py: one stream handler on the root logger, a
structlog JSON renderer), the access line is rendered here, with the keys and
formatting that chain would give it, and written to that handler's stream
under its lock: a few µs instead of ~37 µs through the logging module and
the processor chain (the renderer is the chain's own, so the line is the
same). The renderer runs once per (method, route, status): the line around
its timestamp and duration is remembered, and each request only fills those
two in. Its fields are the method, the route pattern, the status and the
duration: nothing the redaction of worker/logs.py would touch. Any
other set-up (console format, other handlers or filters, tests capturing
logs) takes the ordinary path.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import TextIO, cast

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

# Requests under these paths are not logged.
QUIET_PREFIXES = ("/health/", "/metrics")

EVENT = "http_request"

# Placeholders rendered in place of a line's timestamp and duration, then cut out: a
# timestamp and a float need no JSON escaping, so the rest of a line depends only on
# the method, the route and the status, and is rendered once for each (at most
# MAX_PIECES of them: a client chooses the method).
_TIMESTAMP_MARK = "@@TIMESTAMP@@"
_DURATION_MARK = "@@DURATION@@"
MAX_PIECES = 256


def route_pattern(request: web.BaseRequest) -> str:
    """The matched route's pattern (`/invoice/{token}`), never the path with its token."""
    resource = request.match_info.route.resource if isinstance(request, web.Request) else None
    return resource.canonical if resource is not None else "unmatched"


def json_lines_handler(root: logging.Logger) -> logging.StreamHandler[TextIO] | None:
    """The one handler through which `root` writes plain JSON lines, if it is set up so."""
    if len(root.handlers) != 1 or root.filters:
        return None
    handler = root.handlers[0]
    formatter = handler.formatter
    if (
        type(handler) is not logging.StreamHandler
        or handler.filters
        or not isinstance(formatter, structlog.stdlib.ProcessorFormatter)
        or not formatter.processors
        or not isinstance(formatter.processors[-1], structlog.processors.JSONRenderer)
    ):
        return None
    return handler


class AccessLogger(AbstractAccessLogger):
    # The root handlers the fast path was decided for, and its handler (None: the slow path).
    _seen: list[logging.Handler] | None = None
    _handler: logging.StreamHandler[TextIO] | None = None
    _renderer: structlog.typing.Processor
    # Rendered lines around their timestamp and duration, by (method, route, status).
    _pieces: dict[tuple[str, str, int], tuple[str, str]]

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path.startswith(QUIET_PREFIXES):
            return
        route = route_pattern(request)
        duration_ms = round(time * 1000, 2)
        handler = self._fast_handler()
        pieces = None
        if handler is not None and handler.level <= logging.INFO:
            key = (request.method, route, response.status)
            pieces = self._pieces.get(key) or self._render_pieces(*key)
        if handler is None or pieces is None:
            self.logger.info(
                EVENT,
                extra={
                    "method": request.method,
                    "route": route,
                    "status": response.status,
                    "duration_ms": duration_ms,
                },
            )
            return
        # The line the logging chain would write, from its own JSON renderer's pieces.
        head, middle = pieces
        line = f"{head}{_timestamp()}{middle}{duration_ms!r}}}\n"
        with handler.lock or _NO_LOCK:
            handler.stream.write(line)
            handler.flush()

    def _render_pieces(self, method: str, route: str, status: int) -> tuple[str, str] | None:
        """The line of a request, rendered by the renderer, around its timestamp and its
        duration: `(head, middle)`, the line being head + timestamp + middle + duration +
        `}`; None if the renderer does not write it so (then the ordinary path). Remembered
        for the first MAX_PIECES (method, route, status)."""
        event = {
            "event": EVENT,
            "level": "info",
            "logger": self.logger.name,
            "timestamp": _TIMESTAMP_MARK,
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": _DURATION_MARK,
        }
        line = cast(str, self._renderer(None, "info", event))  # JSONRenderer returns str
        head, _, rest = line.partition(_TIMESTAMP_MARK)
        middle, _, end = rest.partition(f'"{_DURATION_MARK}"')
        if end != "}" or _DURATION_MARK in head:  # keys in another order: no shortcut
            return None
        if len(self._pieces) < MAX_PIECES:
            self._pieces[(method, route, status)] = (head, middle)
        return head, middle

    def _fast_handler(self) -> logging.StreamHandler[TextIO] | None:
        """The JSON lines handler, re-checked whenever logging was configured anew."""
        root = logging.root
        if root.handlers is not self._seen or self.logger.handlers or not self.logger.propagate:
            self._seen = root.handlers
            simple = not self.logger.handlers and self.logger.propagate and not self.logger.filters
            self._handler = json_lines_handler(root) if simple else None
            if self._handler is not None:
                formatter = self._handler.formatter
                assert isinstance(formatter, structlog.stdlib.ProcessorFormatter)
                self._renderer = formatter.processors[-1]
                self._pieces = {}
        return self._handler

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


# The second the last timestamp fell in, and its ISO form up to the second.
_second: list[tuple[int, str]] = [(-1, "")]


def _timestamp() -> str:
    """Now as structlog's TimeStamper(fmt="iso", utc=True) writes it: `…T05:20:24.921835Z`."""
    now = time.time()
    second = int(now)
    cached, prefix = _second[0]
    if second != cached:
        prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0] = (second, prefix)
    return f"{prefix}.{int((now - second) * 1e6):06d}Z"


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()
