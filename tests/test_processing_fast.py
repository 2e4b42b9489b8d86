"""The processing callback's fast path (receiver/api/processing.py `fast_updates`) accepts
only what the pydantic model accepts, with the same updates; everything else is left to it."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from typing import Any

import pytest

from receiver.api.errors import ApiError
from receiver.api.processing import ProcessingCallback, fast_updates, updates_of
from receiver.api.requests import validate
from receiver.commands.simulate import deposit_body
from worker.domain.events import TransactionUpdate

NOW = 1_700_000_123
ADDRESS = "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"

_MISSING = object()

# Values each field is set to in turn (besides being left out).
VALUES: list[Any] = [
    None, "", 0, -1, 1, 7, True, False, "0", "07", "12", " 3", "-1", Decimal("1.5"),
    Decimal("0.00100000"), "0.001", "0.000000001", "1e3", "abc", " btc ", "BTC", "ltc", "x" * 201,
    "t" * 101, [], {}, [{}], "deposit", "withdrawal", "not_confirmed", "confirmed", "flagged",
    "clear", 10**20, "9" * 19, ADDRESS,
]  # fmt: skip


def _base() -> dict[str, Any]:
    return deposit_body(
        tx_id=42,
        currency="BTC",
        address=ADDRESS,
        amount="0.00150000",
        txid="ab" * 32,
        status="not_confirmed",
        confirmations=1,
        compliance="clear",
        observed_at=1_700_000_000,
    )


def _slow(body: bytes) -> list[TransactionUpdate] | str:
    """What the pydantic path makes of `body`: its updates, or "refused"."""
    try:
        data = json.loads(body, parse_float=Decimal)
        if not isinstance(data, dict):
            return "refused"
        return updates_of(validate(ProcessingCallback, data), NOW)
    except (ApiError, ValueError):
        return "refused"


def _variants() -> list[tuple[str, dict[str, Any]]]:
    base = _base()
    out: list[tuple[str, dict[str, Any]]] = [("as sent", base)]
    places: list[tuple[str, list[str]]] = [(name, [name]) for name in base] + [
        (f"crypto_address.{name}", ["crypto_address", name]) for name in base["crypto_address"]
    ]
    places += [(f"tx.{name}", ["transactions", "0", name]) for name in base["transactions"][0]]
    places += [("tx.riskscore", ["transactions", "0", "riskscore"]), ("unknown", ["unknown"])]
    for label, path in places:
        for value in [_MISSING, *VALUES]:
            body = copy.deepcopy(base)
            parent: Any = body
            for step in path[:-1]:
                parent = parent[int(step)] if isinstance(parent, list) else parent[step]
            if value is _MISSING:
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = value
            out.append((f"{label}={value!r}"[:60], body))
    two = copy.deepcopy(base)
    two["transactions"].append({**two["transactions"][0], "id": 43, "currency": "btc"})
    out.append(("two transactions", two))
    return out


VARIANTS = _variants()


@pytest.mark.parametrize(("label", "data"), VARIANTS, ids=[label for label, _ in VARIANTS])
def test_fast_path_agrees_with_the_model(label: str, data: dict[str, Any]) -> None:
    # Decimals go out as JSON numbers (their exact text), the way a processing layer may send them.
    body = json.dumps(data, default=lambda d: f"@@{d}@@").replace('"@@', "").replace('@@"', "")
    fast = fast_updates(body.encode(), NOW)
    slow = _slow(body.encode())
    if fast is not None:
        assert fast == slow, label


def test_plain_callbacks_take_the_fast_path() -> None:
    base = _base()
    body = json.dumps(base).encode()
    assert fast_updates(body, NOW) == _slow(body) != "refused"
    without_time = {k: v for k, v in base.items() if k != "observed_at"}
    body = json.dumps(without_time).encode()
    updates = fast_updates(body, NOW)
    assert updates is not None and updates[0].observed_at == NOW
    assert updates == _slow(body)


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b"null", b"{", b'{"amount": NaN}', b"\xff", b"[" * 40 + b"]" * 40],
)
def test_malformed_bodies_are_left_to_the_ordinary_path(body: bytes) -> None:
    assert fast_updates(body, NOW) is None
