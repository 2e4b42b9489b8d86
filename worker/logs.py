"""structlog set-up shared by every coinvoice process.

Every line a process writes goes through one handler: structlog events and
the standard-library loggers of aiohttp, arq and asyncio alike, so with
`COINVOICE_LOG_FORMAT=json` each line is one JSON object. Keys that could
carry secrets or whole bodies are redacted before rendering.

structlog's own events (every state change logs one at info) take a short
path: rendered with orjson and written as one line to stderr, flushed, without
a stdlib `LogRecord` and handler in between (~4 x cheaper per line). They
are filtered by the level of the stdlib logger of their name, as before, so
`COINVOICE_LOG_LEVEL` and per-logger levels apply to both kinds alike.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import orjson
import structlog
from structlog.exceptions import DropEvent

# Field names whose values are never written to a log.
REDACTED_KEYS = frozenset(
    {
        "secret",
        "processing_secret",
        "standard_webhooks_secret",
        "signature",
        "password",
        "authorization",
        "body",
        "smtp_url",
        "x-processing-signature",
    }
)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any secret-bearing key with a marker."""
    for key in event.keys() & REDACTED_KEYS:
        event[key] = "[redacted]"
    return event


# The level of each structlog method name.
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def _fallback(value: Any) -> Any:
    """A value JSON has no type for, as structlog writes it: `__structlog__()`, else repr."""
    custom = getattr(value, "__structlog__", None)
    return custom() if callable(custom) else repr(value)


def dumps(event: Any, **_: Any) -> str:
    """An event as one JSON object: orjson, or the standard library for what orjson refuses
    (an integer beyond 64 bits)."""
    try:
        return orjson.dumps(event, default=_fallback, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(event, default=_fallback)


class LineLogger:
    """Where structlog's rendered events go: one line each on the process's stderr, flushed
    (so a crash loses none); `stdlib` is the standard logger of the same name, whose
    level decides what is written."""

    __slots__ = ("name", "stdlib")

    def __init__(self, name: str | None = None) -> None:
        self.name = name or "root"
        self.stdlib = logging.getLogger(name)

    def msg(self, line: str) -> None:
        stream = sys.stderr  # looked up per line: tests swap it
        stream.write(line + "\n")
        stream.flush()

    debug = info = warning = warn = error = exception = critical = fatal = msg


def filter_by_level(
    logger: LineLogger, method_name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Drop an event below its stdlib logger's level, before any other processor runs."""
    if logger.stdlib.isEnabledFor(LEVELS[method_name]):
        return event
    raise DropEvent


def configure_logging(fmt: Literal["json", "console"] | None = None, level: str = "info") -> None:
    """Route structlog and stdlib logging to stderr as JSON lines or console lines."""
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=dumps)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            # Drop events below the level before any processor runs: hot paths log
            # at info, and rendering an event nobody writes costs microseconds each.
            filter_by_level,
            *shared,
            renderer,
        ],
        logger_factory=LineLogger,
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # stdlib records (aiohttp's access log, arq) carry their fields in `extra`.
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # arq logs every job start and end at INFO; the ingest loop is the interesting part.
    logging.getLogger("arq.worker").setLevel(max(root.level, logging.WARNING))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
