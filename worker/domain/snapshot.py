"""The merchant-facing snapshot of an invoice (spec §9), with AlphaPo field names.

The same document is the body of every merchant callback and the answer of
`invoices/status` and `cancel`. Amounts are 8-decimal strings.
"""

from __future__ import annotations

from typing import Any

from worker.domain.machine import remaining_amount
from worker.domain.models import Invoice, Transaction
from worker.domain.money import fmt8


def _transaction(tx: Transaction) -> dict[str, Any]:
    return {
        "id": tx.id,
        "currency": tx.currency,
        "transaction_type": "blockchain",
        "type": "deposit",
        "address": tx.address,
        "tag": tx.tag,
        "amount": fmt8(tx.amount),
        "txid": tx.txid,
        "confirmations": str(tx.confirmations),
        "status": tx.status.value,
        "compliance": tx.compliance.value,
    }


def snapshot(invoice: Invoice) -> dict[str, Any]:
    """The §9 callback document for the invoice's current state and sequence."""
    address = invoice.address
    return {
        "id": invoice.id,
        "foreign_id": invoice.foreign_id,
        "type": "invoice",
        "crypto_address": None
        if address is None
        else {
            "id": address.id,
            "currency": address.currency,
            "convert_to": invoice.currency,
            "address": address.address,
            "tag": address.tag,
        },
        "currency_sent": None
        if invoice.sender_amount is None
        else {
            "currency": invoice.sender_currency,
            "amount": fmt8(invoice.sender_amount),
            "remaining_amount": fmt8(remaining_amount(invoice)),
        },
        "currency_received": {"currency": invoice.currency, "amount": fmt8(invoice.amount)},
        "transactions": [_transaction(tx) for tx in invoice.transactions],
        "fees": []
        if not invoice.fee
        else [
            {
                "type": "fee_crypto_deposit",
                "currency": invoice.currency,
                "amount": fmt8(invoice.fee),
            }
        ],
        "error": invoice.error,
        "status": invoice.status.value,
        "fixed_at": invoice.fixed_at,
        "expires_at": invoice.expires_at,
        "refund_address": invoice.refund_address,
        "sequence": invoice.sequence,
    }
