"""The SSRF guard of merchant callbacks (spec §9, issue 15 item 2): every spelling of a
private address refused, names resolved and checked once, the request pinned to the
checked address, refusals dead-lettered at once (also on redelivery)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from receiver import appkeys
from tests.sink import Sink, running_sink
from tests.support import create_payload, make_settings, merchant_post
from worker.domain.models import Merchant
from worker.outbox.delivery import Deliverer
from worker.outbox.destinations import (
    DestinationRefused,
    check_destination,
    literal_address,
    pinned,
    resolve_destination,
)
from worker.services.invoices import InvoiceService
from worker.store import keys
from worker.store.merchants import MerchantStore, make_merchant
from worker.store.redis_server import RedisServer

Client = TestClient[Any, Any]

# Every one of these reaches this machine, a private network or nobody.
REFUSED = [
    "http://2130706433/cb",  # 127.0.0.1 as one decimal number
    "http://0177.0.0.1/cb",  # octal
    "http://0x7f.1/cb",  # hex, two parts
    "http://127.1/cb",  # two parts
    "http://0/cb",  # 0.0.0.0
    "http://0x7f000001/cb",
    "http://127.0.0.1:9/cb",
    "http://10.1.2.3/cb",
    "http://100.64.0.1/cb",  # carrier-grade NAT
    "http://169.254.169.254/latest",  # cloud metadata
    "http://224.0.0.1/cb",  # multicast
    "http://240.0.0.1/cb",  # reserved
    "http://255.255.255.255/cb",
    "http://[::1]:9/cb",
    "http://[::]/cb",
    "http://[::ffff:127.0.0.1]/cb",  # IPv4-mapped
    "http://[::ffff:7f00:1]/cb",
    "http://[::127.0.0.1]/cb",  # IPv4-compatible (deprecated)
    "http://[2002:7f00:1::1]/cb",  # 6to4 around 127.0.0.1
    "http://[fe80::1%25eth0]/cb",  # link-local with a zone
    "http://[fc00::1]/cb",  # unique local
    "http://[ff02::1]/cb",  # multicast
    "http://localhost/cb",  # a name resolving to loopback
]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async for running in running_sink():
        yield running


@pytest.mark.parametrize("url", REFUSED)
def test_every_spelling_of_a_non_public_address_is_refused(url: str) -> None:
    """Odd IPv4 spellings, IPv4 inside IPv6 and names resolving to loopback are refused."""
    with pytest.raises(DestinationRefused):
        check_destination(url, allow_private=False)
    check_destination(url, allow_private=True)  # tests and local demos may allow them


@pytest.mark.parametrize(
    "url", ["ftp://example.com/cb", "file:///etc/passwd", "http:///cb", "http://[::1/cb", "x"]
)
def test_a_url_that_is_not_http_is_refused_even_when_private_is_allowed(url: str) -> None:
    """Only http(s) URLs with a host are callback URLs."""
    with pytest.raises(DestinationRefused):
        check_destination(url, allow_private=True)


@pytest.mark.parametrize("url", ["https://8.8.8.8/cb", "http://[2606:4700:4700::1111]:8080/x"])
def test_public_literal_addresses_are_accepted(url: str) -> None:
    """A public address passes without a DNS lookup."""
    check_destination(url, allow_private=False)


@pytest.mark.parametrize(
    "host",
    ["2130706433", "0177.0.0.1", "127.1", "0", "0x7f.1", "1.16777215", "010.0.0.1", "0x0a.1"],
)
def test_ipv4_spellings_are_read_as_the_system_resolver_reads_them(host: str) -> None:
    """Our reading of an IPv4 literal is the system's (`inet_aton`), so none slips through."""
    assert str(literal_address(host)) == socket.inet_ntoa(socket.inet_aton(host))


@pytest.mark.parametrize(
    "host", ["09.1.1.1", "1_0.0.0.1", "١٢٧.1", "256.1.1.1", "1.2.3.4.5", "a.b"]
)
def test_strings_that_are_no_ipv4_literal_are_names(host: str) -> None:
    """Not an address: then it is a name, and what it resolves to is checked instead."""
    assert literal_address(host) is None


async def test_a_name_with_any_non_public_address_is_refused() -> None:
    """A name resolving to a public and a private address is refused (no mixing)."""

    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.7"]

    with pytest.raises(DestinationRefused, match=r"10\.0\.0\.7"):
        await resolve_destination("https://shop.example/cb", False, resolve)
    checked = await resolve_destination("https://shop.example/cb", True, resolve)
    assert (checked.host, checked.port, checked.address) == ("shop.example", 443, "93.184.216.34")


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "a..example"])
async def test_a_host_that_is_no_valid_name_is_refused_not_retried(host: str) -> None:
    """A label the resolver cannot even encode is a refusal (dead-lettered), not a crash."""
    with pytest.raises(DestinationRefused, match="not a valid host name"):
        await resolve_destination(f"https://{host}/cb", False)
    with pytest.raises(DestinationRefused):
        check_destination(f"https://{host}/cb", False)


async def delivered_once(deliverer: Deliverer) -> None:
    await deliverer.start()
    try:
        await deliverer.deliver_due()
        await deliverer.wait_idle()
    finally:
        await deliverer.close()


