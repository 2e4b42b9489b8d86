"""The pure invoice state machine, rule by rule (spec §2–§5).

No Redis, no clock: every test builds an invoice, applies events with explicit
times and asserts the exact new invoice and effects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal

import pytest

from tests.machine_factories import (
    AMOUNT,
    BTC_QUOTE,
    DAY,
    ETH_QUOTE,
    ETH_WINDOW,
    GRACE,
    LTC_QUOTE,
    POLICY,
    QUOTES,
    REQUIRED,
    T0,
    TIMER,
    callbacks,
    deposit_address,
    emails,
    ledger,
    mail_causes,
    make_invoice,
    new_invoice,
    run,
    tx_of,
    update,
)
from worker.domain.effects import Callback, Effect, Email, LedgerEntry, LedgerKind
from worker.domain.events import (
    CustomerConfirm,
    Event,
    MerchantCancel,
    RefundAddressSet,
    TimerFired,
)
from worker.domain.machine import (
    CANCELLED,
    FLAGGED,
    NOT_PAID,
    PROCESSING_TOO_LONG,
    TIMER_UNDERPAID,
    UNDERPAID,
    DomainError,
    InvalidChoice,
    InvalidState,
    NewInvoice,
    Policy,
    apply,
    confirmed_sum,
    create,
    deadline,
    invoice_type,
    remaining_amount,
    seen_sum,
)
from worker.domain.models import (
    Compliance,
    EmailKind,
    Invoice,
    PaymentType,
    Quote,
    Status,
    TxStatus,
)

HALF = Decimal("0.00500000")  # half of REQUIRED (BTC)
FOK = PaymentType.FILL_OR_KILL
GUE = PaymentType.GOOD_UNTIL_EXPIRED
NC = TxStatus.NOT_CONFIRMED
OK = TxStatus.CONFIRMED
DROPPED = TxStatus.CANCELLED
FLAG = Compliance.FLAGGED
PENDING_DEADLINE = T0 + TIMER + GRACE  # when a fresh invoice's timer fires


def confirmed_invoice() -> Invoice:
    """A type 2 invoice paid in full and confirmed."""
    invoice, _ = run(make_invoice(2), [update(1, REQUIRED, OK)])
    assert invoice.status is Status.CONFIRMED
    return invoice


def failed_invoice() -> Invoice:
    """A type 2 invoice whose timer ran out with nothing paid."""
    invoice, _ = run(make_invoice(2), [TimerFired(PENDING_DEADLINE)])
    assert invoice.status is Status.FAILED
    return invoice


FINAL = {"confirmed": confirmed_invoice, "failed": failed_invoice}


def step(invoice: Invoice, event: Event, policy: Policy = POLICY) -> tuple[Invoice, list[Effect]]:
    """Apply one event; the new invoice and its effects as a list."""
    transition = apply(invoice, event, policy)
    return transition.invoice, list(transition.effects)


# --------------------------------------------------------------------------- creation (§2)


@pytest.mark.parametrize(
    ("timer", "sender_currency", "expected"),
    [(False, None, 1), (False, "BTC", 1), (True, None, 2), (True, "BTC", 3)],
)
def test_invoice_type_follows_timer_and_sender_currency(
    timer: bool, sender_currency: str | None, expected: int
) -> None:
    """The type is decided by `timer` and `sender_currency` as in the table of §2."""
    assert invoice_type(timer, sender_currency) == expected


def test_type1_is_created_with_nothing_fixed_and_no_timer() -> None:
    """Type 1 starts `created`: no rate, address, amount, fixed_at or expiry yet."""
    invoice = create(new_invoice(timer=False, email="buyer@example.com"), POLICY)
    assert invoice.invoice_type == 1
    assert invoice.status is Status.CREATED
    assert invoice.fixed_at is None
    assert invoice.expires_at is None
    assert invoice.address is None
    assert invoice.sender_currency is None
    assert invoice.sender_amount is None
    assert invoice.rate is None
    assert invoice.quotes == ()
    assert invoice.email == "buyer@example.com"
    assert invoice.sequence == 0
    assert deadline(invoice, POLICY) is None


def test_type1_with_preselected_currency_waits_for_the_customer() -> None:
    """`timer: false` with `sender_currency` is type 1 with the currency preselected."""
    invoice = create(new_invoice(timer=False, sender_currency="BTC"), POLICY)
    assert invoice.invoice_type == 1
    assert invoice.status is Status.CREATED
    assert invoice.sender_currency == "BTC"
    assert invoice.sender_amount is None
    assert invoice.address is None
    assert invoice.fixed_at is None
    assert invoice.expires_at is None


def test_type2_fixes_every_quote_and_starts_the_timer_at_creation() -> None:
    """Type 2 is `pending` at once, quotes fixed, timer running, no address or amount yet."""
    invoice = create(new_invoice(), POLICY)
    assert invoice.invoice_type == 2
    assert invoice.status is Status.PENDING
    assert invoice.quotes == QUOTES
    assert invoice.fixed_at == T0
    assert invoice.expires_at == T0 + TIMER
    assert invoice.address is None
    assert invoice.sender_currency is None
    assert invoice.sender_amount is None
    assert deadline(invoice, POLICY) == PENDING_DEADLINE


def test_timer_length_comes_from_the_policy() -> None:
    """`COINVOICE_TIMER_SECONDS` (Policy.timer_seconds) sets the timer."""
    invoice = create(new_invoice(), replace(POLICY, timer_seconds=60))
    assert invoice.expires_at == T0 + 60


def test_type2_without_quotes_is_refused() -> None:
    """A timer invoice with no currency to offer cannot be created."""
    with pytest.raises(InvalidChoice):
        create(new_invoice(quotes=()), POLICY)


def test_type3_has_address_amount_and_rate_at_creation() -> None:
    """Type 3 is `pending` with its address, sender amount and rate already set."""
    invoice = create(new_invoice(sender_currency="BTC"), POLICY)
    assert invoice.invoice_type == 3
    assert invoice.status is Status.PENDING
    assert invoice.sender_currency == "BTC"
    assert invoice.sender_amount == Decimal("0.01000000")
    assert invoice.rate == Decimal("10675")
    assert invoice.address == deposit_address("BTC")
    assert invoice.fixed_at == T0
    assert invoice.expires_at == T0 + TIMER
    assert invoice.quotes == ()
    assert remaining_amount(invoice) == REQUIRED


@pytest.mark.parametrize(
    "new",
    [
        replace(new_invoice(sender_currency="BTC"), address=None),
        replace(new_invoice(sender_currency="BTC"), address=deposit_address("ETH")),
        replace(new_invoice(sender_currency="BTC"), quotes=(ETH_QUOTE,)),
    ],
    ids=["no-address", "address-in-other-currency", "no-quote-for-currency"],
)
def test_type3_needs_its_quote_and_an_address_in_that_currency(new: NewInvoice) -> None:
    """Type 3 cannot be created without the preselected currency's quote and address."""
    with pytest.raises(InvalidChoice):
        create(new, POLICY)


