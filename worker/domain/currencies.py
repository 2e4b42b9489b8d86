"""Currencies and exchange rates.

`RateProvider` is the seam a live feed plugs into; `FileRateProvider` reads
the rates file (prices in one base unit, every pair derived from them). The
rates file always names the currencies; where prices come from is a
`PriceFeed`: the file's own (`FixedPrices`), or live market prices kept in
Redis (worker/store/rates.py, over `worker.domain.prices.LiveRates`).
`quote()` turns an invoice amount into what the customer pays, rounded up at
8 decimals so the merchant is never short because of rounding (spec §1).
"""

from __future__ import annotations

import tomllib
import zlib
from dataclasses import dataclass
from decimal import Context, Decimal
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Protocol

from worker.domain.models import Quote
from worker.domain.money import ZERO, ceil8, div, mul

# Rates shown and stored carry 16 significant digits: short on the wire; amounts
# are computed from the full-precision rate.
RATE_CONTEXT = Context(prec=16)


class CurrencyType(StrEnum):
    CRYPTO = "crypto"
    FIAT = "fiat"


@dataclass(frozen=True, slots=True)
class Currency:
    code: str
    type: CurrencyType
    precision: int
    # BIP21-style URI scheme for QR codes ("bitcoin:addr?amount=…"), where one exists.
    uri_scheme: str | None = None
    # The symbol markets price it under (USDTT, USDT on Tron, trades as USDT); "" = `code`.
    market_symbol: str = ""
    # `id` of `currencies/list`: stable across restarts and receivers (0: derived from the code).
    id: int = 0
    # Smallest invoice amount in this currency (None: one unit of its last decimal).
    minimum_amount: Decimal | None = None
    # Hidden currencies keep their rates and balances but are not offered for new invoices.
    visible: bool = True

    @property
    def market(self) -> str:
        """The symbol market sources quote this currency under."""
        return self.market_symbol or self.code

    @property
    def stable_id(self) -> int:
        """The configured id, else one derived from the code (the same in every process)."""
        return self.id or zlib.crc32(self.code.encode())

    @property
    def minimum(self) -> Decimal:
        """The smallest amount an invoice in this currency may ask for."""
        if self.minimum_amount is not None:
            return self.minimum_amount
        return Decimal(1).scaleb(-self.precision)


def _flag(code: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"visible of {code} must be true or false")
    return value


class UnknownCurrency(LookupError):
    """A currency that the configuration does not offer."""


class RateProvider(Protocol):
    """Where currencies and their current rates come from."""

    def currencies(self) -> tuple[Currency, ...]: ...

    def rate(self, source: str, target: str) -> Decimal:
        """Units of `target` one unit of `source` buys."""
        ...


class PriceFeed(Protocol):
    """Where the current prices come from, read once per request or operation."""

    async def current(self) -> RateProvider:
        """Rates to quote with now; their `rate()` raises if a price is unusable."""
        ...


class FileRateProvider:
    """Rates from a TOML file of prices per currency (see worker/data/rates.toml)."""

    def __init__(self, currencies: tuple[Currency, ...], prices: dict[str, Decimal]) -> None:
        self._currencies = currencies
        self._by_code = {c.code: c for c in currencies}
        self._prices = prices

    @classmethod
    def load(cls, path: Path | None = None) -> FileRateProvider:
        if path is None:
            text = resources.files("worker").joinpath("data/rates.toml").read_text()
        else:
            text = path.read_text()
        table = tomllib.loads(text)["currencies"]
        currencies: list[Currency] = []
        prices: dict[str, Decimal] = {}
        for code, entry in table.items():
            kind = CurrencyType(entry["type"])
            precision = int(entry.get("precision", 8 if kind is CurrencyType.CRYPTO else 2))
            minimum = entry.get("minimum_amount")
            currencies.append(
                Currency(
                    code,
                    kind,
                    precision,
                    entry.get("uri_scheme"),
                    market_symbol=entry.get("market", ""),
                    id=int(entry.get("id", 0)),
                    minimum_amount=None if minimum is None else Decimal(str(minimum)),
                    visible=_flag(code, entry.get("visible", True)),
                )
            )
            price = Decimal(str(entry["price"]))
            if price <= ZERO:
                raise ValueError(f"price of {code} must be positive")
            prices[code] = price
        return cls(tuple(currencies), prices)

    def currencies(self) -> tuple[Currency, ...]:
        return self._currencies

    def currency(self, code: str) -> Currency:
        try:
            return self._by_code[code]
        except KeyError:
            raise UnknownCurrency(code) from None

    def rate(self, source: str, target: str) -> Decimal:
        try:
            return div(self._prices[source], self._prices[target])
        except KeyError as missing:
            raise UnknownCurrency(str(missing)) from None


class FixedPrices:
    """The rates file's prices: always available, never stale (the offline default)."""

    def __init__(self, rates: FileRateProvider) -> None:
        self._rates = rates

    async def current(self) -> RateProvider:
        return self._rates


def crypto_codes(rates: RateProvider) -> tuple[str, ...]:
    """The currencies a customer can pay in (hidden ones are not offered)."""
    return tuple(c.code for c in rates.currencies() if c.type is CurrencyType.CRYPTO and c.visible)


def quote(rates: RateProvider, currency: str, amount: Decimal, sender_currency: str) -> Quote:
    """What the customer pays in `sender_currency` for `amount` of `currency`, rounded up.

    The product uses the full-precision rate (1.08 EUR → 1.08 USDT stays exact);
    the rate kept on the quote is rounded to 16 significant digits for display.
    """
    paid = ceil8(mul(amount, rates.rate(currency, sender_currency)))
    return Quote(sender_currency, paid, RATE_CONTEXT.plus(rates.rate(sender_currency, currency)))
