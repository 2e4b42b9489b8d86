"""Properties of the pure invoice state machine, checked with hypothesis.

(a) only the status changes of spec §3 happen, and final invoices keep their
outcome; (b) every event is idempotent; (c) one payment's updates commute, and
so do several payments' updates when all are seen before any confirms;
(d) `sequence` counts Callback effects; (e) money stays exact.

Where order matters by nature, (c) for several payments leaves it out, since
the machine cannot know what has not arrived yet: a drop reported after
another payment's sighting (both in flight at once looked like `processing`,
and there is no way back); a compliance flag (a payment first seen after the
flag failed the invoice is a late payment, one seen before is not); and an
underpayment tolerance (the credit is what had confirmed when the confirmed
sum first covered the amount).

The examples are derandomized so every run checks the same ones; set
`COINVOICE_HYPOTHESIS_EXAMPLES` (e.g. 5000) for a wider random search.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.machine_factories import (
    ALLOWED,
    DAY,
    ETH_WINDOW,
    GRACE,
    POLICY,
    T0,
    TIMER,
    callbacks,
    deposit_address,
    ledger,
    mail_causes,
    make_invoice,
    quote_for,
)
from worker.domain.effects import Effect, Email, LedgerEntry, LedgerKind
from worker.domain.events import (
    CustomerConfirm,
    Event,
    MerchantCancel,
    RefundAddressSet,
    TimerFired,
    TransactionUpdate,
)
from worker.domain.machine import DomainError, InvalidState, Transition, apply, visible
from worker.domain.models import Compliance, Invoice, PaymentType, Status, TxStatus
from worker.domain.money import half_up8

SEARCH = os.environ.get("COINVOICE_HYPOTHESIS_EXAMPLES")
PROFILE = settings(
    max_examples=int(SEARCH) if SEARCH else 200,
    deadline=None,
    derandomize=not SEARCH,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

NC, DROPPED, OK = TxStatus.NOT_CONFIRMED, TxStatus.CANCELLED, TxStatus.CONFIRMED
CLEAR, FLAG = Compliance.CLEAR, Compliance.FLAGGED

# --------------------------------------------------------------------------- strategies

FEES = st.sampled_from([Decimal(0), Decimal(1), Decimal("0.5"), Decimal("2.75"), Decimal("3.3333")])
TOLERANCES = st.sampled_from([Decimal(0), Decimal(0), Decimal(1), Decimal("2.5")])
# Times that matter: around the 15-minute timer, its grace, and the windows.
INTERESTING = [0, 1, TIMER - 1, TIMER, TIMER + GRACE - 1, TIMER + GRACE, ETH_WINDOW, DAY]
OFFSETS = st.one_of(
    st.integers(0, TIMER + 2 * GRACE),
    st.integers(0, DAY + 2 * TIMER),
    st.sampled_from(INTERESTING),
)


@st.composite
def invoices(draw: st.DrawFn, *, ready: bool | None = None, tolerance: bool = True) -> Invoice:
    """A fresh invoice of any type, terms and payment type (ready: has its address)."""
    kind = draw(st.sampled_from([1, 2, 3]))
    is_ready = draw(st.booleans()) if ready is None else ready
    return make_invoice(
        kind,
        currency=draw(st.sampled_from(["BTC", "ETH"])),
        payment_type=draw(st.sampled_from(list(PaymentType))),
        fee_percent=draw(FEES),
        tolerance=draw(TOLERANCES) if tolerance else Decimal(0),
        ready=is_ready or kind == 3,
    )


def amounts(required: Decimal) -> st.SearchStrategy[Decimal]:
    """Payment amounts around `required`: parts, exact, one satoshi off, overpayments."""
    sat = Decimal("0.00000001")
    notable = [required / 4, required / 2, required - sat, required, required + sat, required * 2]
    return st.one_of(
        st.sampled_from([a.quantize(sat) for a in notable]),
        st.decimals(min_value=sat, max_value=required * 2, places=8),
    )


@st.composite
def tx_updates(draw: st.DrawFn, currency: str = "BTC") -> TransactionUpdate:
    """Any update of one of four transactions, with any status, flag, amount and time."""
    tx_id = draw(st.integers(1, 4))
    return TransactionUpdate(
        tx_id=tx_id,
        currency=currency,
        address=deposit_address(currency).address,
        amount=draw(amounts(quote_for(currency).amount)),
        txid=f"hash-{tx_id}",
        confirmations=draw(st.integers(0, 6)),
        status=draw(st.sampled_from(list(TxStatus))),
        compliance=draw(st.sampled_from([CLEAR, CLEAR, CLEAR, FLAG])),
        observed_at=T0 + draw(OFFSETS),
    )


@st.composite
def customer_confirms(draw: st.DrawFn) -> CustomerConfirm:
    currency = draw(st.sampled_from(["BTC", "ETH", "LTC", None]))
    others = draw(st.sampled_from(["BTC", "ETH", "LTC"]))
    quoted = currency if currency is not None and draw(st.booleans()) else others
    return CustomerConfirm(
        at=T0 + draw(OFFSETS),
        sender_currency=currency,
        email=draw(st.sampled_from([None, "a@example.com", "b@example.com"])),
        quote=draw(st.sampled_from([None, quote_for(quoted)])),
        address=draw(st.sampled_from([None, deposit_address(quoted, 2)])),
    )


EVENTS: st.SearchStrategy[Event] = st.one_of(
    tx_updates(),
    tx_updates(),
    tx_updates(),
    st.builds(TimerFired, at=st.builds(lambda o: T0 + o, OFFSETS)),
    st.builds(MerchantCancel, at=st.builds(lambda o: T0 + o, OFFSETS)),
    customer_confirms(),
    st.builds(
        RefundAddressSet,
        at=st.just(T0 + 60),
        address=st.sampled_from(["refund-1", "refund-2"]),
    ),
)


@dataclass(frozen=True)
class Step:
    """One event applied: before, after (None when refused) and the effects."""

    before: Invoice
    event: Event
    transition: Transition | None

    @property
    def after(self) -> Invoice:
        return self.before if self.transition is None else self.transition.invoice

    @property
    def effects(self) -> tuple[Effect, ...]:
        return () if self.transition is None else self.transition.effects


def walk(invoice: Invoice, events: list[Event]) -> Iterator[Step]:
    """Apply `events` in order as the worker would; refused events leave the invoice as it was."""
    for event in events:
        if isinstance(event, TransactionUpdate):
            if invoice.address is None:
                continue  # deposits reach an invoice only through its address
            event = replace(event, currency=invoice.address.currency)
        try:
            transition = apply(invoice, event, POLICY)
        except DomainError:
            transition = None
        step = Step(invoice, event, transition)
        yield step
        invoice = step.after


def final(invoice: Invoice, events: list[Event]) -> tuple[Invoice, list[Effect]]:
    """The invoice after `events` and all effects, in order."""
    effects: list[Effect] = []
    for step in walk(invoice, events):
        effects.extend(step.effects)
        invoice = step.after
    return invoice, effects


# --------------------------------------------------------------------------- (a) allowed graph


@PROFILE
@given(invoice=invoices(), events=st.lists(EVENTS, max_size=30))
def test_only_the_transitions_of_the_spec_happen(invoice: Invoice, events: list[Event]) -> None:
    """No event sequence leaves §3's graph, and a final invoice keeps status, error and money."""
    for step in walk(invoice, events):
        before, after = step.before, step.after
        if step.transition is None:
            continue
        assert after.status is before.status or (before.status, after.status) in ALLOWED
        if before.status.is_final:
            kept = ("status", "error", "credited", "fee")
            assert [getattr(after, f) for f in kept] == [getattr(before, f) for f in kept]
        if after.status is Status.FAILED:
            assert after.error
        else:
            assert after.error == ""


