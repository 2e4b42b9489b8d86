"""`worker.domain.records.replace` gives what `dataclasses.replace` gives, for domain classes."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from tests.machine_factories import make_invoice
from worker.domain.models import (
    Compliance,
    DepositAddress,
    Quote,
    Status,
    Terms,
    Transaction,
    TxStatus,
)
from worker.domain.records import replace


def test_replace_matches_the_standard_library_for_an_invoice() -> None:
    invoice = make_invoice(3)
    for changes in (
        {"status": Status.PROCESSING},
        {"sequence": invoice.sequence + 1, "expires_at": 123},
        {"transactions": ()},
        {},
    ):
        ours = replace(invoice, **changes)
        assert ours == dataclasses.replace(invoice, **changes)
        assert type(ours) is type(invoice)
    assert invoice == make_invoice(3), "the original is unchanged"


@pytest.mark.parametrize(
    "value",
    [
        DepositAddress(1, "BTC", "bc1q"),
        Quote("BTC", Decimal("0.1"), Decimal("50000")),
        Terms(),
    ],
    ids=lambda v: type(v).__name__,
)
def test_replace_copies_every_field(value: object) -> None:
    assert replace(value) == value
    assert replace(value) is not value


def test_replace_refuses_an_unknown_field() -> None:
    with pytest.raises(TypeError, match="nope"):
        replace(make_invoice(3), nope=1)


def test_replace_keeps_the_instance_frozen() -> None:
    tx = Transaction(
        1, "BTC", "bc1q", Decimal(1), "t", 0, TxStatus.NOT_CONFIRMED, Compliance.CLEAR, 1, 1
    )
    copy = replace(tx, confirmations=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.confirmations = 2  # type: ignore[misc]
