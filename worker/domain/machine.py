"""The invoice state machine: pure, typed, no I/O.

``apply(invoice, event, policy)`` returns the new invoice and the effects the
change obliges (callbacks, e-mails, ledger entries). It never reads a clock,
Redis or the network; the shell (``worker/services/invoices.py``) prepares addresses and
quotes, persists the result atomically and performs the effects.

The rules are spec §3–§5. The properties the rest of the system relies on:

* idempotent: applying an event a second time changes nothing and emits
  nothing (transaction updates merge monotonically; final states are final);
* one transaction's updates commute (status rank, max confirmations, sticky
  compliance);
* a change the merchant can see bumps ``sequence`` and emits exactly one
  ``Callback``; anything else emits none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from worker.domain.effects import Callback, Effect, Email, LedgerEntry, LedgerKind
from worker.domain.events import (
    CustomerConfirm,
    Event,
    MerchantCancel,
    RefundAddressSet,
    TimerFired,
    TransactionUpdate,
)
from worker.domain.models import (
    Compliance,
    DepositAddress,
    EmailKind,
    Invoice,
    PaymentType,
    Quote,
    Status,
    Terms,
    Transaction,
    TxStatus,
)
from worker.domain.money import ZERO, div, floor8, half_up8, mul
from worker.domain.records import replace

# Failure texts, exactly as spec §5.
NOT_PAID = "Timer expired. User not paid."
PROCESSING_TOO_LONG = "Timer expired. Transactions were in status processing too long."
TIMER_UNDERPAID = "Timer expired. User paid less than requested."
UNDERPAID = "User paid less than requested."
FLAGGED = "Transaction flagged by compliance."
CANCELLED = "Cancelled by customer"

# The statuses a timer can run in.
TIMED = (Status.PENDING, Status.PROCESSING)
HUNDRED = Decimal(100)


class DomainError(Exception):
    """An event the invoice refuses; the API maps `code` to its JSON error."""

    code = "invalid_invoice_state"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidState(DomainError):
    """The event is not allowed in the invoice's current status."""


class InvalidChoice(DomainError):
    """The customer's choice does not fit the invoice (currency, refund address)."""

    code = "invalid_choice"


@dataclass(frozen=True, slots=True)
class Policy:
    """The configuration the rules depend on (from `Settings`)."""

    timer_seconds: int = 900
    grace_seconds: int = 30
    processing_window_seconds: int = 86_400
    processing_windows: Mapping[str, int] = field(default_factory=dict)

    def window(self, currency: str) -> int:
        return self.processing_windows.get(currency, self.processing_window_seconds)


@dataclass(frozen=True, slots=True)
class Transition:
    invoice: Invoice
    effects: tuple[Effect, ...] = ()

    @property
    def callback(self) -> Callback | None:
        """The newest snapshot this change obliges (the last Callback effect)."""
        return next((e for e in reversed(self.effects) if isinstance(e, Callback)), None)


# --------------------------------------------------------------------------- creation


@dataclass(frozen=True, slots=True)
class NewInvoice:
    """A validated create request (spec §6) plus what the shell prepared for it."""

    id: int
    merchant: str
    foreign_id: str
    token: str
    title: str
    description: str
    currency: str
    amount: Decimal
    timer: bool
    payment_type: PaymentType
    terms: Terms
    created_at: int
    sender_currency: str | None = None
    email: str | None = None
    url_success: str | None = None
    url_failed: str | None = None
    # Type 2: a quote per offered currency; type 3: the one quote.
    quotes: tuple[Quote, ...] = ()
    # Type 3 only: the deposit address assigned at creation.
    address: DepositAddress | None = None


def invoice_type(timer: bool, sender_currency: str | None) -> int:
    """Spec §2: the type follows from `timer` and `sender_currency`."""
    if not timer:
        return 1
    return 3 if sender_currency else 2