def test_nothing_is_required_before_a_currency_is_chosen() -> None:
    """Without a sender amount nothing is seen or remaining yet."""
    invoice = make_invoice(2, ready=False)
    assert remaining_amount(invoice) == 0
    assert seen_sum(invoice) == 0
    assert confirmed_sum(invoice) == 0


# --------------------------------------------------------------------------- customer confirm (§7)


def test_type1_confirm_fixes_rate_address_and_starts_the_timer() -> None:
    """Type 1: the confirmation fixes the rate, assigns the address and starts the timer."""
    invoice = make_invoice(1, ready=False)
    at = T0 + 500
    event = CustomerConfirm(
        at=at,
        sender_currency="ETH",
        email="buyer@example.com",
        quote=ETH_QUOTE,
        address=deposit_address("ETH"),
    )
    new, effects = step(invoice, event)
    assert new.status is Status.PENDING
    assert new.sender_currency == "ETH"
    assert new.sender_amount == Decimal("0.05000000")
    assert new.rate == Decimal("2135")
    assert new.address == deposit_address("ETH")
    assert new.fixed_at == at
    assert new.expires_at == at + TIMER
    assert new.email == "buyer@example.com"
    assert deadline(new, POLICY) == at + TIMER + GRACE
    assert new.sequence == 1
    assert effects == [Callback(1)]


def test_type1_with_preselected_currency_confirms_without_naming_it() -> None:
    """A preselected type 1 invoice needs only the customer's confirmation."""
    invoice = create(new_invoice(timer=False, sender_currency="BTC"), POLICY)
    event = CustomerConfirm(
        at=T0 + 10,
        sender_currency=None,
        email="buyer@example.com",
        quote=BTC_QUOTE,
        address=deposit_address("BTC"),
    )
    new, effects = step(invoice, event)
    assert new.status is Status.PENDING
    assert new.sender_currency == "BTC"
    assert new.sender_amount == REQUIRED
    assert new.fixed_at == T0 + 10
    assert new.expires_at == T0 + 10 + TIMER
    assert effects == [Callback(1)]


def test_type1_preselected_currency_cannot_be_changed() -> None:
    """The customer cannot pick another currency than the preselected one."""
    invoice = create(new_invoice(timer=False, sender_currency="BTC"), POLICY)
    event = CustomerConfirm(
        at=T0 + 10,
        sender_currency="ETH",
        email=None,
        quote=ETH_QUOTE,
        address=deposit_address("ETH"),
    )
    with pytest.raises(InvalidChoice, match="preselected"):
        apply(invoice, event, POLICY)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (
            CustomerConfirm(T0, None, None, BTC_QUOTE, deposit_address("BTC")),
            "Choose a payment currency.",
        ),
        (
            CustomerConfirm(T0, "ETH", None, BTC_QUOTE, deposit_address("ETH")),
            "Currency ETH is not offered for this invoice.",
        ),
        (
            CustomerConfirm(T0, "ETH", None, None, deposit_address("ETH")),
            "Currency ETH is not offered for this invoice.",
        ),
        (
            CustomerConfirm(T0, "ETH", None, ETH_QUOTE, None),
            "No deposit address for the chosen currency.",
        ),
        (
            CustomerConfirm(T0, "ETH", None, ETH_QUOTE, deposit_address("BTC")),
            "No deposit address for the chosen currency.",
        ),
    ],
    ids=["no-currency", "quote-of-other-currency", "no-quote", "no-address", "wrong-address"],
)
def test_type1_confirm_refusals(event: CustomerConfirm, message: str) -> None:
    """Type 1 refuses a confirmation without a currency, a matching quote or address."""
    with pytest.raises(InvalidChoice) as refused:
        apply(make_invoice(1, ready=False), event, POLICY)
    assert refused.value.message == message
    assert refused.value.code == "invalid_choice"


def test_type2_confirm_uses_the_creation_quote_and_assigns_the_address() -> None:
    """Type 2: the chosen currency's quote fixed at creation applies; the timer runs on."""
    invoice = make_invoice(2, ready=False)
    fresh_quote = Quote("ETH", Decimal("9"), Decimal("1"))  # must be ignored
    event = CustomerConfirm(
        T0 + 100, "ETH", "buyer@example.com", fresh_quote, deposit_address("ETH")
    )
    new, effects = step(invoice, event)
    assert new.status is Status.PENDING
    assert new.sender_currency == "ETH"
    assert new.sender_amount == ETH_QUOTE.amount
    assert new.rate == ETH_QUOTE.rate
    assert new.address == deposit_address("ETH")
    assert new.fixed_at == T0
    assert new.expires_at == T0 + TIMER
    assert new.email == "buyer@example.com"
    assert effects == [Callback(1)]


def test_type2_confirm_of_an_unoffered_currency_is_refused() -> None:
    """Type 2 offers only the currencies quoted at creation."""
    event = CustomerConfirm(T0 + 100, "LTC", None, LTC_QUOTE, deposit_address("LTC"))
    with pytest.raises(InvalidChoice, match=r"Currency LTC is not offered for this invoice\."):
        apply(make_invoice(2, ready=False), event, POLICY)


@pytest.mark.parametrize("at", [T0 + TIMER, PENDING_DEADLINE + 1])
def test_type2_confirm_after_expiry_is_refused(at: int) -> None:
    """A type 2 invoice whose timer ended cannot be confirmed any more."""
    event = CustomerConfirm(at, "BTC", None, None, deposit_address("BTC"))
    with pytest.raises(InvalidState, match=r"Invoice has expired\."):
        apply(make_invoice(2, ready=False), event, POLICY)


def test_type2_confirm_just_before_expiry_is_accepted() -> None:
    """The last second before `expires_at` is still in time."""
    event = CustomerConfirm(T0 + TIMER - 1, "BTC", None, None, deposit_address("BTC"))
    new, _ = step(make_invoice(2, ready=False), event)
    assert new.address == deposit_address("BTC")


def test_type3_confirm_only_records_the_email() -> None:
    """Type 3: confirming records the e-mail, which the merchant does not see: no callback."""
    invoice = make_invoice(3)
    for currency in ("BTC", None):
        event = CustomerConfirm(T0 + 5, currency, "new@example.com")
        new, effects = step(invoice, event)
        assert new == replace(invoice, email="new@example.com")
        assert effects == []


def test_type3_confirm_with_another_currency_is_refused() -> None:
    """Type 3's currency is fixed at creation."""
    event = CustomerConfirm(T0 + 5, "ETH", None, ETH_QUOTE, deposit_address("ETH"))
    with pytest.raises(InvalidChoice, match="already been chosen"):
        apply(make_invoice(3), event, POLICY)


