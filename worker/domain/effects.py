"""What a state change obliges the system to do: the outputs of the state machine.

The store records effects atomically with the state change that caused them
(``commit.lua``), so a crash can neither lose nor repeat one.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from worker.domain.models import EmailKind


@dataclass(frozen=True, slots=True)
class Callback:
    """The merchant must receive the invoice snapshot with this sequence (or a newer one)."""

    sequence: int


@dataclass(frozen=True, slots=True)
class Email:
    """A customer e-mail; `cause` makes it at-most-once per invoice (spec §10)."""

    kind: EmailKind
    cause: str
    currency: str
    expected: Decimal
    received: Decimal


class LedgerKind(StrEnum):
    CREDIT = "credit"
    FEE = "fee_crypto_deposit"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A signed change of a merchant balance in one currency."""

    merchant: str
    currency: str
    amount: Decimal  # positive credit, negative fee
    kind: LedgerKind
    invoice_id: int


Effect = Callback | Email | LedgerEntry
