"""The stored invoice's codec: µs to encode and decode, the previous form and the current one.

Run: `.venv/bin/python bench/codec_speed.py` (about 20 s; prints one JSON object).

The invoice is the confirmed two-transaction invoice of bench/scale.py (random
txids, token and merchant key, as real ones are). Both forms are timed in
turns in one process (ROUNDS rounds of N calls each, the best round kept, in
CPU time of this process: on the shared machine the wall clock counts the
time other processes ran), so the noise hits them alike: the previous version's compact
JSON (`dump_invoice_json`, and `load_invoice` of it) and the current deflated
form (`dump_invoice`, `load_invoice`). The update path does one of each per
applied update (read the invoice, commit its new state).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

from bench.harness import machine
from tests.machine_factories import make_invoice, run, update
from worker.domain.models import Invoice, PaymentType, TxStatus
from worker.store.codec import dump_invoice, dump_invoice_json, load_invoice

ROUNDS = 15
N = 2_000


def confirmed_invoice() -> Invoice:
    invoice = make_invoice(kind=3, payment_type=PaymentType.GOOD_UNTIL_EXPIRED)
    invoice = replace(invoice, merchant=secrets.token_hex(16), token=secrets.token_urlsafe(24))
    half = (invoice.sender_amount or Decimal(0)) / 2
    final, _ = run(
        invoice,
        [
            update(1, half, TxStatus.CONFIRMED),
            update(2, half, TxStatus.CONFIRMED, at=invoice.created_at + 120),
        ],
    )
    txs = tuple(
        replace(tx, txid=hashlib.sha256(secrets.token_bytes(8)).hexdigest())
        for tx in final.transactions
    )
    return replace(final, transactions=txs)


def best_us(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(ROUNDS):
        for name, call in calls.items():
            started = time.process_time()
            for _ in range(N):
                call()
            best[name] = min(best[name], (time.process_time() - started) / N * 1e6)
    return {name: round(us, 1) for name, us in best.items()}


def main() -> dict[str, Any]:
    invoice = confirmed_invoice()
    old, new = dump_invoice_json(invoice), dump_invoice(invoice)
    assert load_invoice(old) == invoice == load_invoice(new)
    us = best_us(
        {
            "previous_encode": lambda: dump_invoice_json(invoice),
            "previous_decode": lambda: load_invoice(old),
            "current_encode": lambda: dump_invoice(invoice),
            "current_decode": lambda: load_invoice(new),
        }
    )
    return {
        "benchmark": "codec_speed",
        "machine": machine.describe(),
        "invoice": "confirmed, 2 transactions",
        "bytes": {"previous": len(old), "current": len(new)},
        "us": us,
        "encode_plus_decode_us": {
            "previous": round(us["previous_encode"] + us["previous_decode"], 1),
            "current": round(us["current_encode"] + us["current_decode"], 1),
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
