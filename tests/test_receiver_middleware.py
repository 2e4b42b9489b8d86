"""The receiver's one middleware does what its four layers did, in their order."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from receiver.connections import ConnectionGuard
from receiver.health import Lifecycle
from receiver.metrics import Metrics
from receiver.middleware import receiver_middleware
from worker.config import MAX_BODY_BYTES


def _app() -> tuple[web.Application, Metrics, Lifecycle]:
    metrics, lifecycle = Metrics(), Lifecycle()
    guard = ConnectionGuard(header_timeout=5.0, max_per_client=0)
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[receiver_middleware(metrics, guard, lifecycle, body_timeout=5.0)],
    )

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"length": len(await request.read())})

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    app.router.add_post("/ok", ok)
    app.router.add_get("/ok", ok)
    app.router.add_get("/broken", broken)
    app.router.add_get("/moved", moved)
    return app, metrics, lifecycle


def _count(metrics: Metrics, route: str, status: int) -> bool:
    line = f'coinvoice_http_requests_total{{route="{route}",status="{status}"}} 1.0'
    return line in generate_latest(metrics.registry).decode()


async def test_errors_become_json_and_are_counted() -> None:
    app, metrics, _ = _app()
    async with TestClient(TestServer(app)) as client:
        broken = await client.get("/broken")
        assert broken.status == 500
        assert await broken.json() == {"error": "Internal server error", "code": "internal_error"}
        missing = await client.get("/nowhere")
        assert missing.status == 404
        assert (await missing.json())["errors"]["code"] == "not_found"
        too_big = await client.post("/ok", data=b"x" * (MAX_BODY_BYTES + 1))
        assert too_big.status == 413
        assert (await too_big.json())["code"] == "payload_too_large"
        wrong_method = await client.delete("/ok")
        assert wrong_method.status == 405
        assert (await wrong_method.json())["code"] == "method_not_allowed"
    assert _count(metrics, "/broken", 500)
    assert _count(metrics, "/ok", 413)


async def test_the_body_is_read_before_the_handler_and_redirects_pass() -> None:
    app, metrics, _ = _app()
    async with TestClient(TestServer(app)) as client:
        posted = await client.post("/ok", data=b"12345")
        assert posted.status == 200
        assert await posted.json() == {"length": 5}
        moved = await client.get("/moved", allow_redirects=False)
        assert moved.status == 302
        assert moved.headers["Location"] == "/ok"
    assert _count(metrics, "/ok", 200)
    assert _count(metrics, "/moved", 302)


async def test_answers_while_draining_close_the_connection() -> None:
    app, _, lifecycle = _app()
    async with TestClient(TestServer(app)) as client:
        before = await client.get("/ok")
        assert before.status == 200
        assert before.headers.get("Connection", "").lower() != "close"
        lifecycle.shutting_down = True
        for path, status in (("/ok", 200), ("/broken", 500)):
            during = await client.get(path)
            assert during.status == status
            assert during.headers["Connection"].lower() == "close"