def test_repeated_confirm_with_the_same_currency_changes_nothing() -> None:
    """A second identical confirmation (a double click) is a no-op."""
    invoice = make_invoice(2)
    event = CustomerConfirm(T0, "BTC", "buyer@example.com", None, deposit_address("BTC", 2))
    new, effects = step(invoice, event)
    assert new == invoice
    assert effects == []


@pytest.mark.parametrize("final", sorted(FINAL))
def test_confirm_on_a_final_invoice_is_refused(final: str) -> None:
    """A confirmed or failed invoice takes no new currency or e-mail; the same again is a no-op."""
    invoice = FINAL[final]()
    for event in (
        CustomerConfirm(T0 + 5, "ETH", "buyer@example.com"),
        CustomerConfirm(T0 + 5, "BTC", "someone-else@example.com"),
    ):
        with pytest.raises(InvalidState) as refused:
            apply(invoice, event, POLICY)
        assert refused.value.message == "Invoice cannot be confirmed in its current state."
    assert step(invoice, CustomerConfirm(T0 + 5, "BTC", "buyer@example.com")) == (invoice, [])


def test_a_final_invoice_without_email_takes_one() -> None:
    """A type 3 invoice paid (and failed) before the customer gave an e-mail still records it."""
    invoice = make_invoice(3)
    assert invoice.email is None
    failed, _ = run(invoice, [MerchantCancel(T0 + 5)])
    new, effects = step(failed, CustomerConfirm(T0 + 9, None, "late@example.com"))
    assert new == replace(failed, email="late@example.com")
    assert effects == []
    with pytest.raises(InvalidState):
        apply(new, CustomerConfirm(T0 + 10, None, "other@example.com"), POLICY)


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_the_email_given_at_confirmation_is_fixed(kind: int) -> None:
    """Once confirmed, another e-mail is refused: the invoice link cannot redirect refund mail."""
    invoice = make_invoice(kind)
    if kind == 3:
        invoice, _ = step(invoice, CustomerConfirm(T0 + 5, None, "buyer@example.com"))
    assert invoice.email == "buyer@example.com"
    with pytest.raises(InvalidChoice) as refused:
        apply(invoice, CustomerConfirm(T0 + 6, None, "thief@example.com"), POLICY)
    assert refused.value.message == "The e-mail address has already been given."
    assert step(invoice, CustomerConfirm(T0 + 7, None, "buyer@example.com")) == (invoice, [])


# --------------------------------------------------------------------------- merchant cancel (§6)


def _created() -> Invoice:
    return make_invoice(1, ready=False)


def _pending() -> Invoice:
    return make_invoice(2)


def _pending_part_paid() -> Invoice:
    return run(make_invoice(2), [update(1, HALF)])[0]


def _processing() -> Invoice:
    return run(make_invoice(2), [update(1, REQUIRED)])[0]


@pytest.mark.parametrize(
    ("start", "status", "received"),
    [
        (_created, Status.CREATED, None),
        (_pending, Status.PENDING, None),
        (_pending_part_paid, Status.PENDING, HALF),
        (_processing, Status.PROCESSING, REQUIRED),
    ],
    ids=["created", "pending", "pending-part-paid", "processing"],
)
def test_merchant_cancel_fails_a_live_invoice(
    start: Callable[[], Invoice], status: Status, received: Decimal | None
) -> None:
    """Cancel fails a live invoice; a refund claim goes out only when something was paid."""
    invoice = start()
    assert invoice.status is status
    new, effects = step(invoice, MerchantCancel(T0 + 120))
    assert new.status is Status.FAILED
    assert new.error == "Cancelled by customer"
    assert new.sequence == invoice.sequence + 1
    assert callbacks(effects) == [Callback(new.sequence)]
    if received is None:
        assert emails(effects) == []
    else:
        assert emails(effects) == [
            Email(EmailKind.REFUND_CLAIM, "cancel", "BTC", REQUIRED, received)
        ]
    assert ledger(effects) == []


@pytest.mark.parametrize("final", sorted(FINAL))
def test_merchant_cancel_of_a_final_invoice_is_refused(final: str) -> None:
    """Cancel in `confirmed`/`failed` is refused with the API's exact message."""
    with pytest.raises(InvalidState) as refused:
        apply(FINAL[final](), MerchantCancel(T0 + 120), POLICY)
    assert refused.value.message == "Invoice cannot be failed in its current state."
    assert refused.value.code == "invalid_invoice_state"


# --------------------------------------------------------------------------- failures (§5)


def _timer_nothing_paid() -> tuple[Invoice, list[Event]]:
    return make_invoice(2), [TimerFired(PENDING_DEADLINE)]


def _processing_too_long() -> tuple[Invoice, list[Event]]:
    return make_invoice(2), [update(1, REQUIRED, at=T0 + 60), TimerFired(T0 + 60 + DAY + GRACE)]


def _timer_underpaid() -> tuple[Invoice, list[Event]]:
    return make_invoice(2), [update(1, HALF), TimerFired(PENDING_DEADLINE)]


def _timer_underpaid_instalments() -> tuple[Invoice, list[Event]]:
    return make_invoice(2, payment_type=GUE), [update(1, HALF, OK), TimerFired(PENDING_DEADLINE)]


def _fill_or_kill_underpaid() -> tuple[Invoice, list[Event]]:
    return make_invoice(2), [update(1, HALF, OK)]


def _flagged_pending() -> tuple[Invoice, list[Event]]:
    return make_invoice(2), [update(1, HALF, compliance=FLAG)]


def _flagged_processing() -> tuple[Invoice, list[Event]]:
    return make_invoice(2), [update(1, REQUIRED), update(1, REQUIRED, compliance=FLAG, at=T0 + 90)]


def _cancel_paid() -> tuple[Invoice, list[Event]]:
    return make_invoice(2), [update(1, HALF), MerchantCancel(T0 + 120)]


def _cancel_unpaid() -> tuple[Invoice, list[Event]]:
    return make_invoice(2), [MerchantCancel(T0 + 120)]


