"""JSON encoding of domain values at the storage and queue boundary.

pydantic's TypeAdapter validates and (de)serializes the frozen dataclasses in
Rust; Decimals travel as strings, so no amount ever passes through a float.
"""

from __future__ import annotations

from pydantic import TypeAdapter

from worker.events import TransactionUpdate
from worker.models import Invoice, Merchant

_INVOICE = TypeAdapter(Invoice)
_UPDATE = TypeAdapter(TransactionUpdate)
_MERCHANT = TypeAdapter(Merchant)


def dump_invoice(invoice: Invoice) -> bytes:
    return _INVOICE.dump_json(invoice, exclude_defaults=True)


def load_invoice(data: bytes | str) -> Invoice:
    return _INVOICE.validate_json(data)


def dump_update(update: TransactionUpdate) -> bytes:
    return _UPDATE.dump_json(update, exclude_defaults=True)


def load_update(data: bytes | str) -> TransactionUpdate:
    return _UPDATE.validate_json(data)


def dump_merchant(merchant: Merchant) -> bytes:
    return _MERCHANT.dump_json(merchant)


def load_merchant(data: bytes | str) -> Merchant:
    return _MERCHANT.validate_json(data)
