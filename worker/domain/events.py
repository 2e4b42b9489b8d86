"""What can happen to an invoice: the inputs of the state machine.

Everything the machine needs travels on the event — the time, the quote and
the deposit address prepared by the shell — so the machine itself stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from worker.domain.models import Compliance, DepositAddress, Quote, TxStatus


@dataclass(frozen=True, slots=True)
class CustomerConfirm:
    """The customer picked a currency and gave an e-mail (spec §7 confirm).

    `quote` is the fresh quote for type 1 (rate fixed now); type 2 uses the
    quote fixed at creation. `address` is a newly allocated deposit address
    when the invoice has none yet.
    """

    at: int
    sender_currency: str | None
    email: str | None
    quote: Quote | None = None
    address: DepositAddress | None = None


@dataclass(frozen=True, slots=True)
class MerchantCancel:
    at: int


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A worker's clock reached the invoice's timer (`expires_at` + grace)."""

    at: int


@dataclass(frozen=True, slots=True)
class TransactionUpdate:
    """One state of one deposit transaction, as the processing layer saw it (spec §8)."""

    tx_id: int
    currency: str
    address: str
    amount: Decimal
    txid: str
    confirmations: int
    status: TxStatus
    compliance: Compliance
    observed_at: int
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class RefundAddressSet:
    """The customer submitted a refund address on the refund page (spec §7)."""

    at: int
    address: str


Event = CustomerConfirm | MerchantCancel | TimerFired | TransactionUpdate | RefundAddressSet
