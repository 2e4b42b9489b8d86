"""Refusing cross-site posts to the hosted pages' forms (spec §7).

Two checks, both needed:

* **Origin/Referer.** A browser names the page a form was posted from; one of
  another host is refused. Our pages send `Referrer-Policy: no-referrer`, so a
  browser posts our own forms with `Origin: null` and no Referer: those (and
  clients that send neither) are left to the token.
* **An anti-forgery token (double submit).** Every page sets a random token in
  a `SameSite=Lax`, `HttpOnly` cookie and repeats it in a hidden form field;
  a post must carry both, equal. A browser never sends a Lax cookie with a
  POST started by another site, so a forged form (even from a sandboxed frame
  whose Origin is `null`) cannot match it. Lax rather than Strict: the cookie
  still comes along when the customer follows the e-mailed link from a
  webmail, so a page open in another tab keeps its token. Stateless: any
  receiver behind the load balancer checks it without Redis.

The token protects the customer's browser. It is no secret from whoever holds
the page link (they can read the page); what keeps them from choosing the
refund address is the separate refund token (`handlers.refund_page`).
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from aiohttp import web

from receiver import appkeys

COOKIE = "cv_csrf"
FIELD = "csrf_token"
# 256 random bits in URL-safe base64: 43 characters.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


def token(request: web.Request) -> str:
    """The anti-forgery token for a page: the browser's own, or a new one."""
    current = request.cookies.get(COOKIE, "")
    return current if _TOKEN.fullmatch(current) else secrets.token_urlsafe(32)


def set_cookie(request: web.Request, response: web.StreamResponse, issued: str) -> None:
    """Give the browser the token put on the page (unless it has it already)."""
    if request.cookies.get(COOKIE) == issued:
        return
    secure = request.app[appkeys.SETTINGS].base_url.startswith("https://")
    response.set_cookie(
        COOKIE,
        issued,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=secure,
    )


def _origin(url: str) -> str | None:
    """`scheme://host[:port]` of a URL, lower case; None when it has no host."""
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def _own_origins(request: web.Request) -> set[str | None]:
    """The public URL's origin, and the one the request was addressed to."""
    return {
        _origin(request.app[appkeys.SETTINGS].base_url),
        _origin(f"{request.scheme}://{request.host}"),
    }


def foreign(request: web.Request) -> bool:
    """Does the browser say this request was started by a page of another site?"""
    origin = request.headers.get("Origin")
    if origin is not None and origin.strip() != "null":
        return _origin(origin) not in _own_origins(request)
    referer = request.headers.get("Referer")
    if referer:
        return _origin(referer) not in _own_origins(request)
    return False


def refused(request: web.Request, form: Mapping[str, object]) -> bool:
    """Should this form post be refused as cross-site (403)?"""
    if foreign(request):
        return True
    posted = form.get(FIELD)
    cookie = request.cookies.get(COOKIE, "")
    if not isinstance(posted, str) or not _TOKEN.fullmatch(cookie):
        return True
    return not hmac.compare_digest(posted.encode("ascii", "replace"), cookie.encode("ascii"))