# --------------------------------------------------------------------------- (b) idempotency


@PROFILE
@given(invoice=invoices(), events=st.lists(EVENTS, min_size=1, max_size=30))
def test_every_event_applied_twice_changes_nothing_more(
    invoice: Invoice, events: list[Event]
) -> None:
    """The same event right again yields the same invoice and no effects (or a refusal)."""
    for step in walk(invoice, events):
        after = step.after
        if isinstance(step.event, MerchantCancel) and step.transition is not None:
            with pytest.raises(InvalidState):
                apply(after, step.event, POLICY)  # now final: a second cancel is refused
            continue
        try:
            again = apply(after, step.event, POLICY)
        except DomainError:
            assert step.transition is None, f"{step.event} accepted once, then refused"
            continue
        assert step.transition is not None, f"{step.event} refused once, then accepted"
        assert again.invoice == after
        assert again.effects == ()


# --------------------------------------------------------------------------- (c) order independence


@st.composite
def payment_life(
    draw: st.DrawFn, invoice: Invoice, tx_id: int, *, alone: bool
) -> list[TransactionUpdate]:
    """One payment's updates in the order they happened (times are set later).

    Statuses only climb (`not_confirmed`…, then `cancelled` and/or
    `confirmed`), confirmations never drop, a compliance flag once raised
    stays, and it is raised before the payment confirms (a flag raised after
    the confirmation fails nothing, one seen first fails the invoice: the
    merged state cannot tell them apart). A payment `alone` on its invoice may
    also be dropped or flagged; several payments are clear and never dropped
    (see the module docstring).
    """
    assert invoice.address is not None
    required = invoice.sender_amount or Decimal(1)
    endings = [(), (DROPPED,), (OK,), (DROPPED, OK)] if alone else [(), (OK,)]
    statuses = [NC] * draw(st.integers(0 if alone else 1, 3)) + list(draw(st.sampled_from(endings)))
    statuses = statuses or [NC]
    first_ok = statuses.index(OK) if OK in statuses else len(statuses)
    last_flaggable = min(first_ok, len(statuses) - 1)
    flag_from = draw(st.none() | st.integers(0, last_flaggable)) if alone else None
    amount = draw(amounts(required))
    size = len(statuses)
    confirmations = sorted(draw(st.lists(st.integers(0, 6), min_size=size, max_size=size)))
    return [
        TransactionUpdate(
            tx_id=tx_id,
            currency=invoice.address.currency,
            address=invoice.address.address,
            amount=amount,
            txid=f"hash-{tx_id}",
            confirmations=max(c, 1) if status is OK else c,
            status=status,
            compliance=FLAG if flag_from is not None and i >= flag_from else CLEAR,
            observed_at=0,
        )
        for i, (status, c) in enumerate(zip(statuses, confirmations, strict=True))
    ]


