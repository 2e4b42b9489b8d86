"""The baseline of the receiver benchmark: an aiohttp handler that only reads and parses JSON.

`python -m bench.harness.bare_server --port P`; same framework, same route,
no signature, validation, Redis or middleware: the most a single aiohttp
process can answer on this machine.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.json_response({"ok": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/api/v2/processing/callbacks", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
