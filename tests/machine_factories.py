"""Builders for the pure state machine's tests: invoices, events and effect views.

Every value is exact: amounts are Decimal, times are unix seconds counted
from `T0` (the moment the invoice is created).
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from worker.domain.effects import Callback, Effect, Email, LedgerEntry
from worker.domain.events import CustomerConfirm, Event, TransactionUpdate
from worker.domain.machine import NewInvoice, Policy, apply, create
from worker.domain.models import (
    Compliance,
    DepositAddress,
    Invoice,
    PaymentType,
    Quote,
    Status,
    Terms,
    Transaction,
    TxStatus,
)

T0 = 1_700_000_000  # unix seconds: every test invoice is created now
TIMER = 900  # seconds, spec §2 default
GRACE = 30  # seconds, spec §5 default
DAY = 86_400  # seconds: the default processing window (spec §4)
ETH_WINDOW = 3_600  # seconds: a per-currency override (`ETH=3600`)

POLICY = Policy(
    timer_seconds=TIMER,
    grace_seconds=GRACE,
    processing_window_seconds=DAY,
    processing_windows={"ETH": ETH_WINDOW},
)

AMOUNT = Decimal("106.75")  # EUR, what the merchant is credited
# Fixed quotes: sender amount × rate = AMOUNT exactly, so credits are easy to read.
BTC_QUOTE = Quote("BTC", Decimal("0.01000000"), Decimal("10675"))
ETH_QUOTE = Quote("ETH", Decimal("0.05000000"), Decimal("2135"))
LTC_QUOTE = Quote("LTC", Decimal("1.25000000"), Decimal("85.4"))
QUOTES = (BTC_QUOTE, ETH_QUOTE)
REQUIRED = BTC_QUOTE.amount  # what a BTC invoice requires


def quote_for(currency: str) -> Quote:
    """The test quote of one currency."""
    return {"BTC": BTC_QUOTE, "ETH": ETH_QUOTE, "LTC": LTC_QUOTE}[currency]


def deposit_address(currency: str = "BTC", n: int = 1) -> DepositAddress:
    """A deposit address of `currency`, distinct per `n`."""
    return DepositAddress(id=n, currency=currency, address=f"{currency.lower()}-addr-{n}")


def new_invoice(
    *,
    timer: bool = True,
    sender_currency: str | None = None,
    payment_type: PaymentType = PaymentType.FILL_OR_KILL,
    terms: Terms | None = None,
    amount: Decimal = AMOUNT,
    quotes: tuple[Quote, ...] | None = None,
    address: DepositAddress | None = None,
    email: str | None = None,
) -> NewInvoice:
    """A create request as the shell hands it to the machine (quotes and address prepared)."""
    if quotes is None:
        if not timer:
            quotes = ()
        elif sender_currency is None:
            quotes = QUOTES
        else:
            quotes = (quote_for(sender_currency),)
    if address is None and timer and sender_currency is not None:
        address = deposit_address(sender_currency)
    return NewInvoice(
        id=7,
        merchant="mkey",
        foreign_id="order-7",
        token="tok-7",
        title="Tea",
        description="A pot of tea",
        currency="EUR",
        amount=amount,
        timer=timer,
        payment_type=payment_type,
        terms=terms or Terms(),
        created_at=T0,
        sender_currency=sender_currency,
        email=email,
        quotes=quotes,
        address=address,
    )


def make_invoice(
    kind: int = 2,
    *,
    currency: str = "BTC",
    payment_type: PaymentType = PaymentType.FILL_OR_KILL,
    fee_percent: Decimal = Decimal(1),
    tolerance: Decimal = Decimal(0),
    amount: Decimal = AMOUNT,
    ready: bool = True,
    policy: Policy = POLICY,
) -> Invoice:
    """An invoice of spec §2 type `kind`; with `ready` it has its address and awaits payment.

    Type 1 and 2 become ready through the customer's confirmation at `T0`, so
    their timers end at `T0 + TIMER` like type 3's.
    """
    terms = Terms(fee_percent=fee_percent, underpayment_tolerance_percent=tolerance)
    if kind == 3:
        return create(
            new_invoice(
                sender_currency=currency, payment_type=payment_type, terms=terms, amount=amount
            ),
            policy,
        )
    invoice = create(
        new_invoice(timer=kind == 2, payment_type=payment_type, terms=terms, amount=amount),
        policy,
    )
    if not ready:
        return invoice
    confirm = CustomerConfirm(
        at=T0,
        sender_currency=currency,
        email="buyer@example.com",
        quote=quote_for(currency) if kind == 1 else None,
        address=deposit_address(currency),
    )
    return apply(invoice, confirm, policy).invoice


def update(
    tx_id: int = 1,
    amount: Decimal = REQUIRED,
    status: TxStatus = TxStatus.NOT_CONFIRMED,
    *,
    at: int = T0 + 60,
    confirmations: int | None = None,
    compliance: Compliance = Compliance.CLEAR,
    currency: str = "BTC",
    txid: str | None = None,
) -> TransactionUpdate:
    """One processing-layer update of transaction `tx_id` observed at `at`."""
    if confirmations is None:
        confirmations = 3 if status is TxStatus.CONFIRMED else 0
    return TransactionUpdate(
        tx_id=tx_id,
        currency=currency,
        address=deposit_address(currency).address,
        amount=amount,
        txid=txid or f"hash-{tx_id}",
        confirmations=confirmations,
        status=status,
        compliance=compliance,
        observed_at=at,
    )


def run(
    invoice: Invoice, events: Iterable[Event], policy: Policy = POLICY
) -> tuple[Invoice, list[Effect]]:
    """Apply `events` in order; the final invoice and every effect emitted."""
    effects: list[Effect] = []
    for event in events:
        step = apply(invoice, event, policy)
        invoice = step.invoice
        effects.extend(step.effects)
    return invoice, effects


def tx_of(invoice: Invoice, tx_id: int) -> Transaction:
    """The invoice's transaction `tx_id`, which must be there."""
    tx = invoice.tx(tx_id)
    assert tx is not None, f"no transaction {tx_id}"
    return tx


def callbacks(effects: Iterable[Effect]) -> list[Callback]:
    return [e for e in effects if isinstance(e, Callback)]


def emails(effects: Iterable[Effect]) -> list[Email]:
    return [e for e in effects if isinstance(e, Email)]


def ledger(effects: Iterable[Effect]) -> list[LedgerEntry]:
    return [e for e in effects if isinstance(e, LedgerEntry)]


def mail_causes(effects: Iterable[Effect]) -> set[tuple[str, str]]:
    """The (kind, cause) pairs of the e-mails in `effects`."""
    return {(e.kind.value, e.cause) for e in emails(effects)}


ALLOWED = {
    (Status.CREATED, Status.PENDING),
    (Status.CREATED, Status.FAILED),
    (Status.PENDING, Status.PROCESSING),
    (Status.PENDING, Status.CONFIRMED),
    (Status.PENDING, Status.FAILED),
    (Status.PROCESSING, Status.CONFIRMED),
    (Status.PROCESSING, Status.FAILED),
}
"""The status changes spec §3 allows (staying in a status is always allowed)."""