def create(new: NewInvoice, policy: Policy) -> Invoice:
    """The invoice a create request makes (status `created` or `pending`)."""
    kind = invoice_type(new.timer, new.sender_currency)
    base = Invoice(
        id=new.id,
        merchant=new.merchant,
        foreign_id=new.foreign_id,
        token=new.token,
        title=new.title,
        description=new.description,
        currency=new.currency,
        amount=new.amount,
        invoice_type=kind,
        payment_type=new.payment_type,
        status=Status.CREATED,
        created_at=new.created_at,
        terms=new.terms,
        url_success=new.url_success,
        url_failed=new.url_failed,
        email=new.email,
        sender_currency=new.sender_currency,
    )
    if kind == 1:
        return base
    timed = replace(
        base,
        status=Status.PENDING,
        fixed_at=new.created_at,
        expires_at=new.created_at + policy.timer_seconds,
    )
    if kind == 2:
        if not new.quotes:
            raise InvalidChoice("A timer invoice needs at least one quote.")
        return replace(timed, quotes=new.quotes)
    quote = _quote_for(new.quotes, new.sender_currency)
    if new.address is None or new.address.currency != quote.currency:
        raise InvalidChoice("A preselected-currency invoice needs a deposit address.")
    return replace(timed, sender_amount=quote.amount, rate=quote.rate, address=new.address)


# --------------------------------------------------------------------------- views


def seen_sum(invoice: Invoice) -> Decimal:
    """Sum of the transactions that are not cancelled (spec §4 `seen`)."""
    return sum((t.amount for t in invoice.transactions if t.counts), ZERO)


def confirmed_sum(invoice: Invoice) -> Decimal:
    return sum((t.amount for t in invoice.transactions if t.status is TxStatus.CONFIRMED), ZERO)


def remaining_amount(invoice: Invoice) -> Decimal:
    """max(0, required − seen); zero while no sender amount is fixed yet (nothing to pay)."""
    if invoice.sender_amount is None:
        return ZERO
    return max(ZERO, invoice.sender_amount - seen_sum(invoice))


def covers(invoice: Invoice, paid: Decimal) -> bool:
    """Does `paid` cover the required amount, within the merchant's underpayment tolerance?"""
    if invoice.sender_amount is None:
        return False
    tolerance = invoice.terms.underpayment_tolerance_percent
    threshold = invoice.sender_amount - div(mul(invoice.sender_amount, tolerance), HUNDRED)
    return paid > ZERO and paid >= threshold


def deadline(invoice: Invoice, policy: Policy) -> int | None:
    """When the invoice's timer fires (unix seconds), or None if none runs."""
    if invoice.status in TIMED and invoice.expires_at is not None:
        return invoice.expires_at + policy.grace_seconds
    return None


def visible(invoice: Invoice) -> tuple[object, ...]:
    """Everything of the §9 snapshot that can change after creation."""
    return (
        invoice.status,
        invoice.error,
        invoice.sender_currency,
        invoice.sender_amount,
        invoice.address,
        invoice.fixed_at,
        invoice.expires_at,
        invoice.fee,
        invoice.refund_address,
        tuple(
            (t.id, t.status, t.confirmations, t.compliance, t.amount, t.txid)
            for t in invoice.transactions
        ),
    )


# --------------------------------------------------------------------------- apply


def apply(invoice: Invoice, event: Event, policy: Policy) -> Transition:
    """Apply one event; raise `DomainError` for a request the invoice refuses."""
    match event:
        case TransactionUpdate():
            new, effects = _transaction(invoice, event, policy)
        case TimerFired():
            new, effects = _timer(invoice, event, policy)
        case CustomerConfirm():
            new, effects = _confirm(invoice, event, policy)
        case MerchantCancel():
            new, effects = _cancel(invoice)
        case RefundAddressSet():
            new, effects = _refund_address(invoice, event)
    if visible(new) != visible(invoice):
        new = replace(new, sequence=invoice.sequence + 1)
        effects = (*effects, Callback(new.sequence))
    return Transition(new, effects)


Step = tuple[Invoice, tuple[Effect, ...]]


def _fail(invoice: Invoice, error: str, mail: EmailKind | None = None, cause: str = "") -> Step:
    failed = replace(invoice, status=Status.FAILED, error=error)
    if mail is None:
        return failed, ()
    return _mail(failed, mail, cause)


