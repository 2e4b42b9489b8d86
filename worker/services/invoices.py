"""The shell around the state machine: prepare inputs, apply, commit with CAS retries.

Everything with I/O that an invoice operation needs happens here — reading
the invoice, allocating an address, quoting, the clock, the atomic commit —
while the decisions stay in the pure `worker.domain.machine`. Both the receiver
(create, confirm, cancel, refund address) and the worker (timers, payments)
go through this module.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from decimal import Decimal

from worker.domain import machine
from worker.domain.addresses import AddressProvider
from worker.domain.currencies import (
    FileRateProvider,
    FixedPrices,
    PriceFeed,
    RateProvider,
    crypto_codes,
    quote,
)
from worker.domain.events import (
    CustomerConfirm,
    Event,
    MerchantCancel,
    RefundAddressSet,
    TimerFired,
)
from worker.domain.machine import DomainError, NewInvoice, Policy, Transition
from worker.domain.models import DepositAddress, Invoice, Merchant, PaymentType, Quote
from worker.logs import get_logger
from worker.store.invoices import InvoiceStore, Stored
from worker.store.mails import release_waiting

log = get_logger(__name__)

# A commit that keeps losing the compare-and-set this often is a bug, not contention.
MAX_CAS_ATTEMPTS = 50
# How many due timers one sweep takes (the rest wait for the next second).
TIMER_BATCH = 500


class InvoiceNotFound(LookupError):
    """No invoice with this id, token or foreign id (for this merchant)."""


class ConcurrentModification(RuntimeError):
    """The compare-and-set kept failing; the caller may retry the whole operation."""


@dataclass(frozen=True, slots=True)
class InvoiceRequest:
    """A validated create request (spec §6), independent of its HTTP form."""

    foreign_id: str
    title: str
    currency: str
    amount: Decimal
    timer: bool
    description: str = ""
    payment_type: PaymentType = PaymentType.FILL_OR_KILL
    sender_currency: str | None = None
    email: str | None = None
    url_success: str | None = None
    url_failed: str | None = None


def new_token() -> str:
    """The public invoice token: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(24)


def new_refund_token() -> str:
    """The refund page's token: 192 random bits, URL-safe, unrelated to the invoice token."""
    return secrets.token_urlsafe(24)


def with_refund_token(transition: Transition) -> Transition:
    """The transition, with a fresh refund token where it sends the first refund/payback mail.

    Drawn per attempt: only the attempt whose compare-and-set wins is stored
    (commit.lua writes the token's index with the invoice and the e-mail), so
    retries never leave two tokens, and later mails reuse the stored one.
    """
    if not machine.owes_refund_token(transition):
        return transition
    invoice = replace(transition.invoice, refund_token=new_refund_token())
    return Transition(invoice, transition.effects)


def bound(invoice: Invoice) -> dict[str, object]:
    """The log fields that identify an invoice (spec §11)."""
    return {
        "invoice_id": invoice.id,
        "foreign_id": invoice.foreign_id,
        "merchant": invoice.merchant,
    }


def log_change(stored: Stored, transition: Transition, cause: str, **extra: object) -> None:
    """One log event per committed change: who, why, from what to what, which effects."""
    log.info(
        "invoice_changed",
        **bound(transition.invoice),
        cause=cause,
        status_from=stored.invoice.status.value,
        status=transition.invoice.status.value,
        sequence=transition.invoice.sequence,
        effects=[type(effect).__name__ for effect in transition.effects],
        **extra,
    )