def timed(updates: list[TransactionUpdate], times: list[int]) -> list[TransactionUpdate]:
    return [replace(u, observed_at=t) for u, t in zip(updates, times, strict=True)]


@st.composite
def shuffled_with_duplicates(
    draw: st.DrawFn, updates: list[TransactionUpdate]
) -> list[TransactionUpdate]:
    """Every update 1–5 times, in any order."""
    copies = [u for u in updates for _ in range(draw(st.integers(1, 5)))]
    return draw(st.permutations(copies))


def outcome(invoice: Invoice, effects: list[Effect]) -> tuple[object, ...]:
    """What must not depend on the order: the invoice but its sequence, ledger, e-mail causes."""
    return replace(invoice, sequence=0), ledger(effects), mail_causes(effects)


@st.composite
def single_payment(
    draw: st.DrawFn,
) -> tuple[Invoice, list[TransactionUpdate], list[TransactionUpdate]]:
    invoice = draw(invoices(ready=True))
    life = draw(payment_life(invoice, 1, alone=True))
    # All before expires_at, or all at/after it.
    window = (0, TIMER - 1) if draw(st.booleans()) else (TIMER, TIMER + 2 * DAY)
    offsets = draw(
        st.lists(st.integers(*window), min_size=len(life), max_size=len(life), unique=True)
    )
    natural = timed(life, [T0 + o for o in sorted(offsets)])
    return invoice, natural, draw(shuffled_with_duplicates(natural))


@PROFILE
@given(case=single_payment())
def test_one_payments_updates_commute(
    case: tuple[Invoice, list[TransactionUpdate], list[TransactionUpdate]],
) -> None:
    """Any order of one payment's updates, with repeats, gives the natural order's outcome."""
    invoice, natural, shuffled = case
    assert outcome(*final(invoice, list(shuffled))) == outcome(*final(invoice, list(natural)))


def seen_before_confirmed(order: list[TransactionUpdate]) -> list[TransactionUpdate]:
    """Move each payment's first sighting ahead of the first confirmation, keeping the rest."""
    first_ok = next((i for i, u in enumerate(order) if u.status is OK), len(order))
    head, tail = order[:first_ok], order[first_ok:]
    seen = {u.tx_id for u in head if u.status is NC}
    moved, rest = [], []
    for u in tail:
        if u.status is NC and u.tx_id not in seen:
            seen.add(u.tx_id)
            moved.append(u)
        else:
            rest.append(u)
    return head + moved + rest


@st.composite
def several_payments(
    draw: st.DrawFn,
) -> tuple[Invoice, list[TransactionUpdate], list[TransactionUpdate]]:
    # Tolerance 0: with a tolerance the credit depends on which parts had confirmed first.
    invoice = draw(invoices(ready=True, tolerance=False))
    lives = [
        draw(payment_life(invoice, tx_id, alone=False))
        for tx_id in range(1, draw(st.integers(2, 3)) + 1)
    ]
    # A random merge of the lives (each in its own order), every payment seen before any confirms.
    queues = [list(life) for life in lives]
    merged: list[TransactionUpdate] = []
    while any(queues):
        queue = draw(st.sampled_from([q for q in queues if q]))
        merged.append(queue.pop(0))
    merged = seen_before_confirmed(merged)
    offsets = draw(
        st.lists(st.integers(0, TIMER - 1), min_size=len(merged), max_size=len(merged), unique=True)
    )
    natural = timed(merged, [T0 + o for o in sorted(offsets)])
    return invoice, natural, seen_before_confirmed(draw(shuffled_with_duplicates(natural)))


