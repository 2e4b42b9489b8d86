"""Logs are JSON lines with `event`, `level`, `timestamp`, and never carry secrets (spec §11)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from worker.logs import REDACTED_KEYS, redact
from worker.store.redis_server import RedisServer, free_port

# A cold receiver imports aiohttp, pydantic and bip-utils before it listens (seconds).
START_TIMEOUT_SECONDS = 30.0
# aiohttp drains connections for at most 10 s on SIGTERM (seconds).
STOP_TIMEOUT_SECONDS = 15.0
POLL_SECONDS = 0.05


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line as a JSON object; fails naming the first line that is not."""
    events = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(event, dict), line
        assert {"event", "level", "timestamp"} <= event.keys(), line
        events.append(event)
    return events


@pytest.mark.slow
async def test_receiver_writes_only_json_lines(redis_server: RedisServer, tmp_path: Path) -> None:
    """With COINVOICE_LOG_FORMAT=json every line the receiver writes while it starts, serves
    requests and shuts down is a JSON object with event, level and timestamp."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COINVOICE_")}
    env |= {
        "COINVOICE_REDIS_URL": redis_server.url,
        "COINVOICE_PORT": str(port),
        "COINVOICE_LOG_FORMAT": "json",
        "COINVOICE_DATA_DIR": str(tmp_path / "data"),
    }
    out, err = tmp_path / "receiver.out", tmp_path / "receiver.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "receiver.commands.cli",
            "receiver",
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while True:
                assert process.returncode is None, "the receiver exited while starting"
                assert time.monotonic() < deadline, "the receiver did not become ready"
                try:
                    async with http.get(f"{base}/health/ready") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(POLL_SECONDS)
            async with http.get(f"{base}/api/v2/ping") as response:
                assert response.status == 200
            # A refused request logs too (the error path, not just the access line).
            async with http.post(f"{base}/api/v2/invoices/create", data=b"{}") as response:
                assert response.status == 403
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert out.read_text() == "", "the receiver writes nothing to stdout"
    events = _json_lines(err.read_text())
    names = [event["event"] for event in events]
    assert "receiver_starting" in names
    access = [e for e in events if e["event"] == "http_request"]
    assert {(e["method"], e["route"], e["status"]) for e in access} >= {
        ("GET", "/api/v2/ping", 200),
        ("POST", "/api/v2/invoices/create", 403),
    }, "aiohttp's access log is JSON with the route, not the path"
    assert not [e for e in access if e["route"].startswith("/health/")], "health checks stay quiet"
    assert all(event["level"] in {"debug", "info", "warning", "error"} for event in events)


@pytest.mark.parametrize("key", sorted(REDACTED_KEYS))
def test_redact_replaces_every_secret_bearing_key(key: str) -> None:
    """`redact` replaces the value of each secret-bearing key and keeps the others."""
    event = redact(None, "info", {"event": "merchant_added", key: "s3cr3t", "merchant": "k1"})
    assert event == {"event": "merchant_added", key: "[redacted]", "merchant": "k1"}


def test_rendered_log_lines_never_contain_secret_or_signature() -> None:
    """A JSON line rendered through `redact` keeps the context but not the secret values."""
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(), processors=[redact, structlog.processors.JSONRenderer()]
    )
    line = logger.info(
        "callback_sent", foreign_id="f-1", secret="s3cr3t-value", signature="abcdef0123456789"
    )
    assert "s3cr3t-value" not in line
    assert "abcdef0123456789" not in line
    assert json.loads(line) == {
        "event": "callback_sent",
        "foreign_id": "f-1",
        "secret": "[redacted]",
        "signature": "[redacted]",
    }
