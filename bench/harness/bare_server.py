"""The baseline of the receiver benchmark: an aiohttp handler that only reads and parses JSON.

`python -m bench.harness.bare_server --port P [--uvloop]`; same framework, same
route, no signature, validation, Redis or middleware: the most a single aiohttp
process can answer on this machine. It runs the way `web.run_app` runs by
default (its default access logger, the standard asyncio event loop); with
`--uvloop` on uvloop's event loop instead, the baseline for a receiver that
runs on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.json_response({"ok": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/api/v2/processing/callbacks", handle)
    loop: asyncio.AbstractEventLoop | None = None  # run_app's own: asyncio's default loop
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, loop=loop)


if __name__ == "__main__":
    main()