def _mail(invoice: Invoice, kind: EmailKind, cause: str) -> Step:
    """Emit a customer e-mail once per cause."""
    if cause in invoice.mailed:
        return invoice, ()
    email = Email(
        kind=kind,
        cause=cause,
        currency=invoice.sender_currency or invoice.currency,
        expected=invoice.sender_amount or ZERO,
        received=seen_sum(invoice),
    )
    return replace(invoice, mailed=tuple(sorted((*invoice.mailed, cause)))), (email,)


def _timer(invoice: Invoice, event: TimerFired, policy: Policy) -> Step:
    due = deadline(invoice, policy)
    if due is None or event.at < due:
        return invoice, ()  # stale or early: the timer moved or the invoice ended
    return _expire(invoice)


def _expire(invoice: Invoice) -> Step:
    """The invoice's time ran out (spec §5)."""
    if invoice.status is Status.PROCESSING and any(t.in_flight for t in invoice.transactions):
        return _fail(invoice, PROCESSING_TOO_LONG, EmailKind.REFUND_CLAIM, "processing_too_long")
    if seen_sum(invoice) == ZERO:
        return _fail(invoice, NOT_PAID)
    return _fail(invoice, TIMER_UNDERPAID, EmailKind.PAYBACK_GUIDELINE, "timer_underpaid")


def _cancel(invoice: Invoice) -> Step:
    if invoice.status.is_final:
        raise InvalidState("Invoice cannot be failed in its current state.")
    if seen_sum(invoice) > ZERO:
        return _fail(invoice, CANCELLED, EmailKind.REFUND_CLAIM, "cancel")
    return _fail(invoice, CANCELLED)


def _refund_address(invoice: Invoice, event: RefundAddressSet) -> Step:
    if invoice.refund_address is not None:
        if invoice.refund_address == event.address:
            return invoice, ()
        raise InvalidChoice("A refund address is already stored for this invoice.")
    return replace(invoice, refund_address=event.address), ()


def _quote_for(quotes: tuple[Quote, ...], currency: str | None) -> Quote:
    for quote in quotes:
        if quote.currency == currency:
            return quote
    raise InvalidChoice(f"Currency {currency} is not offered for this invoice.")


def _confirm(invoice: Invoice, event: CustomerConfirm, policy: Policy) -> Step:
    """Spec §7 confirm: type 1 fixes rate, address and timer; type 2 assigns the address."""
    email = event.email or invoice.email
    if invoice.status.is_final:
        # A finished invoice still takes the customer's first e-mail address: the
        # payback or refund mail it caused waits for one (worker/mail/loop.py). Nothing else.
        same_currency = event.sender_currency in (None, invoice.sender_currency)
        if same_currency and event.email is not None and invoice.email in (None, event.email):
            return replace(invoice, email=event.email), ()
        raise InvalidState("Invoice cannot be confirmed in its current state.")
    if invoice.address is not None:
        # Already confirmed (or type 3): only a first e-mail may still be recorded.
        if event.sender_currency not in (None, invoice.sender_currency):
            raise InvalidChoice("The payment currency has already been chosen.")
        if invoice.email is not None and event.email not in (None, invoice.email):
            # Fixed from confirmation on (spec §7): whoever holds the invoice link
            # must not redirect the refund and payback e-mails to themselves.
            raise InvalidChoice("The e-mail address has already been given.")
        return replace(invoice, email=email), ()
    currency = event.sender_currency or invoice.sender_currency
    if currency is None:
        raise InvalidChoice("Choose a payment currency.")
    if invoice.sender_currency is not None and currency != invoice.sender_currency:
        raise InvalidChoice("The payment currency of this invoice is preselected.")
    if event.address is None or event.address.currency != currency:
        raise InvalidChoice("No deposit address for the chosen currency.")
    if invoice.invoice_type == 2:
        if invoice.expires_at is not None and event.at >= invoice.expires_at:
            raise InvalidState("Invoice has expired.")
        quote = _quote_for(invoice.quotes, currency)
        return _assign(invoice, quote, event.address, email), ()
    # Type 1: the rate is fixed now and the timer starts now.
    if event.quote is None or event.quote.currency != currency:
        raise InvalidChoice(f"Currency {currency} is not offered for this invoice.")
    assigned = _assign(invoice, event.quote, event.address, email)
    return (
        replace(
            assigned,
            status=Status.PENDING,
            fixed_at=event.at,
            expires_at=event.at + policy.timer_seconds,
        ),
        (),
    )