@PROFILE
@given(case=several_payments())
def test_several_payments_seen_before_confirmation_commute(
    case: tuple[Invoice, list[TransactionUpdate], list[TransactionUpdate]],
) -> None:
    """In time, all seen before any confirms: any interleaving ends the same way."""
    invoice, natural, shuffled = case
    got, got_effects = final(invoice, list(shuffled))
    want, want_effects = final(invoice, list(natural))
    assert replace(got, sequence=0) == replace(want, sequence=0)
    assert got.status is want.status
    assert got.error == want.error
    assert got.transactions == want.transactions
    assert (got.credited, got.fee) == (want.credited, want.fee)
    assert ledger(got_effects) == ledger(want_effects)
    assert mail_causes(got_effects) == mail_causes(want_effects)


# Early sightings, and times between the ends of windows that start at them.
WINDOW_OFFSETS = [10, 20, 500, 800, ETH_WINDOW + 100, ETH_WINDOW + 700]


@st.composite
def window_histories(draw: st.DrawFn) -> tuple[Invoice, list[Event]]:
    """Three ETH payments of half the amount each (any life, dropped and revived too), by time.

    Any two of them cover the amount, so a revived payment can move the
    window's start back to an earlier pair.
    """
    invoice = draw(invoices(ready=True).filter(lambda i: i.sender_currency == "ETH"))
    half = quote_for("ETH").amount / 2
    history: list[TransactionUpdate] = []
    for tx_id in (1, 2, 3):
        life = [replace(u, amount=half) for u in draw(payment_life(invoice, tx_id, alone=True))]
        offsets = draw(st.permutations(WINDOW_OFFSETS))[: len(life)]
        history += timed(life, [T0 + o for o in sorted(offsets)])
    history.sort(key=lambda u: u.observed_at)
    return invoice, list(history)


# The revived-payment case is rare among random lives: search longer (still ~2 s).
@settings(PROFILE, max_examples=max(PROFILE.max_examples, 500))
@given(case=window_histories())
def test_updates_around_the_window_end_are_idempotent(case: tuple[Invoice, list[Event]]) -> None:
    """An update that moves the processing window, applied again, changes nothing more."""
    invoice, events = case
    for step in walk(invoice, events):
        assert step.transition is not None
        again = apply(step.after, step.event, POLICY)
        assert again.invoice == step.after
        assert again.effects == ()


# --------------------------------------------------------------------------- (d) sequence


@PROFILE
@given(invoice=invoices(), events=st.lists(EVENTS, max_size=30))
def test_sequence_counts_the_callbacks(invoice: Invoice, events: list[Event]) -> None:
    """Each visible change is sequence + 1 with one Callback; Callbacks add up to the sequence."""
    start = invoice.sequence
    total = 0
    for step in walk(invoice, events):
        sent = callbacks(step.effects)
        assert len(sent) <= 1
        total += len(sent)
        if sent:
            assert sent[0].sequence == step.after.sequence == step.before.sequence + 1
        else:
            assert step.after.sequence == step.before.sequence
        assert bool(sent) == (visible(step.after) != visible(step.before))
        invoice = step.after
    assert invoice.sequence == start + total


# --------------------------------------------------------------------------- (e) money


def _decimal_amounts(effect: Effect) -> list[object]:
    if isinstance(effect, LedgerEntry):
        return [effect.amount]
    if isinstance(effect, Email):
        return [effect.expected, effect.received]
    return []


@PROFILE
@given(invoice=invoices(), events=st.lists(EVENTS, max_size=30))
def test_money_is_exact_and_booked_once(invoice: Invoice, events: list[Event]) -> None:
    """Ledger credit = `credited`, fee = half-up(credited × fee% / 100), no float anywhere."""
    invoice, effects = final(invoice, events)
    for effect in effects:
        assert all(type(a) is Decimal for a in _decimal_amounts(effect))
    for amount in (invoice.sender_amount, invoice.credited, invoice.fee):
        assert amount is None or type(amount) is Decimal
    assert all(type(t.amount) is Decimal for t in invoice.transactions)
    entries = ledger(effects)
    credits = [e.amount for e in entries if e.kind is LedgerKind.CREDIT]
    fees = [e.amount for e in entries if e.kind is LedgerKind.FEE]
    if invoice.status is not Status.CONFIRMED:
        assert invoice.credited is None
        assert entries == []
        return
    assert invoice.credited is not None and invoice.fee is not None
    assert credits == [invoice.credited]
    assert invoice.fee == half_up8(invoice.credited * invoice.terms.fee_percent / 100)
    assert fees == ([-invoice.fee] if invoice.fee > 0 else [])
    assert invoice.credited <= invoice.amount
    assert invoice.credited == invoice.credited.quantize(Decimal("0.00000001"))
    assert all(e.currency == invoice.currency and e.invoice_id == invoice.id for e in entries)