@pytest.mark.parametrize(
    ("scenario", "error", "mail"),
    [
        (_timer_nothing_paid, "Timer expired. User not paid.", None),
        (
            _processing_too_long,
            "Timer expired. Transactions were in status processing too long.",
            (EmailKind.REFUND_CLAIM, "processing_too_long"),
        ),
        (
            _timer_underpaid,
            "Timer expired. User paid less than requested.",
            (EmailKind.PAYBACK_GUIDELINE, "timer_underpaid"),
        ),
        (
            _timer_underpaid_instalments,
            "Timer expired. User paid less than requested.",
            (EmailKind.PAYBACK_GUIDELINE, "timer_underpaid"),
        ),
        (
            _fill_or_kill_underpaid,
            "User paid less than requested.",
            (EmailKind.PAYBACK_GUIDELINE, "underpaid"),
        ),
        (
            _flagged_pending,
            "Transaction flagged by compliance.",
            (EmailKind.REFUND_CLAIM, "compliance"),
        ),
        (
            _flagged_processing,
            "Transaction flagged by compliance.",
            (EmailKind.REFUND_CLAIM, "compliance"),
        ),
        (_cancel_paid, "Cancelled by customer", (EmailKind.REFUND_CLAIM, "cancel")),
        (_cancel_unpaid, "Cancelled by customer", None),
    ],
    ids=[
        "timer-nothing-paid",
        "processing-too-long",
        "timer-underpaid",
        "timer-underpaid-instalments",
        "fill-or-kill-underpaid",
        "flagged-while-pending",
        "flagged-while-processing",
        "cancel-after-payment",
        "cancel-unpaid",
    ],
)
def test_every_failure_reason_has_its_error_text_and_email(
    scenario: Callable[[], tuple[Invoice, list[Event]]],
    error: str,
    mail: tuple[EmailKind, str] | None,
) -> None:
    """Each §5 cause fails the invoice with its exact error, one callback and its e-mail."""
    invoice, events = scenario()
    invoice, _ = run(invoice, events[:-1])
    new, effects = step(invoice, events[-1])
    assert new.status is Status.FAILED
    assert new.error == error
    assert callbacks(effects) == [Callback(invoice.sequence + 1)]
    assert new.sequence == invoice.sequence + 1
    expected_mail = [] if mail is None else [mail]
    assert [(e.kind, e.cause) for e in emails(effects)] == expected_mail
    assert ledger(effects) == []
    assert new.credited is None
    assert new.fee is None


def test_failure_texts_are_the_spec_table() -> None:
    """The module constants are §5's texts verbatim."""
    assert NOT_PAID == "Timer expired. User not paid."
    assert PROCESSING_TOO_LONG == "Timer expired. Transactions were in status processing too long."
    assert TIMER_UNDERPAID == "Timer expired. User paid less than requested."
    assert UNDERPAID == "User paid less than requested."
    assert FLAGGED == "Transaction flagged by compliance."
    assert CANCELLED == "Cancelled by customer"


def test_payback_guideline_names_expected_and_received_amounts() -> None:
    """The underpayment e-mail carries the required and the paid amount in the sender currency."""
    _, effects = run(*_timer_underpaid())
    assert emails(effects) == [
        Email(EmailKind.PAYBACK_GUIDELINE, "timer_underpaid", "BTC", REQUIRED, HALF)
    ]


# --------------------------------------------------------------------------- payments (§4)


@pytest.mark.parametrize("payment_type", [FOK, GUE])
def test_a_seen_part_keeps_the_invoice_pending_and_lowers_remaining(
    payment_type: PaymentType,
) -> None:
    """A seen payment below the amount: still pending, remaining drops, one callback."""
    invoice = make_invoice(2, payment_type=payment_type)
    new, effects = step(invoice, update(1, Decimal("0.00300000")))
    assert new.status is Status.PENDING
    assert remaining_amount(new) == Decimal("0.00700000")
    assert new.expires_at == T0 + TIMER
    assert effects == [Callback(invoice.sequence + 1)]


def test_instalments_accept_several_parts_with_a_callback_each() -> None:
    """good_until_expired: parts add up, remaining drops, every part is a callback."""
    invoice = make_invoice(2, payment_type=GUE)
    parts = [
        (1, Decimal("0.00300000"), T0 + 60, Decimal("0.00700000")),
        (2, Decimal("0.00300000"), T0 + 120, Decimal("0.00400000")),
        (3, Decimal("0.00400000"), T0 + 180, Decimal("0")),
    ]
    for tx_id, amount, at, remaining in parts:
        sequence = invoice.sequence
        invoice, effects = step(invoice, update(tx_id, amount, OK, at=at))
        assert remaining_amount(invoice) == remaining
        assert callbacks(effects) == [Callback(sequence + 1)]
        assert emails(effects) == []
    assert invoice.status is Status.CONFIRMED
    assert invoice.credited == AMOUNT
    assert confirmed_sum(invoice) == REQUIRED


def test_instalments_move_to_processing_when_the_parts_cover_the_amount() -> None:
    """good_until_expired: the part that completes the amount starts `processing`."""
    invoice = make_invoice(2, payment_type=GUE)
    invoice, _ = run(invoice, [update(1, HALF, OK, at=T0 + 60), update(2, HALF, at=T0 + 300)])
    assert invoice.status is Status.PROCESSING
    assert invoice.expires_at == T0 + 300 + DAY


def test_good_until_expired_waits_after_a_confirmed_part() -> None:
    """good_until_expired: a confirmed part below the amount does not fail the invoice."""
    invoice, effects = run(make_invoice(2, payment_type=GUE), [update(1, HALF, OK)])
    assert invoice.status is Status.PENDING
    assert emails(effects) == []


def test_fill_or_kill_underpayment_fails_at_once() -> None:
    """fill_or_kill: a confirmed payment short of the amount with nothing in flight fails."""
    invoice, effects = run(make_invoice(2), [update(1, HALF, OK)])
    assert invoice.status is Status.FAILED
    assert invoice.error == UNDERPAID
    assert emails(effects) == [
        Email(EmailKind.PAYBACK_GUIDELINE, "underpaid", "BTC", REQUIRED, HALF)
    ]


def test_fill_or_kill_waits_while_another_payment_is_in_flight() -> None:
    """fill_or_kill: a short confirmed payment waits while another one is still in flight."""
    quarter = Decimal("0.00250000")
    invoice, effects = run(make_invoice(2), [update(1, HALF), update(2, quarter)])
    invoice, effects = step(invoice, update(1, HALF, OK))
    assert invoice.status is Status.PENDING
    assert emails(effects) == []
    invoice, effects = step(invoice, update(2, quarter, DROPPED))
    assert invoice.status is Status.FAILED
    assert invoice.error == UNDERPAID
    assert mail_causes(effects) == {("payback_guideline", "underpaid")}


def test_fill_or_kill_completed_by_a_second_payment_confirms() -> None:
    """fill_or_kill: two payments that together cover the amount confirm the invoice."""
    events = [update(1, HALF), update(2, HALF), update(1, HALF, OK), update(2, HALF, OK)]
    invoice, effects = run(make_invoice(2), events)
    assert invoice.status is Status.CONFIRMED
    assert invoice.credited == AMOUNT
    assert emails(effects) == []


def test_covering_payment_starts_processing_with_the_window_from_observed_at() -> None:
    """Seen sum covers the amount: `processing`, timer extended to observed_at + 24 h."""
    invoice = make_invoice(2)
    new, effects = step(invoice, update(1, REQUIRED, at=T0 + 60))
    assert new.status is Status.PROCESSING
    assert new.expires_at == T0 + 60 + DAY
    assert deadline(new, POLICY) == T0 + 60 + DAY + GRACE
    assert remaining_amount(new) == 0
    assert effects == [Callback(invoice.sequence + 1)]