def _assign(invoice: Invoice, quote: Quote, address: DepositAddress, email: str | None) -> Invoice:
    return replace(
        invoice,
        sender_currency=quote.currency,
        sender_amount=quote.amount,
        rate=quote.rate,
        address=address,
        email=email,
    )


def owes_refund_token(transition: Transition) -> bool:
    """Does this change send the invoice's first refund or payback e-mail (spec §7)?

    The shell then gives the invoice its refund token (random, so not made
    here) before committing, in the same atomic step as the e-mail record.
    """
    return transition.invoice.refund_token is None and any(
        isinstance(effect, Email) for effect in transition.effects
    )


# --------------------------------------------------------------------------- payments


def merge(tx: Transaction, update: TransactionUpdate) -> Transaction:
    """Monotonic merge of one more update into a transaction (spec §4).

    Commutative, associative and idempotent on the fields that change
    (status rank, confirmations, compliance, observation times); the
    identifying fields (amount, txid) stay as first recorded.
    """
    status = update.status if update.status.rank > tx.status.rank else tx.status
    flagged = Compliance.FLAGGED in (tx.compliance, update.compliance)
    return replace(
        tx,
        status=status,
        confirmations=max(tx.confirmations, update.confirmations),
        compliance=Compliance.FLAGGED if flagged else Compliance.CLEAR,
        first_observed_at=min(tx.first_observed_at, update.observed_at),
        observed_at=max(tx.observed_at, update.observed_at),
    )


def new_transaction(update: TransactionUpdate, late: bool) -> Transaction:
    return Transaction(
        id=update.tx_id,
        currency=update.currency,
        address=update.address,
        amount=update.amount,
        txid=update.txid,
        confirmations=update.confirmations,
        status=update.status,
        compliance=update.compliance,
        first_observed_at=update.observed_at,
        observed_at=update.observed_at,
        tag=update.tag,
        late=late,
    )


def _transaction(invoice: Invoice, update: TransactionUpdate, policy: Policy) -> Step:
    effects: tuple[Effect, ...] = ()
    # Time first: an invoice whose time ran out before this update was observed
    # expires before the update counts, whichever reached us first.
    if _ran_out(invoice, update.observed_at):
        invoice, effects = _expire(invoice)

    old = invoice.tx(update.tx_id)
    tx = (
        new_transaction(update, late=invoice.status.is_final) if old is None else merge(old, update)
    )
    if tx == old:
        return invoice, effects
    others = tuple(t for t in invoice.transactions if t.id != tx.id)
    # Sorted by id, so the stored order does not depend on arrival order.
    invoice = replace(invoice, transactions=tuple(sorted((*others, tx), key=lambda t: t.id)))

    if invoice.status.is_final:
        return _after_final(invoice, tx, old, policy, effects)
    if tx.compliance is Compliance.FLAGGED:
        # The window the payments earned stays, whether the flag or the sighting came first.
        flagged = _with_window(invoice, policy)
        failed, mail = _fail(flagged, FLAGGED, EmailKind.REFUND_CLAIM, "compliance")
        return failed, (*effects, *mail)
    invoice, effects = _settle(invoice, policy, effects)
    if _ran_out(invoice, update.observed_at):
        # The update moved the window's start back so far that it ended before the
        # update was observed: expire now, as applying the update again would.
        invoice, mail = _expire(invoice)
        effects = (*effects, *mail)
    return invoice, effects


def _ran_out(invoice: Invoice, at: int) -> bool:
    """Had the invoice's time run out at `at` (the processing layer's clock)?"""
    return invoice.status in TIMED and invoice.expires_at is not None and at >= invoice.expires_at


def coverage_time(invoice: Invoice) -> int | None:
    """Since when the in-time payments seen cover the amount, by the processing layer's clock.

    A payment is seen from its first observation on; a dropped (`cancelled`)
    one only until its last observation. The answer is the start of the
    latest period in which the seen payments covered the amount (None if
    they never did). A function of the merged transactions alone, so the
    move to `processing` and its window (spec §4: `observed_at` + window)
    come out the same whichever of a payment's updates arrived first — a
    drop may well arrive before the sighting it ends.
    """
    changes: list[tuple[int, Decimal]] = []
    for tx in invoice.transactions:
        if tx.late:
            continue
        if tx.counts:
            changes.append((tx.first_observed_at, tx.amount))
        elif tx.first_observed_at < tx.observed_at:
            changes += [(tx.first_observed_at, tx.amount), (tx.observed_at, -tx.amount)]
    total, since, covered = ZERO, None, False
    for at, amount in sorted(changes):  # at one instant, drops before sightings
        total += amount
        now = covers(invoice, total)
        if now and not covered:
            since = at
        covered = now
    return since


