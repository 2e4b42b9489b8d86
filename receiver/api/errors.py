"""API errors with the exact JSON bodies of spec §6, and the mapping of failures to them.

Handlers raise `ApiError` (or let a domain exception through); the receiver's
middleware (receiver/middleware.py) calls `error_answer`, which turns every
failure — including aiohttp's own 404/405/413 and unexpected exceptions —
into a JSON body, never an HTML page or a traceback.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from redis.exceptions import RedisClusterException, RedisError

from receiver.accesslog import route_pattern
from worker.domain.addresses import NoAddressAvailable
from worker.domain.machine import DomainError, InvalidChoice
from worker.domain.prices import RatesUnavailable
from worker.logs import get_logger
from worker.services.invoices import ConcurrentModification, InvoiceNotFound
from worker.store.invoices import DuplicateForeignId

log = get_logger(__name__)

# A client refused for stale rates may retry after about one refresh (seconds).
RATES_RETRY_AFTER_SECONDS = 15


class ApiError(Exception):
    """An error answer: HTTP status, JSON body, optional headers."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = headers or {}


def bad_signature() -> ApiError:
    return ApiError(403, {"error": "Bad signature header", "code": "bad_header_signature"})


def bad_timestamp() -> ApiError:
    """A replay-protected merchant's X-Processing-Timestamp is missing, malformed or stale."""
    return ApiError(403, {"error": "Bad timestamp header", "code": "bad_header_timestamp"})


def replayed() -> ApiError:
    """A replay-protected merchant's signed request arrived a second time."""
    return ApiError(403, {"error": "Request already received", "code": "replayed_request"})


def cross_site() -> ApiError:
    """A browser named another site as the page this request came from (spec §7)."""
    return ApiError(403, {"error": "Cross-site request refused", "code": "cross_site"})


def bad_content() -> ApiError:
    return ApiError(400, {"error": "Bad content format", "code": "bad_content_format"})


def field_errors(errors: dict[str, str]) -> ApiError:
    return ApiError(400, {"errors": errors})


def not_found() -> ApiError:
    return ApiError(404, {"errors": {"error": "Invoice not found.", "code": "not_found"}})


def too_large() -> ApiError:
    return ApiError(413, {"error": "Request body too large", "code": "payload_too_large"})


def rate_limited(retry_after: int) -> ApiError:
    return ApiError(
        429,
        {"error": "Too many requests", "code": "rate_limited"},
        {"Retry-After": str(retry_after)},
    )


def rates_unavailable() -> ApiError:
    """Spec §11: no quote from a price older than the maximum age; nothing was created."""
    return ApiError(
        503,
        {"error": "Exchange rates unavailable", "code": "rates_unavailable"},
        {"Retry-After": str(RATES_RETRY_AFTER_SECONDS)},
    )


def invalid_state(message: str, code: str = "invalid_invoice_state") -> ApiError:
    return ApiError(400, {"errors": {"error": message, "code": code}})


# Seconds a client is told to wait after a 503 `unavailable` (Redis unreachable, or
# too few replicas confirmed): about one Sentinel failover.
UNAVAILABLE_RETRY_AFTER_SECONDS = 1


def unavailable() -> ApiError:
    """Spec §11: Redis unreachable or a write not confirmed by enough replicas; retry."""
    return ApiError(
        503,
        {"error": "Service unavailable", "code": "unavailable"},
        {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_SECONDS)},
    )


def duplicate_foreign_id() -> ApiError:
    return field_errors({"foreign_id": "The foreign id has already been taken."})


def _from_exception(exc: Exception) -> ApiError | None:
    """The API answer for a domain exception, or None if it is unexpected."""
    match exc:
        case ApiError():
            return exc
        case DuplicateForeignId():
            return duplicate_foreign_id()
        case InvoiceNotFound():
            return not_found()
        case InvalidChoice():
            return invalid_state(exc.message, exc.code)
        case DomainError():
            return invalid_state(exc.message, exc.code)
        case NoAddressAvailable():
            log.error("no_deposit_address", currency=exc.currency)
            return ApiError(
                503,
                {"error": "No deposit address available", "code": "no_address"},
                {"Retry-After": "30"},
            )
        case RatesUnavailable():
            log.warning("rates_unavailable", currencies=list(exc.currencies))
            return rates_unavailable()
        case ConcurrentModification():
            return ApiError(
                503, {"error": "Invoice busy, retry", "code": "conflict"}, {"Retry-After": "1"}
            )
        case RedisError() | RedisClusterException() | OSError():
            # Redis unreachable (redis-py raises a bare OSError when re-opening a pooled
            # connection fails) or ReplicationTimeout: the caller's retry is harmless.
            log.warning("redis_unavailable", error=type(exc).__name__)
            return unavailable()
    return None


def _http_error(exc: web.HTTPException) -> ApiError:
    if exc.status == 413:
        return too_large()
    if exc.status == 404:
        return ApiError(404, {"errors": {"error": "Not found.", "code": "not_found"}})
    return ApiError(exc.status, {"error": exc.reason, "code": exc.reason.lower().replace(" ", "_")})


def json_error(error: ApiError) -> web.Response:
    return web.json_response(error.body, status=error.status, headers=error.headers)


def error_answer(request: web.Request, exc: Exception) -> web.Response:
    """The JSON answer of spec §6 for what a handler raised (called while handling `exc`).

    Not for an HTTPException under 400 (a redirect): that one is re-raised as it is.
    """
    if isinstance(exc, web.HTTPException):
        return json_error(_http_error(exc))
    mapped = _from_exception(exc)
    if mapped is not None:
        return json_error(mapped)
    log.exception("request_failed", route=route_pattern(request), method=request.method)
    return json_error(ApiError(500, {"error": "Internal server error", "code": "internal_error"}))
