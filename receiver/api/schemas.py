"""Request bodies at the trust boundary (pydantic), with the spec's field rules."""

from __future__ import annotations

import re
from decimal import Decimal
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from worker.domain.models import PaymentType
from worker.domain.money import MAX_AMOUNT, AmountError, parse_amount

# Deliberately simple: one @, no spaces, a dot in the domain. Deliverability is the MTA's job.
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")


def _amount(value: object) -> Decimal:
    try:
        amount = parse_amount(value)
    except AmountError as exc:
        raise ValueError(f"Amount {exc}.") from None
    if amount <= 0:
        raise ValueError("Amount must be greater than 0.")
    if amount > MAX_AMOUNT:
        raise ValueError("Amount must not exceed 1000000000000.")
    return amount


def _email(value: str) -> str:
    """One plain address that the mail sender will accept too (worker/mail/loop.py)."""
    try:
        plain = (
            len(value) <= 254
            and bool(_EMAIL.match(value))
            and Address(addr_spec=value).addr_spec == value
        )
    except (ValueError, IndexError, HeaderParseError):
        plain = False
    if not plain:
        raise ValueError("Enter a valid e-mail address.")
    return value


def _url(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value) or len(value) > 2000:
        raise ValueError("Enter a valid http(s) URL.")
    return value


def _currency(value: str) -> str:
    return value.strip().upper()


Amount = Annotated[Decimal, BeforeValidator(_amount)]
Email = Annotated[str, AfterValidator(_email)]
Url = Annotated[str, AfterValidator(_url)]
CurrencyCode = Annotated[str, Field(min_length=2, max_length=16), AfterValidator(_currency)]
ForeignId = Annotated[str, Field(min_length=1, max_length=255)]


class Body(BaseModel):
    """Base of request bodies: unknown fields are ignored, strings must be strings."""

    model_config = ConfigDict(extra="ignore", strict=False, frozen=True)


class CreateInvoice(Body):
    timer: StrictBool
    title: Annotated[str, Field(min_length=1, max_length=50)]
    description: Annotated[str, Field(max_length=1000)] = ""
    currency: CurrencyCode
    amount: Amount
    foreign_id: ForeignId
    url_success: Url | None = None
    url_failed: Url | None = None
    email_user: Email | None = None
    sender_currency: CurrencyCode | None = None
    type: PaymentType = PaymentType.FILL_OR_KILL


class ForeignIdBody(Body):
    foreign_id: ForeignId


class EmptyBody(Body):
    pass


class ConfirmInvoice(Body):
    sender_currency: CurrencyCode | None = None
    email: Email | None = None


class RefundAddress(Body):
    address: Annotated[str, Field(min_length=1, max_length=200)]