@pytest.mark.parametrize(
    ("currency", "default", "window"),
    [("BTC", DAY, DAY), ("ETH", DAY, ETH_WINDOW), ("LTC", 7_200, 7_200)],
    ids=["default", "per-currency-override", "configured-default"],
)
def test_processing_window_is_per_currency(currency: str, default: int, window: int) -> None:
    """Policy.processing_windows overrides the default window for one currency."""
    policy = replace(POLICY, processing_window_seconds=default)
    invoice = make_invoice(3, currency=currency, policy=policy)
    amount = invoice.sender_amount
    assert amount is not None
    new, _ = step(invoice, update(1, amount, at=T0 + 60, currency=currency), policy)
    assert new.status is Status.PROCESSING
    assert new.expires_at == T0 + 60 + window


def test_processing_window_follows_the_earliest_observation() -> None:
    """The window starts at the first observation, whichever update arrives first."""
    invoice, _ = run(make_invoice(2), [update(1, REQUIRED, at=T0 + 400)])
    assert invoice.expires_at == T0 + 400 + DAY
    new, effects = step(invoice, update(1, REQUIRED, at=T0 + 100))
    assert new.expires_at == T0 + 100 + DAY
    assert tx_of(new, 1).first_observed_at == T0 + 100
    assert effects == [Callback(invoice.sequence + 1)]


def test_processing_never_goes_back_to_pending() -> None:
    """A dropped payment lowers `seen` but a processing invoice stays processing."""
    invoice, _ = run(make_invoice(2), [update(1, REQUIRED)])
    new, effects = step(invoice, update(1, REQUIRED, DROPPED, at=T0 + 200))
    assert new.status is Status.PROCESSING
    assert remaining_amount(new) == REQUIRED
    assert tx_of(new, 1).status is DROPPED
    assert effects == [Callback(invoice.sequence + 1)]


def test_a_drop_arriving_before_its_sighting_still_means_processing() -> None:
    """A covering payment seen then dropped is `processing` whichever update came first."""
    seen, drop = update(1, REQUIRED, at=T0 + 100), update(1, REQUIRED, DROPPED, at=T0 + 200)
    natural, _ = run(make_invoice(2), [seen, drop])
    reversed_, _ = run(make_invoice(2), [drop, seen])
    assert natural.status is reversed_.status is Status.PROCESSING
    assert natural.expires_at == reversed_.expires_at == T0 + 100 + DAY
    assert replace(reversed_, sequence=0) == replace(natural, sequence=0)


def test_a_drop_alone_never_meant_processing() -> None:
    """A payment only ever reported dropped was never seen covering: still pending."""
    invoice, _ = run(make_invoice(2), [update(1, REQUIRED, DROPPED, at=T0 + 200)])
    assert invoice.status is Status.PENDING
    assert invoice.expires_at == T0 + TIMER


def test_the_window_restarts_when_a_replacement_payment_covers_again() -> None:
    """After the covering payment dropped, the window runs from the replacement's sighting."""
    invoice, _ = run(
        make_invoice(2),
        [update(1, REQUIRED, at=T0 + 100), update(1, REQUIRED, DROPPED, at=T0 + 200)],
    )
    assert invoice.expires_at == T0 + 100 + DAY
    invoice, _ = step(invoice, update(2, REQUIRED, at=T0 + 300))
    assert invoice.expires_at == T0 + 300 + DAY
    invoice, _ = step(invoice, update(2, REQUIRED, DROPPED, at=T0 + 400))
    assert invoice.status is Status.PROCESSING
    assert invoice.expires_at == T0 + 300 + DAY


def test_an_update_that_ends_the_window_before_it_was_observed_expires_the_invoice() -> None:
    """A resurrected payment moving the window's start back fails the invoice once, not twice."""
    eth = ETH_QUOTE.amount
    events: list[Event] = [
        update(1, eth / 2, at=T0 + 10, currency="ETH"),
        update(1, eth / 2, DROPPED, at=T0 + 15, currency="ETH"),
        update(2, eth / 2, at=T0 + 20, currency="ETH"),
        update(3, eth, at=T0 + 500, currency="ETH"),
    ]
    invoice, _ = run(make_invoice(2, currency="ETH"), events)
    assert invoice.expires_at == T0 + 500 + ETH_WINDOW
    # Payment 1 confirms after all: seen since T0 + 10, so the window ran from T0 + 20.
    resurrected = update(1, eth / 2, OK, at=T0 + 3_700, currency="ETH")
    new, effects = step(invoice, resurrected)
    assert new.expires_at == T0 + 20 + ETH_WINDOW
    assert new.status is Status.FAILED
    assert new.error == PROCESSING_TOO_LONG
    assert mail_causes(effects) == {("refund_claim", "processing_too_long")}
    assert callbacks(effects) == [Callback(invoice.sequence + 1)]
    again, effects = step(new, resurrected)
    assert again == new
    assert effects == []


def test_a_dropped_transaction_no_longer_counts_as_seen() -> None:
    """A cancelled transaction leaves `seen`: remaining_amount rises again, with a callback."""
    invoice, _ = run(make_invoice(2, payment_type=GUE), [update(1, HALF)])
    assert remaining_amount(invoice) == HALF
    new, effects = step(invoice, update(1, HALF, DROPPED, at=T0 + 200))
    assert new.status is Status.PENDING
    assert seen_sum(new) == 0
    assert remaining_amount(new) == REQUIRED
    assert effects == [Callback(invoice.sequence + 1)]


def test_more_confirmations_while_processing_are_a_callback() -> None:
    """A transaction's confirmations are visible: each new count is a callback."""
    invoice, _ = run(make_invoice(2), [update(1, REQUIRED)])
    new, effects = step(invoice, update(1, REQUIRED, confirmations=1, at=T0 + 200))
    assert new.status is Status.PROCESSING
    assert tx_of(new, 1).confirmations == 1
    assert effects == [Callback(invoice.sequence + 1)]


# --------------------------------------------------------------------------- confirmation and money


def test_confirmed_payment_credits_the_amount_and_charges_the_fee() -> None:
    """Confirmed sum covers the amount: `confirmed`, invoice amount credited, 1% fee charged."""
    invoice, _ = run(make_invoice(2), [update(1, REQUIRED)])
    new, effects = step(invoice, update(1, REQUIRED, OK, at=T0 + 600))
    assert new.status is Status.CONFIRMED
    assert new.error == ""
    assert new.credited == Decimal("106.75")
    assert new.fee == Decimal("1.06750000")
    assert effects == [
        LedgerEntry("mkey", "EUR", Decimal("106.75"), LedgerKind.CREDIT, 7),
        LedgerEntry("mkey", "EUR", Decimal("-1.06750000"), LedgerKind.FEE, 7),
        Callback(invoice.sequence + 1),
    ]
    assert new.expires_at == T0 + 60 + DAY


def test_a_confirmed_payment_can_confirm_straight_from_pending() -> None:
    """pending → confirmed without a mempool sighting first."""
    invoice, effects = run(make_invoice(2), [update(1, REQUIRED, OK, at=T0 + 60)])
    assert invoice.status is Status.CONFIRMED
    assert invoice.credited == AMOUNT
    assert len(ledger(effects)) == 2


