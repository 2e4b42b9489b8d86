"""Request bodies at the trust boundary (pydantic), with the spec's field rules.

Compatibility with clients written against the public CoinsPaid v2 reference
(spec §6): an optional field sent as `""` or `null` means "not given", and
unknown fields are ignored.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    model_validator,
)

from worker.domain.models import PaymentType
from worker.domain.money import MAX_AMOUNT, AmountError, parse_amount

# Deliberately simple: one @, no spaces, a dot in the domain. Deliverability is the MTA's job.
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")


def amount_value(value: object) -> Decimal:
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


# What the reference server (Laravel's `boolean` rule) takes for a boolean; client
# libraries send 1/0 or "1"/"0" (the PHP ones do). "yes", "true" or 2 stay errors.
_BOOLEANS: dict[object, bool] = {1: True, 0: False, "1": True, "0": False}


def _boolean(value: object) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | str) and value in _BOOLEANS:
        return _BOOLEANS[value]
    return value  # StrictBool refuses it with its message


Amount = Annotated[Decimal, BeforeValidator(amount_value)]
Email = Annotated[str, AfterValidator(_email)]
Url = Annotated[str, AfterValidator(_url)]
CurrencyCode = Annotated[str, Field(min_length=2, max_length=16), AfterValidator(_currency)]
ForeignId = Annotated[str, Field(min_length=1, max_length=255)]
Boolean = Annotated[StrictBool, BeforeValidator(_boolean)]


class Body(BaseModel):
    """Base of request bodies: unknown fields are ignored, strings must be strings."""

    model_config = ConfigDict(extra="ignore", strict=False, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _blank_means_absent(cls, data: Any) -> Any:
        """An optional field sent as "" or null is not given (required ones stay errors)."""
        if not isinstance(data, dict):
            return data
        optional = _optional_fields(cls)
        return {
            name: value
            for name, value in data.items()
            if not (name in optional and (value is None or value == ""))
        }


@functools.cache
def _optional_fields(model: type[BaseModel]) -> frozenset[str]:
    """The names of `model`'s fields that may be left out (looked up once per model)."""
    return frozenset(name for name, field in model.model_fields.items() if not field.is_required())


class CreateInvoice(Body):
    timer: Boolean
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


class CurrenciesFilter(Body):
    """`currencies/list`: only the currencies shown (true) or hidden (false); absent: all."""

    visible: Boolean | None = None


class PairsFilter(Body):
    """`currencies/pairs` and `currencies/rates`: optional currency codes to filter by."""

    currency_from: str | None = None
    currency_to: str | None = None


class ConfirmInvoice(Body):
    sender_currency: CurrencyCode | None = None
    email: Email | None = None


class RefundAddress(Body):
    address: Annotated[str, Field(min_length=1, max_length=200)]
