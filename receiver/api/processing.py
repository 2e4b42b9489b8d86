"""Processing callbacks (spec §8): the blockchain side reports deposit transactions.

A callback is answered 200 only after its updates are in the Redis stream
the workers consume (AOF `appendfsync always` puts them on disk first); a bad
signature or body is refused and nothing is queued.
"""

from __future__ import annotations

import functools
import time
from decimal import Decimal
from typing import Annotated, Literal, TypeVar

import msgspec
from aiohttp import web
from pydantic import Field, model_validator

from receiver import appkeys
from receiver.api.errors import bad_signature
from receiver.api.requests import may_nest, parse_json, read_body, validate
from receiver.api.schemas import Amount, Body, CurrencyCode, amount_value
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
# (mempool, confirmations, confirmed, retries) and checking a checksum costs ~80 µs.
# ~300 B an entry: 4,096 (~1.2 MB) hold ~12 s of new addresses at 1,000 callbacks/s,
# enough for the processing layer's retries, and fill within a minute, so the process's
# size levels off early (bench/soak.py; 65,536 were still filling after 10 minutes).
SPELLING_CACHE_SIZE = 4_096


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


# The fast path's JSON decoder: numbers with a fraction become Decimal from their text.
_DECODER = msgspec.json.Decoder(float_hook=Decimal)
_STATUSES = {status.value: status for status in TxStatus}
_COMPLIANCES = {compliance.value: compliance for compliance in Compliance}
_BLANK = ("", None)
Member = TypeVar("Member", TxStatus, Compliance)


def _text(value: object, longest: int = 200) -> str | None:
    """A `Text` value as pydantic takes it, or None (not for the fast path)."""
    return value if type(value) is str and 0 < len(value) <= longest else None


def _currency(value: object) -> str | None:
    """A `CurrencyCode` (length checked as sent, then stripped and upper-cased), or None."""
    return value.strip().upper() if type(value) is str and 2 <= len(value) <= 16 else None


def _count(value: object) -> int | None:
    """A non-negative int, sent as a JSON integer or as plain digits in a string, or None."""
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is str and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value) if value == "0" or value[0] != "0" else None
    return None


def _member(members: dict[str, Member], value: object) -> Member | None:
    """The enum member whose value is `value` (a string), or None."""
    return members.get(value) if type(value) is str else None


def fast_updates(body: bytes, received_at: int) -> list[TransactionUpdate] | None:
    """The updates of a plainly well-formed callback, without pydantic; None otherwise.

    Most callbacks are valid and shaped alike; this checks that shape in a few
    microseconds from a C JSON decoder. It accepts only what ProcessingCallback
    accepts, with the same values, and returns None on anything unusual or
    wrong: then the ordinary path (json, pydantic) decides, and words the errors.
    """
    if may_nest(body):
        return None
    try:
        data = _DECODER.decode(body)
    except msgspec.DecodeError:
        return None
    if type(data) is not dict:
        return None
    get = data.get
    status = _member(_STATUSES, get("status"))
    compliance = get("compliance")
    compliance = Compliance.CLEAR if compliance in _BLANK else _member(_COMPLIANCES, compliance)
    observed_at = get("observed_at")
    callback_id = get("id")
    transactions = get("transactions")
    if (
        status is None
        or compliance is None
        or get("type") not in ("deposit", "", None)
        or not (callback_id in _BLANK or type(callback_id) is int)
        or not (observed_at in _BLANK or (type(observed_at) is int and observed_at > 0))
        or type(transactions) is not list
        or not 0 < len(transactions) <= MAX_TRANSACTIONS
    ):
        return None
    address_currency = None
    crypto_address = get("crypto_address")
    if crypto_address not in _BLANK:
        if type(crypto_address) is not dict:
            return None
        address_currency = _currency(crypto_address.get("currency"))
        tag = crypto_address.get("tag")
        if (
            address_currency is None
            or _text(crypto_address.get("address")) is None
            or not (tag is None or type(tag) is str)
        ):
            return None
    updates = []
    for tx in transactions:
        if type(tx) is not dict:
            return None
        tx_id = tx.get("id")
        currency = _currency(tx.get("currency"))
        address = _text(tx.get("address"))
        txid = _text(tx.get("txid"))
        confirmations = tx.get("confirmations")
        confirmations = 0 if confirmations in _BLANK else _count(confirmations)
        tag = tx.get("tag")
        extra_type, kind, riskscore = (
            tx.get("transaction_type"),
            tx.get("type"),
            tx.get("riskscore"),
        )
        if (
            type(tx_id) is not int
            or tx_id <= 0
            or currency is None
            or (address_currency is not None and currency != address_currency)
            or address is None
            or txid is None
            or confirmations is None
            or not (tag in _BLANK or (type(tag) is str and len(tag) <= 100))
            or not (extra_type is None or type(extra_type) is str)
            or kind not in ("deposit", "", None)
            or not (riskscore is None or type(riskscore) is str)
        ):
            return None
        try:
            amount = amount_value(tx.get("amount"))
        except ValueError:
            return None
        updates.append(
            TransactionUpdate(
                tx_id=tx_id,
                currency=currency,
                address=_spelling(currency, address),
                amount=amount,
                txid=txid,
                confirmations=confirmations,
                status=status,
                compliance=compliance,
                observed_at=observed_at or received_at,
                tag=tag or None,
            )
        )
    return updates


async def receive(request: web.Request) -> web.Response:
    settings = request.app[appkeys.SETTINGS]
    body = await read_body(request)
    key_ok = request.headers.get("X-Processing-Key") == settings.processing_key
    secret = settings.processing_secret.get_secret_value()
    if not verify(secret, body, request.headers.get("X-Processing-Signature")) or not key_ok:
        raise bad_signature()
    received_at = int(time.time())
    updates = None
    if request.content_type == "application/json":
        updates = fast_updates(body, received_at)
    if updates is None:
        callback = validate(ProcessingCallback, parse_json(request, body))
        updates = updates_of(callback, received_at)
    ids = await request.app[appkeys.ENQUEUER].enqueue(updates)
    return queued_answer(ids)


_NONE_QUEUED = '{"data": {"queued": 0, "ids": []}}'


def queued_answer(ids: list[str]) -> web.Response:
    """`{"data": {"queued": n, "ids": [...]}}`, as `data()` words it, without json.dumps:
    stream entry ids are `<ms>-<seq>` (digits and a dash), nothing to escape."""
    listed = '", "'.join(ids)
    text = f'{{"data": {{"queued": {len(ids)}, "ids": ["{listed}"]}}}}' if ids else _NONE_QUEUED
    return web.Response(body=text.encode(), content_type="application/json", charset="utf-8")
