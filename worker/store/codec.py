"""JSON encoding of domain values at the storage and queue boundary.

pydantic's TypeAdapter validates and (de)serializes the frozen dataclasses in
Rust; Decimals travel as strings, so no amount ever passes through a float.

A stored invoice (`dump_invoice`) is its JSON without the fields at their
default (`exclude_defaults`), compressed with raw deflate and a preset
dictionary (`_ZDICT_1`: the field names and common values of an invoice), behind
one marker byte, `\x01`. A confirmed invoice with two transactions, ~1,180
bytes of JSON, is stored in ~290 bytes (docs/architecture.md, *Stored
formats*). The dictionary is part of the data format: it never changes; a
better one would be `\x02`, with `\x01` still read.

`load_invoice` also reads the two JSON forms written before (they start with
`{`): the full JSON, and the compact JSON whose transactions leave out their
currency and address when they are the invoice's deposit address and a
`clear` compliance.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from pydantic import TypeAdapter

from worker.domain.events import TransactionUpdate
from worker.domain.models import Compliance, Invoice, Merchant

_INVOICE = TypeAdapter(Invoice)
_UPDATE = TypeAdapter(TransactionUpdate)
_MERCHANT = TypeAdapter(Merchant)


# The preset dictionary of format \x01. FROZEN: stored invoices can only be read
# with exactly these bytes. Deflate finds matches in it like in text seen before
# the invoice, and codes the nearer ones (the end) shorter: the field names and
# values every invoice has come last.
_ZDICT_1 = (
    b'"quotes":[{"currency":"ETH","amount":"","rate":""},{"currency":"LTC","amount":"'
    b'"url_success":"https://","url_failed":"https://","email":"@gmail.com",'
    b'"terms":{"fee_percent":"0.5","underpayment_tolerance_percent":"1"},'
    b'"error":"","late":true,"tag":"","refund_address":"","refund_token":"",'
    b'"mailed":["payback_guideline","refund_claim"],"status":"failed","status":"processing",'
    b'"compliance":"flagged","status":"cancelled","status":"not_confirmed",'
    b'"invoice_type":2,"payment_type":"fill_or_kill","currency":"USD","currency":"ETH",'
    b'"sender_currency":"LTC","address":{"id":1,"currency":"LTC","address":"L'
    b'{"id":1000,"merchant":"0123456789abcdef0123456789abcdef","foreign_id":"order-1",'
    b'"token":"","title":"Order 1","description":"","currency":"EUR","amount":"100.00",'
    b'"invoice_type":3,"payment_type":"good_until_expired","status":"pending",'
    b'"created_at":1796000000,"sender_currency":"BTC","sender_amount":"0.00100000",'
    b'"rate":"59259.25925925926","fixed_at":1796000000,"expires_at":1796000000,'
    b'"address":{"id":1000,"currency":"BTC","address":"bc1q"},"transactions":['
    b'{"id":10000,"currency":"BTC","address":"bc1q","amount":"0.00100000","txid":"",'
    b'"confirmations":1,"status":"not_confirmed","compliance":"clear",'
    b'"first_observed_at":1796000000,"observed_at":1796000000},'
    b'{"id":10001,"currency":"BTC","address":"bc1q","amount":"0.00100000","txid":"",'
    b'"confirmations":3,"status":"confirmed","compliance":"clear",'
    b'"first_observed_at":1796000000,"observed_at":1796000000}],'
    b'"credited":"100.00","fee":"1.00000000","sequence":6}'
)
_DEFLATE_1 = b"\x01"  # the marker of format \x01: raw deflate with `_ZDICT_1`
# Level 6: ~290 bytes for a confirmed invoice, well inside jemalloc's 320-byte class
# (level 3: ~302 bytes, ~3 µs less per call; level 1: ~325 bytes, over it).
_LEVEL = 6


def dump_invoice(invoice: Invoice) -> bytes:
    """The stored form of an invoice: `\x01` and its JSON, deflated with `_ZDICT_1`."""
    return deflate_json(_INVOICE.dump_json(invoice, exclude_defaults=True))


# A compressor primed with the dictionary, copied for each invoice: a copy skips
# hashing the dictionary again, and its small window (4 KiB: the dictionary and a
# typical invoice) and hash table keep every allocation small. A stream made with a
# small window inflates with any larger one (`invoice_json` uses 32 KiB).
_PRIMED = zlib.compressobj(_LEVEL, zlib.DEFLATED, -12, 4, zlib.Z_DEFAULT_STRATEGY, _ZDICT_1)


def deflate_json(text: bytes) -> bytes:
    """The stored form of an invoice's JSON (`dump_invoice`; the bulk loader's too)."""
    deflate = _PRIMED.copy()
    return b"".join((_DEFLATE_1, deflate.compress(text), deflate.flush()))


def invoice_json(data: bytes) -> bytes:
    """The JSON of a stored invoice, whichever form it was written in (for operator views)."""
    if data[:1] != _DEFLATE_1:
        return data
    inflate = zlib.decompressobj(-15, _ZDICT_1)
    text = inflate.decompress(data[1:])
    if not inflate.eof:
        raise ValueError("truncated stored invoice")
    return text


def load_invoice(data: bytes | str) -> Invoice:
    """An invoice as stored by `dump_invoice`, or by earlier versions (JSON, compact or full)."""
    if isinstance(data, str):
        data = data.encode()
    if data[:1] == _DEFLATE_1:
        return _INVOICE.validate_json(invoice_json(data))
    if b'"transactions"' not in data:
        return _INVOICE.validate_json(data)
    raw = json.loads(data)
    address = raw.get("address") or {}
    for tx in raw["transactions"]:
        if "address" not in tx:
            tx["currency"], tx["address"] = address["currency"], address["address"]
        tx.setdefault("compliance", Compliance.CLEAR.value)
    return _INVOICE.validate_python(raw)


def dump_invoice_json(invoice: Invoice) -> bytes:
    """The compact JSON form the previous version stored (its tests check it is still read)."""
    return _INVOICE.dump_json(invoice, exclude_defaults=True, exclude=_implied(invoice))


def _implied(invoice: Invoice) -> dict[str, Any] | None:
    """pydantic's `exclude` for the transaction fields that repeat what the invoice says."""
    address = invoice.address
    per_tx: dict[int, set[str]] = {}
    for i, tx in enumerate(invoice.transactions):
        fields = set()
        if address and (tx.currency, tx.address) == (address.currency, address.address):
            fields |= {"currency", "address"}
        if tx.compliance is Compliance.CLEAR:
            fields.add("compliance")
        if fields:
            per_tx[i] = fields
    return {"transactions": per_tx} if per_tx else None


def dump_update(update: TransactionUpdate) -> bytes:
    return _UPDATE.dump_json(update, exclude_defaults=True)


def load_update(data: bytes | str) -> TransactionUpdate:
    return _UPDATE.validate_json(data)


def dump_merchant(merchant: Merchant) -> bytes:
    return _MERCHANT.dump_json(merchant)


def load_merchant(data: bytes | str) -> Merchant:
    return _MERCHANT.validate_json(data)