class InvoiceService:
    def __init__(
        self,
        store: InvoiceStore,
        rates: FileRateProvider,
        addresses: AddressProvider,
        policy: Policy,
        clock: Callable[[], float] = time.time,
        prices: PriceFeed | None = None,
    ) -> None:
        self.store = store
        # The currencies on offer (the rates file); prices come from `prices`.
        self.rates = rates
        # Live market prices, or the file's own; their `rate()` refuses stale prices.
        self.prices: PriceFeed = prices or FixedPrices(rates)
        self.addresses = addresses
        self.policy = policy
        self.clock = clock
        # Called after every committed change (the worker wakes its delivery loop).
        self.listeners: list[Callable[[Transition], None]] = []

    def now(self) -> int:
        return int(self.clock())

    # ------------------------------------------------------------------ create

    async def create(self, merchant: Merchant, request: InvoiceRequest) -> Invoice:
        """Create an invoice; raise `DuplicateForeignId` if the foreign id is taken.

        The cheap lookup first spares an address for the common duplicate; the
        create script's SET NX is what makes racing duplicates impossible.
        Every quote the customer would be offered is computed before anything
        is written, so stale prices (`RatesUnavailable`) leave nothing behind:
        no id, no address, no foreign id claimed.
        """
        existing = await self.store.id_by_foreign_id(merchant.key, request.foreign_id)
        if existing is not None:
            raise await self.store.taken(existing)
        now = self.now()
        kind = machine.invoice_type(request.timer, request.sender_currency)
        offered = self._offered(await self.prices.current(), request)
        quotes: tuple[Quote, ...] = ()
        address: DepositAddress | None = None
        if kind == 2:
            quotes = offered
        elif kind == 3 and request.sender_currency is not None:
            quotes = offered
            address = await self.addresses.allocate(request.sender_currency)
        invoice = machine.create(
            NewInvoice(
                id=await self.store.next_id(merchant.key, request.foreign_id),
                merchant=merchant.key,
                foreign_id=request.foreign_id,
                token=new_token(),
                title=request.title,
                description=request.description,
                currency=request.currency,
                amount=request.amount,
                timer=request.timer,
                payment_type=request.payment_type,
                terms=merchant.terms,
                created_at=now,
                sender_currency=request.sender_currency,
                email=request.email,
                url_success=request.url_success,
                url_failed=request.url_failed,
                quotes=quotes,
                address=address,
            ),
            self.policy,
        )
        await self.store.create(invoice)
        log.info(
            "invoice_created",
            **bound(invoice),
            invoice_type=invoice.invoice_type,
            status=invoice.status.value,
        )
        return invoice

    def _offered(self, rates: RateProvider, request: InvoiceRequest) -> tuple[Quote, ...]:
        """What the customer would pay in each currency on offer, at the current prices.

        Types 2 and 3 fix these quotes; type 1 fixes its rate only at the
        customer's confirmation, but is refused all the same while prices are
        unavailable, as its page could not show what to pay.
        """
        codes = (request.sender_currency,) if request.sender_currency else crypto_codes(rates)
        return tuple(quote(rates, request.currency, request.amount, code) for code in codes)

    # ------------------------------------------------------------------ apply

    async def apply(self, invoice_id: int, event: Event) -> Transition:
        """Apply an event with compare-and-set retries; return the committed transition.

        Raises `DomainError` when the invoice refuses the event and
        `InvoiceNotFound` when there is no such invoice.
        """

        async def same(_: Invoice) -> Event:
            return event

        return await self._apply_with(invoice_id, same, type(event).__name__)

    async def _apply_with(
        self, invoice_id: int, event_for: Callable[[Invoice], Awaitable[Event]], cause: str
    ) -> Transition:
        """The compare-and-set loop: read, build the event for what was read, apply, commit."""
        for attempt in range(MAX_CAS_ATTEMPTS):
            stored = await self.store.get(invoice_id)
            if stored is None:
                raise InvoiceNotFound(invoice_id)
            event = await event_for(stored.invoice)
            transition = with_refund_token(machine.apply(stored.invoice, event, self.policy))
            if await self._commit(stored, transition, cause):
                return transition
            await asyncio.sleep(min(0.001 * attempt, 0.05))
        raise ConcurrentModification(invoice_id)

    async def _commit(self, stored: Stored, transition: Transition, cause: str) -> bool:
        """Persist a transition (a no-op when nothing changed); False on a lost race."""
        if transition.invoice == stored.invoice:
            return True
        if not await self.store.commit(stored, transition, self.now()):
            return False
        log_change(stored, transition, cause)
        self.committed(transition)
        return True

    def committed(self, transition: Transition) -> None:
        """Tell the listeners about a committed change."""
        for listener in self.listeners:
            listener(transition)

    async def by_token(self, token: str) -> Stored:
        invoice_id = await self.store.id_by_token(token)
        stored = None if invoice_id is None else await self.store.get(invoice_id)
        if stored is None:
            raise InvoiceNotFound(token)
        return stored

    async def by_refund_token(self, refund_token: str) -> Stored:
        """The invoice whose refund page this is; unknown until a refund or payback is owed.

        The index key is written before the commit that stores the token on the
        invoice (another slot): a key left by a commit that was then lost (a
        crash, or a lost compare-and-set whose retry drew another token) names
        an invoice that does not hold the token, and opens nothing.
        """
        invoice_id = await self.store.id_by_refund_token(refund_token)
        stored = None if invoice_id is None else await self.store.get(invoice_id)
        if stored is None or stored.invoice.refund_token != refund_token:
            raise InvoiceNotFound(refund_token)
        return stored

    async def by_foreign_id(self, merchant: str, foreign_id: str) -> Stored:
        """The merchant's own invoice; another merchant's is "not found"."""
        invoice_id = await self.store.id_by_foreign_id(merchant, foreign_id)
        stored = None if invoice_id is None else await self.store.get(invoice_id)
        if stored is None or stored.invoice.merchant != merchant:
            raise InvoiceNotFound(foreign_id)
        return stored

    # ------------------------------------------------------------------ operations

    async def confirm(self, token: str, sender_currency: str | None, email: str | None) -> Invoice:
        """The customer's confirm (spec §7): fix rate and address where the type needs it."""
        address: DepositAddress | None = None

        async def confirmation(invoice: Invoice) -> Event:
            nonlocal address
            currency = sender_currency or invoice.sender_currency
            event_quote = None
            if invoice.address is None and currency is not None and not invoice.status.is_final:
                if invoice.invoice_type == 1:
                    # Before the address: stale prices (RatesUnavailable) allocate nothing.
                    event_quote = self._quote(await self.prices.current(), invoice, currency)
                elif currency not in {q.currency for q in invoice.quotes}:
                    raise machine.InvalidChoice(
                        f"Currency {currency} is not offered for this invoice."
                    )
                if address is None or address.currency != currency:
                    # Allocated once and reused across CAS retries; an address
                    # left unused by a lost race is simply never handed out again.
                    address = await self.addresses.allocate(currency)
            return CustomerConfirm(self.now(), sender_currency, email, event_quote, address)

        stored = await self.by_token(token)
        transition = await self._apply_with(stored.invoice.id, confirmation, "CustomerConfirm")
        if transition.invoice.email:
            # Mails parked for want of an address can go now (spec §10). Cheap and
            # idempotent, so a repeated confirm heals a release a crash lost.
            await release_waiting(self.store.redis, stored.invoice.id)
        return transition.invoice

    def _quote(self, rates: RateProvider, invoice: Invoice, currency: str) -> Quote:
        if currency not in crypto_codes(rates):
            raise machine.InvalidChoice(f"Currency {currency} is not offered for this invoice.")
        return quote(rates, invoice.currency, invoice.amount, currency)

    async def cancel(self, merchant: str, foreign_id: str) -> Invoice:
        stored = await self.by_foreign_id(merchant, foreign_id)
        return (await self.apply(stored.invoice.id, MerchantCancel(self.now()))).invoice

    async def set_refund_address(self, refund_token: str, address: str) -> Invoice:
        """Store the customer's refund address, given on the refund page (by its own token)."""
        stored = await self.by_refund_token(refund_token)
        event = RefundAddressSet(self.now(), address)
        return (await self.apply(stored.invoice.id, event)).invoice

    async def fire_due_timers(self) -> int:
        """Apply `TimerFired` to every invoice whose timer is due; return how many changed.

        Several workers may sweep the same second: the compare-and-set lets one
        win, and the others find a final invoice and do nothing.
        """
        now = self.now()
        fired = 0
        for invoice_id in await self.store.due_timers(now, TIMER_BATCH):
            try:
                transition = await self.apply(invoice_id, TimerFired(now))
            except (InvoiceNotFound, DomainError, ConcurrentModification) as exc:
                log.error("timer_failed", invoice_id=invoice_id, error=repr(exc))
                continue
            if transition.callback is None:
                # Nothing was due after all: the entry disagreed with its invoice
                # (commit.lua keeps them equal; this heals an entry written by hand).
                log.warning("timer_resynced", invoice_id=invoice_id)
                await self.store.sync_timer(invoice_id)
            fired += transition.callback is not None
        return fired
