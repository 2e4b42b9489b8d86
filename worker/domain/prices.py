"""Live market prices: one price from several sources, and a rate table that refuses stale ones.

Pure: the worker's refresher (worker/rates/) reads the sources and calls
`combine`; the receivers read the table from Redis (worker/store/rates.py) and
quote through `LiveRates`, whose `rate()` raises `RatesUnavailable` rather than
use a price older than the configured maximum age (spec §11). Every price is in
one unit, `BASE` (US dollars), as in the rates file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from worker.domain.currencies import Currency, FileRateProvider
from worker.domain.money import div, mul

# The unit every price is expressed in: its own price is 1 and never goes stale.
BASE = "USD"
HUNDRED = Decimal(100)


class RatesUnavailable(Exception):
    """A price needed for a quote is missing or older than the maximum age."""

    def __init__(self, currencies: tuple[str, ...]) -> None:
        super().__init__(currencies)
        self.currencies = currencies


@dataclass(frozen=True, slots=True)
class Price:
    """A currency's price in `BASE`, when it was read, and which sources agreed on it."""

    value: Decimal
    as_of: int
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Combined:
    """What `combine` made of one currency's observations."""

    # None when the sources disagree too much to name a price.
    value: Decimal | None
    median: Decimal
    used: tuple[str, ...]
    # Sources further than the spread from the median, with what they said.
    dropped: tuple[tuple[str, Decimal], ...]


def median(values: list[Decimal]) -> Decimal:
    """The middle value (the mean of the two middle ones for an even count)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return div(ordered[middle - 1] + ordered[middle], Decimal(2))


def combine(observations: Mapping[str, Decimal], max_spread_percent: Decimal) -> Combined:
    """One price from each source's observation: the median of those that agree.

    A source further than `max_spread_percent` from the median of all is
    dropped. The price is the median of the rest, but only when they are a
    majority: with two sources that disagree, or three that all differ, there
    is no telling which is right, so there is no price (and the old one ages
    out) rather than a wrong one.
    """
    if not observations:
        raise ValueError("no observations to combine")
    middle = median(list(observations.values()))
    limit = mul(middle, div(max_spread_percent, HUNDRED))
    used = {name: value for name, value in observations.items() if abs(value - middle) <= limit}
    dropped = tuple(
        (name, value) for name, value in sorted(observations.items()) if name not in used
    )
    if 2 * len(used) <= len(observations):
        return Combined(None, middle, tuple(sorted(used)), dropped)
    return Combined(median(list(used.values())), middle, tuple(sorted(used)), dropped)


class LiveRates:
    """A `RateProvider` over the current price table that never quotes a stale price.

    Currencies (type, precision, scheme) come from the rates file; only prices
    come from the table. `now` and `max_age` are fixed at construction: one
    object answers one request.
    """

    def __init__(
        self, catalog: FileRateProvider, prices: Mapping[str, Price], now: int, max_age: int
    ) -> None:
        self._catalog = catalog
        self._prices = prices
        self._now = now
        self._max_age = max_age

    def currencies(self) -> tuple[Currency, ...]:
        return self._catalog.currencies()

    def currency(self, code: str) -> Currency:
        return self._catalog.currency(code)

    def price(self, code: str) -> Decimal:
        """`code`'s price in `BASE`; raises `RatesUnavailable` when missing or too old."""
        market = self._catalog.currency(code).market  # raises UnknownCurrency
        if market == BASE:
            return Decimal(1)
        price = self._prices.get(market)
        if price is None or self._now - price.as_of > self._max_age:
            raise RatesUnavailable((code,))
        return price.value

    def rate(self, source: str, target: str) -> Decimal:
        """Units of `target` one unit of `source` buys, from fresh prices only."""
        stale: list[str] = []
        values: list[Decimal] = []
        for code in (source, target):
            try:
                values.append(self.price(code))
            except RatesUnavailable:
                stale.append(code)
        if stale:
            raise RatesUnavailable(tuple(stale))
        return div(values[0], values[1])
