"""`coinvoice simulate deposit`: play the processing layer for a demo or a test."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time

import aiohttp

from worker.app.runtime import policy_from
from worker.config import Settings
from worker.domain.currencies import FileRateProvider, crypto_codes
from worker.domain.signing import sign
from worker.store.connection import connect
from worker.store.invoices import InvoiceStore


async def _currency_of(settings: Settings, address: str) -> str | None:
    """The currency of the invoice that owns `address`, looked up in Redis."""
    redis = connect(settings)
    try:
        codes = crypto_codes(FileRateProvider.load(settings.rates_file))
        store = InvoiceStore(redis, policy_from(settings))
        owners = await store.ids_by_address([(code, address) for code in codes])
    finally:
        await redis.aclose()
    return next((code for code, owner in zip(codes, owners, strict=True) if owner), None)


def deposit_body(
    *,
    tx_id: int,
    currency: str,
    address: str,
    amount: str,
    txid: str,
    status: str,
    confirmations: int,
    compliance: str,
    observed_at: int | None,
) -> dict[str, object]:
    """A processing callback in the deposit-callback shape of spec §8 (no observed_at: now)."""
    body: dict[str, object] = {
        "id": tx_id,
        "type": "deposit",
        "crypto_address": {"currency": currency, "address": address, "tag": None},
        "transactions": [
            {
                "id": tx_id,
                "currency": currency,
                "transaction_type": "blockchain",
                "type": "deposit",
                "address": address,
                "tag": None,
                "amount": amount,
                "txid": txid,
                "confirmations": str(confirmations),
            }
        ],
        "status": status,
        "compliance": compliance,
    }
    if observed_at is not None:
        body["observed_at"] = observed_at
    return body


async def deposit(args: argparse.Namespace, settings: Settings) -> int:
    currency = args.currency or await _currency_of(settings, args.address)
    if currency is None:
        print("coinvoice: no invoice owns that address; pass --currency", file=sys.stderr)
        return 1
    tx_id = args.tx_id or secrets.randbelow(2**31 - 1) + 1
    body = json.dumps(
        deposit_body(
            tx_id=tx_id,
            currency=currency.upper(),
            address=args.address,
            amount=args.amount,
            txid=args.txid or secrets.token_hex(32),
            status=args.status,
            confirmations=args.confirmations,
            compliance=args.compliance,
            observed_at=args.observed_at or int(time.time()),
        )
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Processing-Key": settings.processing_key,
        "X-Processing-Signature": sign(settings.processing_secret.get_secret_value(), body),
    }
    url = (args.url or settings.base_url).rstrip("/") + "/api/v2/processing/callbacks"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        answer = await response.json(content_type=None)
    print(
        json.dumps(
            {
                "tx_id": tx_id,
                "status": args.status,
                "http_status": response.status,
                "response": answer,
            }
        )
    )
    return 0 if response.status == 200 else 1
