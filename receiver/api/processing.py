"""Processing callbacks (spec §8): the blockchain side reports deposit transactions.

A callback is answered 200 only after its updates are in the Redis stream
the workers consume (AOF `appendfsync always` puts them on disk first); a bad
signature or body is refused and nothing is queued.
"""

from __future__ import annotations

import functools
import time
from decimal import Decimal
from typing import Annotated, Literal

from aiohttp import web
from pydantic import Field, model_validator

from receiver import appkeys
from receiver.api.errors import bad_signature
from receiver.api.merchant import data
from receiver.api.requests import parse_json, read_body, validate
from receiver.api.schemas import Amount, Body, CurrencyCode
from worker.domain.addresses import canonical_address
from worker.domain.events import TransactionUpdate
from worker.domain.models import Compliance, TxStatus
from worker.domain.signing import verify

# One callback reports one transaction in practice; a few are tolerated.
MAX_TRANSACTIONS = 16

Text = Annotated[str, Field(min_length=1, max_length=200)]


class CryptoAddress(Body):
    currency: CurrencyCode
    address: Text
    tag: str | None = None


class ProcessingTransaction(Body):
    id: Annotated[int, Field(gt=0)]
    currency: CurrencyCode
    transaction_type: str = "blockchain"
    type: Literal["deposit"] = "deposit"
    address: Text
    tag: Annotated[str, Field(max_length=100)] | None = None
    amount: Amount
    txid: Text
    # Sent as a string ("0") by the processing layer; coerced, never negative.
    confirmations: Annotated[int, Field(ge=0)] = 0
    riskscore: str | None = None


class ProcessingCallback(Body):
    id: int | None = None
    type: Literal["deposit"] = "deposit"
    crypto_address: CryptoAddress | None = None
    transactions: Annotated[
        list[ProcessingTransaction], Field(min_length=1, max_length=MAX_TRANSACTIONS)
    ]
    status: TxStatus
    compliance: Compliance = Compliance.CLEAR
    observed_at: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _one_currency_per_transaction(self) -> ProcessingCallback:
        if self.crypto_address is not None:
            for tx in self.transactions:
                if tx.currency != self.crypto_address.currency:
                    raise ValueError("transactions[].currency must match crypto_address.currency")
        return self


# Canonical spellings remembered: each deposit address is reported several times
# (mempool, confirmations, confirmed) and checking a checksum costs ~80 µs.
SPELLING_CACHE_SIZE = 65_536


@functools.lru_cache(maxsize=SPELLING_CACHE_SIZE)
def _spelling(currency: str, address: str) -> str:
    """The stored spelling of an address; one that does not parse stays as sent (an orphan)."""
    try:
        return canonical_address(currency, address)
    except ValueError:
        return address


def updates_of(callback: ProcessingCallback, received_at: int) -> list[TransactionUpdate]:
    """One state-machine event per reported transaction, with canonical address spelling."""
    return [
        TransactionUpdate(
            tx_id=tx.id,
            currency=tx.currency,
            address=_spelling(tx.currency, tx.address),
            amount=Decimal(tx.amount),
            txid=tx.txid,
            confirmations=tx.confirmations,
            status=callback.status,
            compliance=callback.compliance,
            observed_at=callback.observed_at or received_at,
            tag=tx.tag,
        )
        for tx in callback.transactions
    ]


async def receive(request: web.Request) -> web.Response:
    settings = request.app[appkeys.SETTINGS]
    body = await read_body(request)
    key_ok = request.headers.get("X-Processing-Key") == settings.processing_key
    secret = settings.processing_secret.get_secret_value()
    if not verify(secret, body, request.headers.get("X-Processing-Signature")) or not key_ok:
        raise bad_signature()
    callback = validate(ProcessingCallback, parse_json(request, body))
    updates = updates_of(callback, int(time.time()))
    ids = await request.app[appkeys.ENQUEUER].enqueue(updates)
    return data({"queued": len(ids), "ids": ids})
