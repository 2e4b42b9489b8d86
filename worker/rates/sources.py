"""The public market sources and their documented answer formats.

Each source turns its public, unauthenticated endpoint into prices in US
dollars by market symbol (`{"BTC": Decimal("64012.5"), "EUR": ...}`). Numbers
are read as `Decimal` from the text (JSON with `parse_float=Decimal`), never
through float. Anything unexpected in an answer is a `SourceError`: the source
is skipped for that refresh and the others decide.

* kraken — `GET /0/public/Ticker?pair=XBTUSD,...`:
  `{"error": [], "result": {"XXBTZUSD": {"c": ["<last price>", "<volume>"], ...}}}`
  (answers under Kraken's own pair names, e.g. XXBTZUSD for XBTUSD).
* bitstamp — `GET /api/v2/ticker/{pair}/` per pair (btcusd, ...):
  `{"last": "<price>", "timestamp": "<unix seconds>", ...}`.
* coinbase — `GET /v2/exchange-rates?currency=USD`:
  `{"data": {"currency": "USD", "rates": {"BTC": "<BTC per USD>", ...}}}`.
* ecb — `GET /stats/eurofxref/eurofxref-daily.xml`, the ECB's euro reference
  rates: `<Cube time="YYYY-MM-DD"><Cube currency="USD" rate="1.0848"/>...`
  (units per euro; fiat crosses only).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Protocol
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeXml
from defusedxml import DefusedXmlException

from worker.config import RateSourceName
from worker.domain.money import div

# GET a URL, return the body of a 200 answer; raises SourceError otherwise.
Get = Callable[[str], Awaitable[bytes]]

# The ECB publishes on TARGET business days only: over Easter (Friday and Monday
# closed) Thursday's rates are still the newest on Tuesday morning (days).
ECB_MAX_AGE_DAYS = 5
ECB_NS = "{http://www.ecb.int/vocabulary/2002-08-01/eurofxref}"
# Any price (or Coinbase's units per dollar) outside these bounds is a broken
# answer, not a market: it would also write a million-digit decimal into Redis.
MIN_NUMBER = Decimal("1e-12")
MAX_NUMBER = Decimal("1e12")


class SourceError(Exception):
    """A source's answer that cannot be used: down, slow, malformed or stale."""


@dataclass(frozen=True, slots=True)
class Ask:
    """What one refresh asks a source for."""

    get: Get
    base_url: str
    # Market symbols wanted (priced in US dollars).
    symbols: frozenset[str]
    now: float
    # A quote the source itself dates older than this is stale (seconds).
    max_age: int


class Source(Protocol):
    name: RateSourceName

    async def read(self, ask: Ask) -> dict[str, Decimal]:
        """Prices in US dollars by market symbol (only those the source has)."""
        ...


def positive(value: object, what: str) -> Decimal:
    """A price from an answer: a finite decimal above zero, from text or a JSON number."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise SourceError(f"{what}: not a number")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise SourceError(f"{what}: not a number") from None
    if not number.is_finite() or number <= 0:
        raise SourceError(f"{what}: not a positive number")
    if not MIN_NUMBER <= number <= MAX_NUMBER:
        raise SourceError(f"{what}: out of range")
    return number


def json_body(raw: bytes) -> Any:
    """An answer's JSON, numbers as Decimal."""
    try:
        return json.loads(raw, parse_float=Decimal)
    except (UnicodeDecodeError, ValueError):
        raise SourceError("malformed JSON") from None


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SourceError(f"{what}: expected an object")
    return value


