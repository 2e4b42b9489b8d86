"""structlog set-up shared by every coinvoice process.

Every line a process writes goes through one handler: structlog events and
the standard-library loggers of aiohttp, arq and asyncio alike, so with
`COINVOICE_LOG_FORMAT=json` each line is one JSON object. Keys that could
carry secrets or whole bodies are redacted before rendering.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

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
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            # Drop events below the level before any processor runs: hot paths log
            # at info, and rendering an event nobody writes costs microseconds each.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
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
