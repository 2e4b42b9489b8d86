"""The access log's fast JSON path writes the line the logging chain would write."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from receiver import accesslog
from receiver.accesslog import AccessLogger
from worker.logs import configure_logging


@pytest.fixture
def stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[[], str]]:
    """What was written to stderr; the root logger restored afterwards (tests configure it
    themselves: pytest adds its capturing handler to the root logger after fixtures ran)."""
    root = logging.getLogger()
    handlers, level = root.handlers, root.level
    # configure_logging also configures structlog (loggers cached on first use): restored
    # too, or later tests' capture_logs() would see nothing.
    saved = structlog.get_config()
    # A mocked request has no matched route: this one's pattern.
    monkeypatch.setattr(accesslog, "route_pattern", lambda request: "/api/v2/invoices/{id}/")
    yield lambda: capsys.readouterr().err
    root.handlers, root.level = handlers, level
    structlog.reset_defaults()
    structlog.configure(**saved)


def _log(logger: AccessLogger, path: str = "/api/v2/ping", status: int = 200) -> None:
    logger.log(make_mocked_request("POST", path), web.Response(status=status), 0.012345)


def test_fast_line_is_the_logging_chains_line(
    stderr: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_logging("json", "info")
    logger = AccessLogger(logging.getLogger("aiohttp.access"), "")
    _log(logger)
    assert logger._handler is not None, "the JSON set-up takes the fast path"
    slow = AccessLogger(logging.getLogger("aiohttp.access"), "")
    monkeypatch.setattr(accesslog, "json_lines_handler", lambda root: None)
    _log(slow)
    fast_line, slow_line = stderr().splitlines()
    fast, chain = json.loads(fast_line), json.loads(slow_line)
    assert list(fast) == list(chain), "same keys in the same order"
    fast.pop("timestamp"), chain.pop("timestamp")
    assert (
        fast
        == chain
        == {
            "event": "http_request",
            "level": "info",
            "logger": "aiohttp.access",
            "method": "POST",
            "route": "/api/v2/invoices/{id}/",
            "status": 200,
            "duration_ms": 12.35,
        }
    )
    assert fast_line.replace(json.loads(fast_line)["timestamp"], "") == slow_line.replace(
        json.loads(slow_line)["timestamp"], ""
    )


def test_quiet_paths_and_other_setups(stderr: Callable[[], str]) -> None:
    configure_logging("json", "info")
    logger = AccessLogger(logging.getLogger("aiohttp.access"), "")
    _log(logger, "/health/ready")
    assert stderr() == ""
    configure_logging("console", "info")  # a new set-up: decided anew, the ordinary path
    _log(logger, status=403)
    assert logger._handler is None
    assert "http_request" in stderr()


@pytest.mark.parametrize("method", ["POST", "@@DURATION@@", "@@TIMESTAMP@@", 'GE"T'])
def test_fast_lines_from_remembered_pieces(
    stderr: Callable[[], str], monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Lines built from the pieces rendered once are the chain's lines, every time."""
    configure_logging("json", "info")
    fast = AccessLogger(logging.getLogger("aiohttp.access"), "")
    slow = AccessLogger(logging.getLogger("aiohttp.access"), "")
    request = make_mocked_request(method, "/api/v2/ping")
    for status, seconds in [(200, 0.012345), (200, 1.5), (503, 0.0), (200, 0.0001)]:
        fast.log(request, web.Response(status=status), seconds)
        with monkeypatch.context() as patched:
            patched.setattr(accesslog, "json_lines_handler", lambda root: None)
            slow.log(request, web.Response(status=status), seconds)
            slow._seen = None  # decided anew next time
        fast_line, slow_line = stderr().splitlines()
        fast_event, slow_event = json.loads(fast_line), json.loads(slow_line)
        assert fast_event["method"] == request.method
        assert fast_line.replace(fast_event["timestamp"], "") == slow_line.replace(
            slow_event["timestamp"], ""
        )