def _with_window(invoice: Invoice, policy: Policy) -> Invoice:
    """Set `expires_at` to the end of the processing window, where payments cover the amount."""
    since = coverage_time(invoice)
    if since is None:
        return invoice
    return replace(invoice, expires_at=since + policy.window(invoice.sender_currency or ""))


def _after_final(
    invoice: Invoice,
    tx: Transaction,
    old: Transaction | None,
    policy: Policy,
    effects: tuple[Effect, ...],
) -> Step:
    """A final invoice records every update (spec §4) without changing status."""
    if invoice.status is Status.CONFIRMED or invoice.error == FLAGGED:
        invoice = _with_window(invoice, policy)
    newly_confirmed = tx.status is TxStatus.CONFIRMED and (
        old is None or old.status is not TxStatus.CONFIRMED
    )
    if not newly_confirmed:
        return invoice, effects
    if tx.late:
        invoice, mail = _mail(invoice, EmailKind.PAYBACK_GUIDELINE, f"late:{tx.id}")
        return invoice, (*effects, *mail)
    if invoice.status is Status.CONFIRMED and _in_time_confirmed(invoice) > (
        invoice.sender_amount or ZERO
    ):
        invoice, mail = _mail(invoice, EmailKind.PAYBACK_GUIDELINE, "overpaid")
        return invoice, (*effects, *mail)
    return invoice, effects


def _in_time_confirmed(invoice: Invoice) -> Decimal:
    return sum(
        (t.amount for t in invoice.transactions if t.status is TxStatus.CONFIRMED and not t.late),
        ZERO,
    )


def _settle(invoice: Invoice, policy: Policy, effects: tuple[Effect, ...]) -> Step:
    """Decide the status of a live invoice after a transaction changed (spec §4)."""
    paid = confirmed_sum(invoice)
    if covers(invoice, paid):
        return _credit(_with_window(invoice, policy), paid, effects)
    if coverage_time(invoice) is not None:
        # Seen payments cover (or covered, before a drop) the amount: `processing`, the
        # timer extended to the window; there is no way back (spec §3).
        invoice = _with_window(replace(invoice, status=Status.PROCESSING), policy)
    nothing_in_flight = not any(t.in_flight for t in invoice.transactions)
    if invoice.payment_type is PaymentType.FILL_OR_KILL and paid > ZERO and nothing_in_flight:
        failed, mail = _fail(invoice, UNDERPAID, EmailKind.PAYBACK_GUIDELINE, "underpaid")
        return failed, (*effects, *mail)
    return invoice, effects


def _credit(invoice: Invoice, paid: Decimal, effects: tuple[Effect, ...]) -> Step:
    """Confirm: exchange the payment (capped at the required amount), then charge the fee."""
    required = invoice.sender_amount or ZERO
    if paid >= required:
        credited = invoice.amount
    else:  # accepted within the underpayment tolerance
        credited = floor8(div(mul(invoice.amount, paid), required))
    fee = half_up8(div(mul(credited, invoice.terms.fee_percent), HUNDRED))
    confirmed = replace(invoice, status=Status.CONFIRMED, credited=credited, fee=fee)
    merchant, currency = invoice.merchant, invoice.currency
    ledger = [LedgerEntry(merchant, currency, credited, LedgerKind.CREDIT, invoice.id)]
    if fee > ZERO:
        ledger.append(LedgerEntry(merchant, currency, -fee, LedgerKind.FEE, invoice.id))
    effects = (*effects, *ledger)
    if paid > required:
        confirmed, mail = _mail(confirmed, EmailKind.PAYBACK_GUIDELINE, "overpaid")
        effects = (*effects, *mail)
    return confirmed, effects