def test_fee_percent_comes_from_the_terms() -> None:
    """The merchant's fee percent applies (2.5% of 106.75 = 2.66875)."""
    invoice, effects = run(make_invoice(2, fee_percent=Decimal("2.5")), [update(1, REQUIRED, OK)])
    assert invoice.fee == Decimal("2.66875000")
    assert ledger(effects)[1].amount == Decimal("-2.66875000")


def test_fee_rounds_half_up_at_8_decimals() -> None:
    """1% of 100.00000250 is 1.0000000250: half-up gives 1.00000003 (not 1.00000002)."""
    invoice = make_invoice(2, amount=Decimal("100.00000250"))
    invoice, effects = run(invoice, [update(1, REQUIRED, OK)])
    assert invoice.credited == Decimal("100.00000250")
    assert invoice.fee == Decimal("1.00000003")
    assert [e.amount for e in ledger(effects)] == [Decimal("100.00000250"), Decimal("-1.00000003")]


def test_zero_fee_writes_only_the_credit() -> None:
    """A merchant without a fee gets the credit entry alone."""
    invoice, effects = run(make_invoice(2, fee_percent=Decimal(0)), [update(1, REQUIRED, OK)])
    assert invoice.fee == 0
    assert ledger(effects) == [LedgerEntry("mkey", "EUR", AMOUNT, LedgerKind.CREDIT, 7)]


def _tolerant_invoice() -> Invoice:
    """Type 3, 100 EUR for 0.03 BTC, 1% underpayment tolerance (accepts from 0.0297 BTC)."""
    new = new_invoice(
        sender_currency="BTC",
        amount=Decimal(100),
        quotes=(Quote("BTC", Decimal("0.03000000"), Decimal("3333.33333333")),),
    )
    terms = replace(new.terms, underpayment_tolerance_percent=Decimal(1))
    return create(replace(new, terms=terms), POLICY)


def test_underpayment_within_tolerance_confirms_with_a_credit_rounded_down() -> None:
    """Within the tolerance: `confirmed`, credit = amount × paid / required rounded down."""
    paid = Decimal("0.02999999")
    invoice, effects = run(_tolerant_invoice(), [update(1, paid), update(1, paid, OK)])
    assert invoice.status is Status.CONFIRMED
    # 100 × 0.02999999 / 0.03 = 99.99996666…, rounded down (half-up would give …67).
    assert invoice.credited == Decimal("99.99996666")
    assert invoice.fee == Decimal("0.99999967")
    assert [e.amount for e in ledger(effects)] == [Decimal("99.99996666"), Decimal("-0.99999967")]
    assert emails(effects) == []


def test_tolerance_threshold_is_inclusive_and_moves_processing_too() -> None:
    """Exactly required − tolerance covers: processing when seen, confirmed when confirmed."""
    threshold = Decimal("0.02970000")
    invoice, _ = run(_tolerant_invoice(), [update(1, threshold)])
    assert invoice.status is Status.PROCESSING
    invoice, _ = step(invoice, update(1, threshold, OK))
    assert invoice.status is Status.CONFIRMED
    assert invoice.credited == Decimal("99.00000000")


def test_underpayment_beyond_tolerance_fails_fill_or_kill() -> None:
    """One satoshi below the tolerance threshold is an underpayment."""
    invoice, _ = run(_tolerant_invoice(), [update(1, Decimal("0.02969999"), OK)])
    assert invoice.status is Status.FAILED
    assert invoice.error == UNDERPAID


def test_overpayment_confirms_and_sends_a_payback_guideline() -> None:
    """Overpaid: confirmed, credit capped at the invoice amount, payback guideline `overpaid`."""
    paid = Decimal("0.01500000")
    invoice, effects = run(make_invoice(2), [update(1, paid, OK)])
    assert invoice.status is Status.CONFIRMED
    assert invoice.credited == AMOUNT
    assert invoice.fee == Decimal("1.06750000")
    assert emails(effects) == [
        Email(EmailKind.PAYBACK_GUIDELINE, "overpaid", "BTC", REQUIRED, paid)
    ]
    assert len(ledger(effects)) == 2


def test_overpayment_confirmed_after_the_invoice_mails_once() -> None:
    """An in-time extra payment confirmed after the invoice is mailed about once."""
    extra = Decimal("0.00100000")
    events = [update(1, REQUIRED), update(2, extra), update(3, extra), update(1, REQUIRED, OK)]
    invoice, effects = run(make_invoice(2, payment_type=GUE), events)
    assert invoice.status is Status.CONFIRMED
    assert emails(effects) == []
    invoice, effects = step(invoice, update(2, extra, OK, at=T0 + 300))
    assert invoice.status is Status.CONFIRMED
    assert invoice.credited == AMOUNT
    assert mail_causes(effects) == {("payback_guideline", "overpaid")}
    assert ledger(effects) == []
    invoice, effects = step(invoice, update(3, extra, OK, at=T0 + 300))
    assert emails(effects) == []
    assert callbacks(effects) == [Callback(invoice.sequence)]


def test_ledger_entries_are_written_exactly_once() -> None:
    """Credit and fee are booked once, however many updates follow the confirmation."""
    invoice = make_invoice(2)
    events: list[Event] = [
        update(1, REQUIRED),
        update(1, REQUIRED, OK, confirmations=1, at=T0 + 100),
        update(1, REQUIRED, OK, confirmations=1, at=T0 + 100),
        update(1, REQUIRED, OK, confirmations=6, at=T0 + 900),
        update(1, REQUIRED, at=T0 + 50),
        TimerFired(T0 + 10 * DAY),
    ]
    invoice, effects = run(invoice, events)
    assert ledger(effects) == [
        LedgerEntry("mkey", "EUR", AMOUNT, LedgerKind.CREDIT, 7),
        LedgerEntry("mkey", "EUR", Decimal("-1.06750000"), LedgerKind.FEE, 7),
    ]
    assert invoice.status is Status.CONFIRMED


# --------------------------------------------------------------------------- compliance


def test_compliance_flag_after_confirmation_is_recorded_without_changing_status() -> None:
    """A flag on a confirmed invoice is recorded and reported; status, credit and fee stay."""
    invoice = confirmed_invoice()
    new, effects = step(invoice, update(1, REQUIRED, OK, compliance=FLAG, at=T0 + 500))
    assert new.status is Status.CONFIRMED
    assert new.error == ""
    assert (new.credited, new.fee) == (invoice.credited, invoice.fee)
    assert tx_of(new, 1).compliance is FLAG
    assert effects == [Callback(invoice.sequence + 1)]


