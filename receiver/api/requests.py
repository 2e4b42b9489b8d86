"""Reading, authenticating and validating request bodies, in the order of spec §6.

Body size (413), then signature on the raw bytes (403), then content format
(400 bad_content_format), then field validation (400 errors).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from receiver import appkeys
from receiver.api import ratelimit
from receiver.api.errors import (
    bad_content,
    bad_signature,
    bad_timestamp,
    field_errors,
    replayed,
    too_large,
)
from worker.config import MAX_BODY_BYTES
from worker.domain.models import Merchant
from worker.domain.signing import TIMESTAMP_HEADER, timestamped_message, verify
from worker.store.replay import first_use

Model = TypeVar("Model", bound=BaseModel)

# JSON nested deeper than this is refused (the API's bodies need 4 levels); deeper input
# would only cost stack, and past Python's recursion limit the decoder itself fails.
MAX_JSON_DEPTH = 32

# A secret that no merchant has: unknown keys cost the same HMAC as known ones.
_DUMMY_SECRET = "unknown-merchant-key"  # noqa: S105 - not a credential


async def read_body(request: web.Request) -> bytes:
    """The raw body, refusing anything over the limit before reading it where possible."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large()
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large() from None


def parse_json(request: web.Request, body: bytes) -> dict[str, Any]:
    """A JSON object body; numbers with a fraction become Decimal, never float.

    An empty body counts as `{}` (the endpoints without fields), whatever its type;
    so do `[]` and `null`, which client libraries send for "no parameters" (spec §6).
    """
    if not body.strip():
        return {}
    if request.content_type != "application/json":
        raise bad_content()
    try:
        data = json.loads(body, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad_content() from None
    if data is None or data == []:
        return {}
    if not isinstance(data, dict) or (may_nest(body) and _deeper_than(data, MAX_JSON_DEPTH)):
        raise bad_content()
    return data


def may_nest(body: bytes) -> bool:
    """Could `body` nest deeper than MAX_JSON_DEPTH? Not with fewer brackets than that.

    Every level opens a bracket, so counting them (in C) spares the walk below for
    the API's ordinary bodies; brackets inside strings only make this say yes.
    """
    return body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH


def _deeper_than(data: object, limit: int) -> bool:
    """Does `data` nest objects and arrays more than `limit` levels? (No recursion.)"""
    pending: list[tuple[object, int]] = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            children: list[object] = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def validate(model: type[Model], data: dict[str, Any]) -> Model:
    """Validate with pydantic; field errors become `{"errors": {field: message}}`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise field_errors(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "body"
        if error["type"] == "missing":
            message = "This field is required."
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        errors.setdefault(field, message)
    return errors


async def authenticate_merchant(request: web.Request, body: bytes) -> Merchant:
    """The merchant whose secret signed `body`; 403 otherwise, then its rate limit.

    A merchant with `require_timestamp` signs `{timestamp}.{body}` and each
    signed request is accepted once, while its timestamp is fresh (replay
    protection); every other merchant is checked exactly as AlphaPo does.
    """
    key = request.headers.get("X-Processing-Key", "")
    signature = request.headers.get("X-Processing-Signature")
    merchant = await request.app[appkeys.MERCHANTS].get(key) if key else None
    secret = merchant.secret if merchant else _DUMMY_SECRET
    timestamp = None
    signed = body
    if merchant is not None and merchant.require_timestamp:
        timestamp = _timestamp(request)
        signed = timestamped_message(str(timestamp), body)
    if not verify(secret, signed, signature) or merchant is None:
        raise bad_signature()
    settings = request.app[appkeys.SETTINGS]
    if timestamp is not None and signature is not None:
        await _refuse_replay(request, merchant, timestamp, signature)
    await ratelimit.check(
        request.app[appkeys.REDIS], "m", merchant.key, settings.rate_limit_merchant
    )
    return merchant


# Unix seconds, as digits only (no sign, fraction or exponent): 10 digits until 2286.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def _timestamp(request: web.Request) -> int:
    """The X-Processing-Timestamp header as unix seconds; 403 when missing or malformed."""
    raw = request.headers.get(TIMESTAMP_HEADER, "")
    if not _TIMESTAMP.fullmatch(raw):
        raise bad_timestamp()
    return int(raw)


async def _refuse_replay(
    request: web.Request, merchant: Merchant, timestamp: int, signature: str
) -> None:
    """403 unless the (verified) timestamp is within the window and the signature is new."""
    window = request.app[appkeys.SETTINGS].replay_window_seconds
    now = request.app[appkeys.SERVICE].now()
    if abs(now - timestamp) > window:
        raise bad_timestamp()
    # Remember it until its timestamp leaves the window; the window check refuses it then.
    ttl = timestamp + window - now + 1
    if not await first_use(request.app[appkeys.REDIS], merchant.key, signature, ttl):
        raise replayed()


async def merchant_request(request: web.Request, model: type[Model]) -> tuple[Merchant, Model]:
    """Read, authenticate and validate a merchant API request."""
    body = await read_body(request)
    merchant = await authenticate_merchant(request, body)
    return merchant, validate(model, parse_json(request, body))


def client_address(request: web.Request) -> str:
    """The caller's address; behind a trusted proxy, the last X-Forwarded-For hop.

    Every X-Forwarded-For line counts, in order: HAProxy's `option forwardfor`
    adds its own line after whatever the client sent, so reading only the first
    line would hand the client's own claim to the rate limiter.
    """
    if request.app[appkeys.SETTINGS].trust_forwarded:
        forwarded = ",".join(request.headers.getall("X-Forwarded-For", []))
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1]
    return request.remote or "unknown"


async def public_rate_limit(request: web.Request) -> None:
    settings = request.app[appkeys.SETTINGS]
    await ratelimit.check(
        request.app[appkeys.REDIS], "p", client_address(request), settings.rate_limit_public
    )
