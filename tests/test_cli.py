"""The operator commands of spec §11, run as real `coinvoice` processes against the test Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests import processes
from tests.support import deposit, drain
from worker.app.runtime import invoice_service
from worker.config import Settings
from worker.domain.models import Merchant
from worker.ingest.consumer import Ingest
from worker.services.invoices import InvoiceRequest
from worker.store import keys
from worker.store.merchants import MerchantStore
from worker.store.redis_server import RedisServer

pytestmark = pytest.mark.slow


def coinvoice(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "receiver.commands.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(coinvoice, env, *args)


@pytest.fixture
def env(redis_server: RedisServer) -> dict[str, str]:
    return processes.child_env(redis_server.url)


async def test_merchant_add_prints_the_spec_fields(
    env: dict[str, str], redis: aioredis.Redis
) -> None:
    """merchant add prints one JSON object with the spec's fields; the merchant is stored."""
    done = await run(
        env,
        "merchant", "add", "--name", "Shop", "--callback-url", "https://shop.example/cb",
        "--key", "k1", "--secret", "s1", "--fee-percent", "1.5",
        "--underpayment-tolerance-percent", "0.5", "--standard-webhooks",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert {k: printed[k] for k in ("name", "key", "secret", "callback_url")} == {
        "name": "Shop",
        "key": "k1",
        "secret": "s1",
        "callback_url": "https://shop.example/cb",
    }
    assert (printed["fee_percent"], printed["underpayment_tolerance_percent"]) == ("1.5", "0.5")
    assert printed["standard_webhooks_secret"].startswith("whsec_")
    stored = await MerchantStore(redis).get("k1")
    assert stored is not None and stored.secret == "s1"
    again = await run(
        env,
        "merchant",
        "add",
        "--name",
        "Shop",
        "--callback-url",
        "https://x.example",
        "--key",
        "k1",
    )
    assert again.returncode == 1 and "exists" in again.stderr
    bad = await run(env, "merchant", "add", "--name", "Shop", "--callback-url", "ftp://x.example")
    assert bad.returncode == 2


async def test_merchant_add_require_timestamp(env: dict[str, str], redis: aioredis.Redis) -> None:
    """--require-timestamp opts the merchant in to replay protection; the default stays off."""
    done = await run(
        env, "merchant", "add", "--name", "Strict", "--callback-url", "https://shop.example/cb",
        "--key", "strict", "--require-timestamp",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["require_timestamp"] is True
    stored = await MerchantStore(redis).get("strict")
    assert stored is not None and stored.require_timestamp
    plain = await run(
        env, "merchant", "add", "--name", "Plain", "--callback-url", "https://shop.example/cb",
        "--key", "plain",
    )  # fmt: skip
    assert "require_timestamp" not in json.loads(plain.stdout)
    stored = await MerchantStore(redis).get("plain")
    assert stored is not None and not stored.require_timestamp


async def test_merchant_add_refuses_a_callback_url_the_guard_refuses(
    env: dict[str, str], redis: aioredis.Redis
) -> None:
    """Without COINVOICE_ALLOW_PRIVATE_CALLBACKS, private destinations are refused at
    registration (any spelling, names resolving to loopback); public ones are stored."""
    strict = {**env, "COINVOICE_ALLOW_PRIVATE_CALLBACKS": "0"}
    for url in ("http://2130706433/cb", "http://[::ffff:127.0.0.1]/cb", "http://localhost/cb"):
        refused = await run(strict, "merchant", "add", "--name", "S", "--callback-url", url)
        assert refused.returncode == 2, url
        assert "non-public" in refused.stderr and refused.stdout == ""
    assert await redis.scard("cv:merchants") == 0
    public = "https://8.8.8.8/cb"
    added = await run(strict, "merchant", "add", "--name", "S", "--callback-url", public)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["callback_url"] == public


async def test_simulate_deposit_pays_an_invoice(
    env: dict[str, str],
    redis: aioredis.Redis,
    settings: Settings,
    merchant: Merchant,
    tmp_path: Path,
) -> None:
    """simulate deposit signs a processing callback; with a worker the invoice gets paid."""
    service = invoice_service(redis, settings)
    invoice = await service.create(
        merchant,
        InvoiceRequest(
            "sim", "Tea", "EUR", service.rates.rate("EUR", "EUR"), True, sender_currency="BTC"
        ),
    )
    assert invoice.address is not None and invoice.sender_amount is not None
    receiver, base = await processes.receiver(env, tmp_path)
    worker = processes.worker(env, tmp_path)
    try:
        address, amount = invoice.address.address, str(invoice.sender_amount)
        seen = await run(
            env, "simulate", "deposit", "--address", address, "--amount", amount, "--url", base
        )
        assert seen.returncode == 0, seen.stderr
        tx_id = json.loads(seen.stdout)["tx_id"]
        done = await run(
            env, "simulate", "deposit", "--address", address, "--amount", amount, "--url", base,
            "--tx-id", str(tx_id), "--status", "confirmed", "--confirmations", "2",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["http_status"] == 200
        await processes.wait_applied(redis)

        async def status() -> str:
            return (await service.store.get(invoice.id)).invoice.status.value  # type: ignore[union-attr]

        async with asyncio.timeout(10):
            while await status() != "confirmed":  # noqa: ASYNC110 - the worker process changes it
                await asyncio.sleep(0.05)
    finally:
        worker.stop()
        receiver.stop()
    unknown = await run(
        env, "simulate", "deposit", "--address", "nobody", "--amount", "1", "--url", base
    )
    assert unknown.returncode == 1 and "--currency" in unknown.stderr


async def test_orphans_lists_each_orphan_merged(
    env: dict[str, str], client: Any, redis: aioredis.Redis
) -> None:
    """orphans prints one JSON line per transaction, its updates merged."""
    from receiver import appkeys
    from tests.support import processing_post

    address = "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"
    for status, confirmations in (("not_confirmed", 0), ("confirmed", 3)):
        await processing_post(
            client, deposit(address, "0.5", tx_id=42, status=status, confirmations=confirmations)
        )
    await processing_post(client, deposit(address, "0.1", tx_id=43))
    await drain(
        Ingest(client.server.app[appkeys.REDIS], client.server.app[appkeys.SERVICE], consumer="t")
    )
    done = await run(env, "orphans")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(o["tx_id"], o["status"], o["confirmations"], o["amount"]) for o in lines] == [
        (42, "confirmed", 3, "0.50000000"),
        (43, "not_confirmed", 0, "0.10000000"),
    ]


async def test_invoice_show_and_callbacks_redeliver(
    env: dict[str, str], redis: aioredis.Redis, settings: Settings, merchant: Merchant
) -> None:
    """invoice show: the merchant's view plus operator fields; redeliver makes it due again."""
    service = invoice_service(redis, settings)
    invoice = await service.create(
        merchant, InvoiceRequest("show", "Tea", "EUR", service.rates.rate("EUR", "EUR"), True)
    )
    await service.cancel(merchant.key, "show")
    await redis.zrem(keys.delivery_due_of(invoice.id), invoice.id)
    await redis.hset(keys.delivery(invoice.id), "dead", 1)
    shown = await run(env, "invoice", "show", "show", "--merchant", merchant.key)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert (view["foreign_id"], view["status"], view["error"]) == (
        "show",
        "failed",
        "Cancelled by customer",
    )
    assert view["callbacks"] == [{"sequence": 1, "state": "dead", "attempts": []}]
    assert "secret" not in shown.stdout
    again = await run(env, "callbacks", "redeliver", "show", "--merchant", merchant.key)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"foreign_id": "show", "sequence": 1, "state": "pending"}
    assert await redis.zscore(keys.delivery_due_of(invoice.id), invoice.id) is not None
    assert await redis.hget(keys.delivery(invoice.id), "dead") is None
    missing = await run(env, "invoice", "show", "nope", "--merchant", merchant.key)
    assert missing.returncode == 1


# --------------------------------------------------------------------------- newcomer (issue 10)

DEMO_KEYS_WARNING = "demo_extended_keys_in_use"


async def test_merchant_add_refuses_a_private_callback_url(
    env: dict[str, str], redis: aioredis.Redis
) -> None:
    """Without private callbacks allowed, a loopback callback URL is refused and not stored."""
    strict = {**env, "COINVOICE_ALLOW_PRIVATE_CALLBACKS": "0"}
    for url, reason in (
        ("http://127.0.0.1:8000/cb", "127.0.0.1 resolves to non-public address 127.0.0.1"),
        ("http://localhost:8000/cb", "localhost resolves to non-public address 127.0.0.1"),
    ):
        done = await run(
            strict, "merchant", "add", "--name", "Shop", "--callback-url", url, "--key", "priv"
        )
        assert done.returncode == 2, done.stdout
        assert reason in done.stderr and "COINVOICE_ALLOW_PRIVATE_CALLBACKS=1" in done.stderr
        assert done.stdout == ""
        assert await MerchantStore(redis).get("priv") is None
    allowed = await run(
        env, "merchant", "add", "--name", "Shop", "--callback-url", "http://127.0.0.1:8000/cb"
    )
    assert allowed.returncode == 0, allowed.stderr


async def test_demo_key_warning_only_where_addresses_are_derived(
    env: dict[str, str],
    redis: aioredis.Redis,
    settings: Settings,
    merchant: Merchant,
    tmp_path: Path,
) -> None:
    """The receiver and the worker warn about the demo keys; operator commands do not."""
    service = invoice_service(redis, settings)
    await service.create(merchant, InvoiceRequest("warn", "Tea", "EUR", Decimal(5), True))
    await service.cancel(merchant.key, "warn")
    for args in (
        ("invoice", "show", "warn", "--merchant", merchant.key),
        ("callbacks", "redeliver", "warn", "--merchant", merchant.key),
        ("orphans",),
    ):
        done = await run(env, *args)
        assert done.returncode == 0, done.stderr
        assert DEMO_KEYS_WARNING not in done.stderr, args
    receiver, _ = await processes.receiver(env, tmp_path)
    worker = processes.worker(env, tmp_path)
    try:
        async with asyncio.timeout(20):
            while DEMO_KEYS_WARNING not in worker.log_path.read_text():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        worker.stop()
        receiver.stop()
    assert receiver.log_path.read_text().count(DEMO_KEYS_WARNING) == 1
    assert worker.log_path.read_text().count(DEMO_KEYS_WARNING) == 1


async def test_invoice_show_names_gross_fee_and_net(
    env: dict[str, str], client: Any, merchant: Merchant, ingest: Ingest
) -> None:
    """invoice show of a paid invoice: credited gross, the fee, and the net on the balance."""
    from tests.support import create_payload, merchant_post, processing_post

    _, created = await merchant_post(
        client, merchant, "/api/v2/invoices/create", create_payload("paid", sender_currency="BTC")
    )
    address, amount = created["data"]["address"], created["data"]["sender_amount"]
    await processing_post(client, deposit(address, amount, status="confirmed", confirmations=1))
    await drain(ingest)
    shown = await run(env, "invoice", "show", "paid", "--merchant", merchant.key)
    assert shown.returncode == 0, shown.stderr
    credited = json.loads(shown.stdout)["credited"]
    assert {k: credited[k] for k in ("currency", "gross", "fee", "net")} == {
        "currency": "EUR",
        "gross": "106.75000000",
        "fee": "1.06750000",
        "net": "105.68250000",
    }
    assert "before the fee" in credited["meaning"]