def test_compliance_flag_is_sticky() -> None:
    """A later `clear` never clears a flag."""
    invoice, _ = run(make_invoice(2), [update(1, HALF, compliance=FLAG)])
    new, effects = step(invoice, update(1, HALF, confirmations=2, at=T0 + 300))
    assert tx_of(new, 1).compliance is FLAG
    assert tx_of(new, 1).confirmations == 2
    assert new.status is Status.FAILED
    assert emails(effects) == []


def test_a_flag_arriving_before_the_sighting_keeps_the_window() -> None:
    """Flag or sighting first: the same failed invoice, keeping the window the payment earned."""
    seen, flagged = (
        update(1, REQUIRED, at=T0 + 100),
        update(1, REQUIRED, compliance=FLAG, at=T0 + 200),
    )
    natural, natural_effects = run(make_invoice(2), [seen, flagged])
    reversed_, reversed_effects = run(make_invoice(2), [flagged, seen])
    assert natural.error == reversed_.error == FLAGGED
    assert natural.expires_at == reversed_.expires_at == T0 + 100 + DAY
    assert replace(reversed_, sequence=0) == replace(natural, sequence=0)
    assert mail_causes(natural_effects) == mail_causes(reversed_effects)


def test_a_flag_on_a_part_fails_without_a_window() -> None:
    """A flagged payment that does not cover the amount leaves the 15-minute expiry."""
    invoice, _ = run(make_invoice(2), [update(1, HALF, compliance=FLAG)])
    assert invoice.status is Status.FAILED
    assert invoice.expires_at == T0 + TIMER


def test_flagged_refund_claim_names_the_full_payment() -> None:
    """The compliance refund claim asks for the full amount received back."""
    _, effects = run(*_flagged_processing())
    assert emails(effects) == [
        Email(EmailKind.REFUND_CLAIM, "compliance", "BTC", REQUIRED, REQUIRED)
    ]


# --------------------------------------------------------------------------- transactions merge


def test_transaction_updates_merge_monotonically() -> None:
    """Confirmations never go down and `not_confirmed` < `cancelled` < `confirmed`."""
    invoice, _ = run(
        make_invoice(2, payment_type=GUE),
        [
            update(1, HALF, confirmations=5, at=T0 + 300),
            update(1, HALF, confirmations=2, at=T0 + 200),
            update(1, HALF, DROPPED, at=T0 + 400),
            update(1, HALF, NC, at=T0 + 500),
        ],
    )
    tx = invoice.tx(1)
    assert tx is not None
    assert (tx.status, tx.confirmations) == (DROPPED, 5)
    assert (tx.first_observed_at, tx.observed_at) == (T0 + 200, T0 + 500)
    invoice, _ = step(invoice, update(1, HALF, OK, confirmations=1, at=T0 + 600))
    assert tx_of(invoice, 1).status is OK


def test_amount_and_txid_stay_as_first_recorded() -> None:
    """A transaction's identifying fields never change after its first update."""
    invoice, _ = run(make_invoice(2, payment_type=GUE), [update(1, HALF)])
    new, _ = step(invoice, update(1, REQUIRED, confirmations=1, txid="other", at=T0 + 90))
    tx = new.tx(1)
    assert tx is not None
    assert (tx.amount, tx.txid, tx.confirmations) == (HALF, "hash-1", 1)
    assert new.status is Status.PENDING


def test_transactions_are_kept_sorted_by_id() -> None:
    """The stored order does not depend on arrival order."""
    quarter = Decimal("0.00250000")
    invoice, _ = run(make_invoice(2, payment_type=GUE), [update(5, quarter), update(2, quarter)])
    assert [t.id for t in invoice.transactions] == [2, 5]


# --------------------------------------------------------------------------- late payments


def test_late_payment_to_a_failed_invoice_is_recorded_and_mailed_when_confirmed() -> None:
    """A new payment to a failed invoice: recorded, reported, payback guideline on confirmation."""
    invoice = failed_invoice()
    late_at = T0 + 2_000
    invoice, effects = step(invoice, update(9, REQUIRED, at=late_at))
    assert invoice.status is Status.FAILED
    assert invoice.error == NOT_PAID
    tx = invoice.tx(9)
    assert tx is not None and tx.late
    assert effects == [Callback(invoice.sequence)]
    invoice, effects = step(invoice, update(9, REQUIRED, OK, at=late_at + 600))
    assert invoice.status is Status.FAILED
    assert effects == [
        Email(EmailKind.PAYBACK_GUIDELINE, "late:9", "BTC", REQUIRED, REQUIRED),
        Callback(invoice.sequence),
    ]
    again, effects = step(invoice, update(9, REQUIRED, OK, at=late_at + 600))
    assert again == invoice
    assert effects == []


def test_late_payment_to_a_confirmed_invoice_books_nothing() -> None:
    """A late payment to a confirmed invoice changes neither status nor credit, and is mailed."""
    invoice = confirmed_invoice()
    new, effects = step(invoice, update(2, HALF, OK, at=T0 + 5_000))
    assert new.status is Status.CONFIRMED
    assert (new.credited, new.fee) == (invoice.credited, invoice.fee)
    assert tx_of(new, 2).late
    assert mail_causes(effects) == {("payback_guideline", "late:2")}
    assert ledger(effects) == []
    assert callbacks(effects) == [Callback(invoice.sequence + 1)]


def test_each_late_transaction_gets_its_own_payback_guideline() -> None:
    """The late-payment e-mail is once per transaction."""
    invoice = failed_invoice()
    _, effects = run(
        invoice,
        [
            update(2, HALF, OK, at=T0 + 2_000),
            update(3, HALF, OK, at=T0 + 2_100),
            update(2, HALF, OK, confirmations=9, at=T0 + 2_200),
        ],
    )
    assert [e.cause for e in emails(effects)] == ["late:2", "late:3"]


def test_a_dropped_late_payment_is_not_mailed() -> None:
    """A late payment that never confirms sends no payback guideline."""
    _, effects = run(
        failed_invoice(), [update(2, HALF, at=T0 + 2_000), update(2, HALF, DROPPED, at=T0 + 2_100)]
    )
    assert emails(effects) == []
    assert len(callbacks(effects)) == 2


def test_in_time_payment_confirmed_after_failure_is_recorded_only() -> None:
    """A payment in flight when the timer ended is recorded when it confirms; status stays."""
    invoice, _ = run(make_invoice(2), [update(1, HALF), TimerFired(PENDING_DEADLINE)])
    assert invoice.error == TIMER_UNDERPAID
    new, effects = step(invoice, update(1, HALF, OK, at=PENDING_DEADLINE + 60))
    assert new.status is Status.FAILED
    assert new.error == TIMER_UNDERPAID
    assert not tx_of(new, 1).late
    assert effects == [Callback(invoice.sequence + 1)]


# --------------------------------------------------------------------------- time


def test_update_observed_at_expiry_expires_the_invoice_first() -> None:
    """A payment observed at `expires_at` is late: the invoice fails first, in one callback."""
    invoice = make_invoice(2)
    new, effects = step(invoice, update(1, REQUIRED, at=T0 + TIMER))
    assert new.status is Status.FAILED
    assert new.error == NOT_PAID
    assert tx_of(new, 1).late
    assert effects == [Callback(invoice.sequence + 1)]


