"""The invoice domain's data: frozen, typed, Decimal for money.

These are plain frozen dataclasses so the state machine can build new values
with ``dataclasses.replace`` cheaply; pydantic's ``TypeAdapter`` turns them
into JSON and back at the storage boundary (``worker/store/codec.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum


class Status(StrEnum):
    """The five invoice statuses of spec §3; `confirmed` and `failed` are final."""

    CREATED = "created"
    PENDING = "pending"
    PROCESSING = "processing"
    CONFIRMED = "confirmed"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (Status.CONFIRMED, Status.FAILED)


class PaymentType(StrEnum):
    """The API's `type`: one payment must cover the invoice, or parts until the timer ends."""

    FILL_OR_KILL = "fill_or_kill"
    GOOD_UNTIL_EXPIRED = "good_until_expired"


class TxStatus(StrEnum):
    """A transaction's status as reported by the processing layer (spec §8)."""

    NOT_CONFIRMED = "not_confirmed"
    CANCELLED = "cancelled"
    CONFIRMED = "confirmed"

    @property
    def rank(self) -> int:
        """Monotonic order: not_confirmed < cancelled < confirmed (spec §4)."""
        return _TX_RANK[self]


_TX_RANK = {TxStatus.NOT_CONFIRMED: 0, TxStatus.CANCELLED: 1, TxStatus.CONFIRMED: 2}


class Compliance(StrEnum):
    CLEAR = "clear"
    FLAGGED = "flagged"


class EmailKind(StrEnum):
    """The two customer e-mails of spec §10."""

    PAYBACK_GUIDELINE = "payback_guideline"
    REFUND_CLAIM = "refund_claim"


@dataclass(frozen=True, slots=True)
class Transaction:
    """One deposit transaction on an invoice, merged from all its updates."""

    id: int  # the processing layer's transaction id (spec §8)
    currency: str
    address: str
    amount: Decimal
    txid: str
    confirmations: int
    status: TxStatus
    compliance: Compliance
    first_observed_at: int  # unix seconds; the earliest update decides "in time"
    observed_at: int  # unix seconds of the latest state
    tag: str | None = None
    # Arrived after the invoice was final (spec §4 late payment).
    late: bool = False

    @property
    def in_flight(self) -> bool:
        return self.status is TxStatus.NOT_CONFIRMED

    @property
    def counts(self) -> bool:
        """Seen payments are the ones not cancelled (spec §4)."""
        return self.status is not TxStatus.CANCELLED


@dataclass(frozen=True, slots=True)
class Quote:
    """The amount to pay in one sender currency at a fixed rate."""

    currency: str
    amount: Decimal  # rounded up at 8 decimals
    rate: Decimal  # invoice currency units per sender currency unit


@dataclass(frozen=True, slots=True)
class DepositAddress:
    """A deposit address assigned to exactly one invoice, ever."""

    id: int  # `crypto_address.id` in callbacks; unique across currencies
    currency: str
    address: str
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class Terms:
    """The merchant's commercial terms, copied onto the invoice at creation."""

    fee_percent: Decimal = Decimal(1)
    underpayment_tolerance_percent: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class Invoice:
    """An invoice and everything that happened to it."""

    id: int
    merchant: str  # the merchant's public key
    foreign_id: str
    token: str  # public, unguessable (≥128 bits); names the hosted page
    title: str
    description: str
    currency: str  # the currency the merchant is credited in
    amount: Decimal
    invoice_type: int  # 1 no timer, 2 timer, 3 timer + preselected currency (spec §2)
    payment_type: PaymentType
    status: Status
    created_at: int
    terms: Terms = field(default_factory=Terms)
    url_success: str | None = None
    url_failed: str | None = None
    email: str | None = None
    # Type 2: one fixed quote per offered currency; types 1/3: empty.
    quotes: tuple[Quote, ...] = ()
    sender_currency: str | None = None
    sender_amount: Decimal | None = None
    rate: Decimal | None = None
    fixed_at: int | None = None
    expires_at: int | None = None
    address: DepositAddress | None = None
    error: str = ""
    transactions: tuple[Transaction, ...] = ()
    credited: Decimal | None = None  # exchanged into `currency` on confirmation
    fee: Decimal | None = None
    refund_address: str | None = None
    # Names the refund page (spec §7): issued with the first refund or payback
    # e-mail, never shown on the invoice page, so the invoice link alone cannot
    # choose where a refund goes.
    refund_token: str | None = None
    # Causes of customer e-mails already emitted (each at most once).
    mailed: tuple[str, ...] = ()
    # Strictly increasing per merchant-visible change (spec §9).
    sequence: int = 0

    def tx(self, tx_id: int) -> Transaction | None:
        for tx in self.transactions:
            if tx.id == tx_id:
                return tx
        return None


@dataclass(frozen=True, slots=True)
class Merchant:
    """A merchant account. `secret` and `standard_webhooks_secret` are never logged."""

    key: str
    name: str
    secret: str
    callback_url: str
    fee_percent: Decimal = Decimal(1)
    underpayment_tolerance_percent: Decimal = Decimal(0)
    standard_webhooks_secret: str | None = None
    # Opt-in replay protection: requests carry X-Processing-Timestamp inside the MAC.
    require_timestamp: bool = False

    @property
    def terms(self) -> Terms:
        return Terms(self.fee_percent, self.underpayment_tolerance_percent)

    def __repr__(self) -> str:  # keep secrets out of tracebacks and logs
        return f"Merchant(key={self.key!r}, name={self.name!r})"