class Kraken:
    name: RateSourceName = "kraken"
    # Pairs to ask for by market symbol (Kraken calls bitcoin XBT).
    PAIRS: ClassVar[dict[str, str]] = {
        "BTC": "XBTUSD",
        "ETH": "ETHUSD",
        "LTC": "LTCUSD",
        "BCH": "BCHUSD",
        "USDT": "USDTUSD",
        "EUR": "EURUSD",
    }
    # Kraken answers under its pair names, which are not always the ones asked for.
    NAMES: ClassVar[dict[str, str]] = {
        "XXBTZUSD": "BTC",
        "XETHZUSD": "ETH",
        "XLTCZUSD": "LTC",
        "BCHUSD": "BCH",
        "USDTZUSD": "USDT",
        "ZEURZUSD": "EUR",
    } | {pair: symbol for symbol, pair in PAIRS.items()}

    async def read(self, ask: Ask) -> dict[str, Decimal]:
        pairs = [pair for symbol, pair in self.PAIRS.items() if symbol in ask.symbols]
        if not pairs:
            return {}
        body = _object(
            json_body(await ask.get(f"{ask.base_url}/0/public/Ticker?pair={','.join(pairs)}")),
            "answer",
        )
        errors = body.get("error")
        if errors:
            raise SourceError(f"kraken error: {'; '.join(map(str, errors))}")
        prices: dict[str, Decimal] = {}
        for name, ticker in _object(body.get("result"), "result").items():
            symbol = self.NAMES.get(name)
            if symbol is None or symbol not in ask.symbols:
                continue
            last = _object(ticker, name).get("c")
            if not isinstance(last, list) or not last:
                raise SourceError(f"{name}: no last trade")
            prices[symbol] = positive(last[0], name)
        return prices


class Bitstamp:
    name: RateSourceName = "bitstamp"
    SYMBOLS = ("BTC", "ETH", "LTC", "BCH", "USDT", "EUR")

    async def read(self, ask: Ask) -> dict[str, Decimal]:
        prices: dict[str, Decimal] = {}
        for symbol in self.SYMBOLS:
            if symbol not in ask.symbols:
                continue
            pair = f"{symbol.lower()}usd"
            ticker = _object(
                json_body(await ask.get(f"{ask.base_url}/api/v2/ticker/{pair}/")), pair
            )
            at = positive(ticker.get("timestamp"), f"{pair} timestamp")
            if ask.now - float(at) > ask.max_age:
                raise SourceError(f"{pair}: stale ticker, {int(ask.now - float(at))} s old")
            prices[symbol] = positive(ticker.get("last"), pair)
        return prices


class Coinbase:
    name: RateSourceName = "coinbase"

    async def read(self, ask: Ask) -> dict[str, Decimal]:
        body = _object(
            json_body(await ask.get(f"{ask.base_url}/v2/exchange-rates?currency=USD")), "answer"
        )
        data = _object(body.get("data"), "data")
        if data.get("currency") != "USD":
            raise SourceError("rates not against USD")
        rates = _object(data.get("rates"), "rates")
        # Coinbase gives units per dollar; a price is dollars per unit.
        return {
            symbol: div(Decimal(1), positive(rates[symbol], symbol))
            for symbol in sorted(ask.symbols)
            if symbol in rates
        }


class Ecb:
    name: RateSourceName = "ecb"

    async def read(self, ask: Ask) -> dict[str, Decimal]:
        raw = await ask.get(f"{ask.base_url}/stats/eurofxref/eurofxref-daily.xml")
        try:
            root: Element = SafeXml.fromstring(raw)
        except (SafeXml.ParseError, DefusedXmlException):
            raise SourceError("malformed XML") from None
        day = next((cube for cube in root.iter(f"{ECB_NS}Cube") if cube.get("time")), None)
        if day is None:
            raise SourceError("no dated Cube")
        try:
            published = date.fromisoformat(day.get("time", ""))
        except ValueError:
            raise SourceError("bad date") from None
        today = datetime.fromtimestamp(ask.now, UTC).date()
        if (today - published).days > ECB_MAX_AGE_DAYS:
            raise SourceError(f"stale reference rates of {published.isoformat()}")
        per_euro = {
            cube.get("currency", ""): positive(cube.get("rate"), f"rate {cube.get('currency')}")
            for cube in day.iter(f"{ECB_NS}Cube")
            if cube.get("currency")
        }
        if "USD" not in per_euro:
            raise SourceError("no USD reference rate")
        usd = per_euro["USD"]
        prices = {"EUR": usd} if "EUR" in ask.symbols else {}
        for symbol in sorted(ask.symbols & per_euro.keys()):
            if symbol != "USD":
                prices[symbol] = div(usd, per_euro[symbol])
        return prices


SOURCES: dict[RateSourceName, Source] = {
    source.name: source for source in (Kraken(), Bitstamp(), Coinbase(), Ecb())
}