def test_update_observed_before_expiry_counts_in_time() -> None:
    """Observed one second before `expires_at`: in time, whenever it is applied."""
    new, _ = step(make_invoice(2), update(1, REQUIRED, at=T0 + TIMER - 1))
    assert new.status is Status.PROCESSING
    assert new.expires_at == T0 + TIMER - 1 + DAY


def test_late_update_of_a_partly_paid_invoice_fails_it_as_underpaid_first() -> None:
    """A part observed after expiry: timer underpayment first, then the part is a late payment."""
    invoice, _ = run(make_invoice(2, payment_type=GUE), [update(1, HALF)])
    new, effects = step(invoice, update(2, HALF, OK, at=T0 + TIMER + 5))
    assert new.status is Status.FAILED
    assert new.error == TIMER_UNDERPAID
    assert tx_of(new, 2).late
    assert [e.cause for e in emails(effects)] == ["timer_underpaid", "late:2"]
    assert callbacks(effects) == [Callback(invoice.sequence + 1)]


def test_update_after_the_processing_window_fails_processing_too_long() -> None:
    """A confirmation observed after the window ended comes too late to confirm."""
    invoice, _ = run(make_invoice(2), [update(1, REQUIRED, at=T0 + 60)])
    new, effects = step(invoice, update(1, REQUIRED, OK, at=T0 + 60 + DAY))
    assert new.status is Status.FAILED
    assert new.error == PROCESSING_TOO_LONG
    assert tx_of(new, 1).status is OK
    assert mail_causes(effects) == {("refund_claim", "processing_too_long")}
    assert ledger(effects) == []


@pytest.mark.parametrize(
    ("start", "at"),
    [
        (_pending, T0 + TIMER),
        (_pending, PENDING_DEADLINE - 1),
        (_processing, PENDING_DEADLINE),
        (_processing, T0 + 60 + DAY + GRACE - 1),
    ],
    ids=["pending-at-expiry", "pending-in-grace", "processing-old-deadline", "processing-in-grace"],
)
def test_an_early_timer_is_a_noop(start: Callable[[], Invoice], at: int) -> None:
    """A timer before expires_at + grace (or a stale one) changes nothing."""
    invoice = start()
    new, effects = step(invoice, TimerFired(at))
    assert new == invoice
    assert effects == []


def test_the_timer_fires_at_expiry_plus_grace() -> None:
    """At `expires_at` + grace the timer fails the invoice."""
    invoice = make_invoice(2)
    new, effects = step(invoice, TimerFired(PENDING_DEADLINE))
    assert new.status is Status.FAILED
    assert effects == [Callback(invoice.sequence + 1)]


def test_grace_comes_from_the_policy() -> None:
    """With no grace the timer fires exactly at `expires_at`."""
    policy = replace(POLICY, grace_seconds=0)
    new, _ = step(make_invoice(2), TimerFired(T0 + TIMER), policy)
    assert new.status is Status.FAILED


@pytest.mark.parametrize("start", [confirmed_invoice, failed_invoice, _created])
def test_a_timer_on_an_invoice_without_one_is_a_noop(start: Callable[[], Invoice]) -> None:
    """Final invoices and type 1 before confirmation have no timer."""
    invoice = start()
    new, effects = step(invoice, TimerFired(T0 + 100 * DAY))
    assert new == invoice
    assert effects == []


# --------------------------------------------------------------------------- refund address (§7)


@pytest.mark.parametrize("start", [_pending_part_paid, failed_invoice])
def test_refund_address_is_stored_and_reported(start: Callable[[], Invoice]) -> None:
    """The refund address is stored and shown to the merchant in a callback."""
    invoice = start()
    new, effects = step(invoice, RefundAddressSet(T0 + 300, "bc1qrefund"))
    assert new.refund_address == "bc1qrefund"
    assert new.status is invoice.status
    assert effects == [Callback(invoice.sequence + 1)]


def test_the_same_refund_address_again_is_a_noop() -> None:
    """Submitting the stored address again changes nothing."""
    invoice, _ = run(failed_invoice(), [RefundAddressSet(T0 + 300, "bc1qrefund")])
    new, effects = step(invoice, RefundAddressSet(T0 + 400, "bc1qrefund"))
    assert new == invoice
    assert effects == []


def test_a_different_refund_address_is_refused() -> None:
    """The refund address is stored once; another one is refused."""
    invoice, _ = run(failed_invoice(), [RefundAddressSet(T0 + 300, "bc1qrefund")])
    with pytest.raises(InvalidChoice) as refused:
        apply(invoice, RefundAddressSet(T0 + 400, "bc1qother"), POLICY)
    assert refused.value.code == "invalid_choice"


# ------------------------------------------------------------------- sequence and callbacks (§9)


def test_sequence_grows_by_one_per_visible_change_with_one_callback() -> None:
    """Every merchant-visible change is sequence + 1 and exactly one Callback."""
    invoice = make_invoice(2, payment_type=GUE)
    events: list[Event] = [
        update(1, HALF, at=T0 + 60),
        update(1, HALF, confirmations=1, at=T0 + 120),
        update(2, HALF, at=T0 + 180),
        RefundAddressSet(T0 + 200, "bc1qrefund"),
        update(1, HALF, OK, at=T0 + 240),
        update(2, HALF, OK, at=T0 + 300),
        update(2, HALF, OK, compliance=FLAG, at=T0 + 400),
    ]
    for number, event in enumerate(events, start=invoice.sequence + 1):
        invoice, effects = step(invoice, event)
        assert invoice.sequence == number
        assert callbacks(effects) == [Callback(number)]
    assert invoice.status is Status.CONFIRMED


def test_a_repeated_update_changes_nothing() -> None:
    """The same update twice: the second is a no-op without effects."""
    invoice, _ = run(make_invoice(2), [update(1, HALF)])
    new, effects = step(invoice, update(1, HALF))
    assert new == invoice
    assert effects == []


def test_an_invisible_change_emits_no_callback() -> None:
    """Only first_observed_at moving is stored but not sent to the merchant."""
    invoice, _ = run(make_invoice(2, payment_type=GUE), [update(1, HALF, at=T0 + 300)])
    new, effects = step(invoice, update(1, HALF, at=T0 + 100))
    assert tx_of(new, 1).first_observed_at == T0 + 100
    assert new == replace(invoice, transactions=new.transactions)
    assert new.sequence == invoice.sequence
    assert effects == []


def test_refusals_are_domain_errors_with_a_code() -> None:
    """Every refusal is a DomainError the API can map."""
    assert issubclass(InvalidState, DomainError)
    assert issubclass(InvalidChoice, DomainError)
    assert InvalidState("x").code == "invalid_invoice_state"
    assert InvalidChoice("x").code == "invalid_choice"