async def cancelled(client: Client, merchant: Merchant, foreign_id: str) -> None:
    """An invoice with one snapshot to deliver."""
    for path, payload in (
        ("/api/v2/invoices/create", create_payload(foreign_id)),
        (f"/api/v2/invoices/{foreign_id}/cancel/", {}),
    ):
        status, _ = await merchant_post(client, merchant, path, payload)
        assert status == 200


async def callbacks(client: Client, merchant: Merchant, foreign_id: str) -> list[dict[str, Any]]:
    status, log = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks", {"foreign_id": foreign_id}
    )
    assert status == 200
    return list(log["data"])


async def test_the_request_goes_to_the_address_that_was_checked(
    client: Client,
    redis: aioredis.Redis,
    redis_server: RedisServer,
    service: InvoiceService,
    sink: Sink,
) -> None:
    """The name is resolved once per attempt and the connection goes to that address,
    with the URL's own Host header (no second lookup a DNS rebinding could change)."""
    port = urlsplit(sink.url("/")).port
    merchant = make_merchant("Pinned", f"http://shop.invalid:{port}/shop")
    await MerchantStore(redis).add(merchant)
    await cancelled(client, merchant, "pinned")
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]  # `.invalid` never resolves in real DNS

    settings = make_settings(redis_server.url, allow_private_callbacks=True)
    redis_client = client.server.app[appkeys.REDIS]
    await delivered_once(Deliverer(redis_client, service.store, settings, resolve=resolve))
    (got,) = await sink.wait_for(1)
    assert got.headers["Host"] == f"shop.invalid:{port}"
    assert lookups == ["shop.invalid"]
    assert (await callbacks(client, merchant, "pinned"))[0]["state"] == "delivered"


async def test_an_odd_spelling_of_loopback_is_dead_lettered_at_once(
    client: Client,
    redis: aioredis.Redis,
    redis_server: RedisServer,
    service: InvoiceService,
    sink: Sink,
) -> None:
    """`http://2130706433:port/` (127.0.0.1) gets no request: one attempt, dead, not due."""
    port = urlsplit(sink.url("/")).port
    merchant = make_merchant("Odd", f"http://2130706433:{port}/shop")
    await MerchantStore(redis).add(merchant)
    await cancelled(client, merchant, "odd")
    settings = make_settings(redis_server.url, allow_private_callbacks=False)
    await delivered_once(Deliverer(client.server.app[appkeys.REDIS], service.store, settings))
    assert sink.received == []
    (entry,) = await callbacks(client, merchant, "odd")
    assert entry["state"] == "dead"
    (attempt,) = entry["attempts"]
    assert attempt["status_code"] is None and "127.0.0.1" in attempt["error"]
    invoice_id = (await service.by_foreign_id(merchant.key, "odd")).invoice.id
    assert await redis.zscore(keys.delivery_due_of(invoice_id), invoice_id) is None  # no retry


async def test_a_redelivery_refused_by_the_guard_is_dead_not_delivered(
    client: Client,
    redis: aioredis.Redis,
    redis_server: RedisServer,
    service: InvoiceService,
    sink: Sink,
) -> None:
    """Delivered once, then redelivered where the guard refuses it: the state is `dead`."""
    merchant = make_merchant("Moved", sink.url("/shop"))
    await MerchantStore(redis).add(merchant)
    await cancelled(client, merchant, "moved")
    redis_client = client.server.app[appkeys.REDIS]
    allowed = make_settings(redis_server.url, allow_private_callbacks=True)
    await delivered_once(Deliverer(redis_client, service.store, allowed))
    assert (await callbacks(client, merchant, "moved"))[0]["state"] == "delivered"

    status, _ = await merchant_post(
        client, merchant, "/api/v2/invoices/callbacks/redeliver", {"foreign_id": "moved"}
    )
    assert status == 200
    refused = make_settings(redis_server.url, allow_private_callbacks=False)
    await delivered_once(Deliverer(redis_client, service.store, refused))
    (entry,) = await callbacks(client, merchant, "moved")
    assert entry["state"] == "dead"
    assert [a["status_code"] for a in entry["attempts"]] == [200, None]
    assert len(sink.received) == 1


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for `shop.invalid` and its key (made with openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=shop.invalid",
         "-addext", "subjectAltName=DNS:shop.invalid",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize(("name", "verified"), [("shop.invalid", True), ("other.invalid", False)])
async def test_a_pinned_https_request_verifies_the_certificate_for_the_name(
    tls_files: tuple[Path, Path], name: str, verified: bool
) -> None:
    """Connecting to the checked address still checks TLS against the URL's name: the
    certificate for shop.invalid passes, the same server under another name fails."""
    cert, key = tls_files
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    hosts: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hosts.append(request.headers["Host"])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/cb", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_side)
    await site.start()
    try:

        async def resolve(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        url = f"https://{name}:{site.port}/cb"
        target, host_header, server_hostname = pinned(await resolve_destination(url, True, resolve))
        assert target.host == "127.0.0.1" and server_hostname == name
        trust = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as session:
            try:
                async with session.post(
                    target, headers=host_header, server_hostname=server_hostname, ssl=trust
                ) as response:
                    assert response.status == 200
                answered = True
            except aiohttp.ClientConnectorCertificateError:
                answered = False
        assert answered is verified
        assert hosts == ([f"shop.invalid:{site.port}"] if verified else [])
    finally:
        await runner.cleanup()
