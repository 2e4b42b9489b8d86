"""A merchant callback endpoint for benchmarks and fault runs, in its own process.

`python -m bench.harness.sink_server --port P --out FILE --secret S` answers
every POST with 200 and appends one JSON line per callback to FILE: invoice
id, sequence, status, whether the signature was right, and the arrival time
(`time.monotonic()`, the same clock as the bench process on Linux).
"""

from __future__ import annotations

import argparse
import json
import time

from aiohttp import web

from worker.domain.signing import verify


def make_app(out_path: str, secret: str) -> web.Application:
    out = open(out_path, "a", buffering=1)  # noqa: SIM115 - line-buffered for the app's life

    async def callback(request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.monotonic()
        signed = verify(secret, body, request.headers.get("X-Processing-Signature"))
        doc = json.loads(body)
        record = {
            "id": doc["id"],
            "seq": doc["sequence"],
            "status": doc["status"],
            "signed": signed,
            "t": arrived,
        }
        out.write(json.dumps(record, separators=(",", ":")) + "\n")
        return web.Response(text="ok")

    async def close(_: web.Application) -> None:
        out.close()

    app = web.Application()
    app.router.add_post("/{tail:.*}", callback)
    app.on_cleanup.append(close)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(args.out, args.secret),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
