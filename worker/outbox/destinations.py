"""Where merchant callbacks may go: the SSRF guard (spec §9).

A callback URL is checked by us, not by the HTTP client: its host is
normalised (every IPv4 spelling `inet_aton` accepts — `2130706433`,
`0177.0.0.1`, `127.1`, `0x7f.1`, `0` — and IPv6 with an embedded IPv4
address), resolved, and refused when any address it resolves to is not on
the public internet. The request then goes to the checked address itself
(`pinned`), so a DNS answer that changes between the check and the connect
(DNS rebinding) can never redirect it. The check runs when a merchant is
registered (`check_destination`) and before every delivery
(`resolve_destination`).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Resolves (host, port) to the IP addresses a connection would go to.
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Checked destinations of URLs with an IP address as their host, kept (see _literal_destination).
LITERAL_CACHE_SIZE = 4096
# IPv4-compatible IPv6 (::a.b.c.d, deprecated by RFC 4291): never a real destination.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# The three spellings of an `inet_aton` part (ASCII only: `int()` would take "١" or "1_0").
_HEX = re.compile(r"0[xX][0-9a-fA-F]*")
_OCTAL = re.compile(r"0[0-7]+")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


class DestinationRefused(OSError):
    """A callback URL we never post to: not http(s), or not a public address."""


@dataclass(frozen=True, slots=True)
class Destination:
    """A checked callback URL and the address the request must connect to."""

    url: str
    host: str
    port: int
    address: str


def _ipv4_part(text: str) -> int | None:
    """One part of an `inet_aton` address: decimal, 0-prefixed octal or 0x-prefixed hex."""
    if _HEX.fullmatch(text):
        return int(text[2:] or "0", 16)
    if _OCTAL.fullmatch(text):
        return int(text, 8)
    if _DECIMAL.fullmatch(text):
        return int(text, 10)
    return None


def _loose_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """`host` read the way `inet_aton` (and so `getaddrinfo`) reads it, or None.

    1–4 parts; the last one fills the remaining bytes, so `127.1` is
    127.0.0.1 and `2130706433` is 127.0.0.1 too.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(parts):
        return None
    numbers = [_ipv4_part(part) for part in parts]
    if any(n is None or n < 0 for n in numbers):
        return None
    *head, last = [n for n in numbers if n is not None]
    if any(n > 0xFF for n in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    value = 0
    for n in head:
        value = value << 8 | n
    return ipaddress.IPv4Address(value << (8 * (4 - len(head))) | last)


def literal_address(host: str) -> IPAddress | None:
    """The IP address `host` spells (any spelling a resolver accepts), or None for a name."""
    bare = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        return _loose_ipv4(bare)


def is_public(address: IPAddress | str) -> bool:
    """Is this an address on the public internet? IPv4 inside IPv6 is judged as IPv4."""
    ip = literal_address(address) if isinstance(address, str) else address
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public(ip.ipv4_mapped)
        if ip in _IPV4_COMPATIBLE:
            return False
        if ip.sixtofour is not None and not is_public(ip.sixtofour):
            return False
        if ip.teredo is not None and not is_public(ip.teredo[1]):
            return False
    refused = (
        ip.is_private,
        ip.is_loopback,
        ip.is_link_local,
        ip.is_multicast,
        ip.is_reserved,
        ip.is_unspecified,
    )
    return ip.is_global and not any(refused)


def _parse(url: str) -> tuple[SplitResult, str, int]:
    """Scheme, host and port of an http(s) URL; DestinationRefused otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise DestinationRefused("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DestinationRefused(f"not an http(s) URL: {parts.scheme or '?'}://")
    return parts, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _checked(url: str, host: str, port: int, found: list[str], allow_private: bool) -> Destination:
    """Refuse unless every address `host` resolved to is public (or private ones are allowed)."""
    if not found:
        raise DestinationRefused(f"refused: {host} resolves to no address")
    if not allow_private:
        refused = sorted({a for a in found if not is_public(a)})
        if refused:
            raise DestinationRefused(
                f"refused: {host} resolves to non-public address {', '.join(refused)}"
            )
    return Destination(url, host, port, found[0])


def _addresses(infos: list[tuple[object, ...]]) -> list[str]:
    """The addresses of getaddrinfo results, in its order, IPv6 zone ids dropped."""
    found: list[str] = []
    for info in infos:
        sockaddr = info[4]
        assert isinstance(sockaddr, tuple)
        address = str(sockaddr[0]).split("%", 1)[0]
        if address not in found:
            found.append(address)
    return found


async def system_resolve(host: str, port: int) -> list[str]:
    """What the system resolver answers for `host` (literals of any spelling included)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except UnicodeError:  # not a host name at all (an empty or over-long label)
        raise DestinationRefused(f"refused: {host[:80]} is not a valid host name") from None
    return _addresses(list(infos))


def _literal_or_none(host: str) -> list[str] | None:
    literal = literal_address(host)
    return None if literal is None else [str(literal)]


@functools.lru_cache(maxsize=LITERAL_CACHE_SIZE)
def _literal_destination(url: str, allow_private: bool) -> Destination | None:
    """The checked destination of a URL whose host is an IP address (None for a name).

    A pure function of its arguments, so it is cached (~25 µs per delivery
    otherwise); a refusal raises and is not cached. Names are never cached.
    """
    _, host, port = _parse(url)
    found = _literal_or_none(host)
    return None if found is None else _checked(url, host, port, found, allow_private)


async def resolve_destination(
    url: str, allow_private: bool, resolve: Resolver = system_resolve
) -> Destination:
    """Check `url` and resolve it once, for one delivery (DestinationRefused if refused).

    A name that does not resolve raises `socket.gaierror` (a transient failure).
    """
    literal = _literal_destination(url, allow_private)
    if literal is not None:
        return literal
    _, host, port = _parse(url)
    return _checked(url, host, port, await resolve(host, port), allow_private)


def check_destination(url: str, allow_private: bool) -> None:
    """Refuse a callback URL at registration: not http(s), or not resolving to public addresses.

    Blocking (it resolves names); for the command line. Raises DestinationRefused.
    """
    _, host, port = _parse(url)
    if allow_private:
        return
    found = _literal_or_none(host)
    if found is None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise DestinationRefused(f"refused: {host} does not resolve ({exc})") from None
        found = _addresses(list(infos))
    _checked(url, host, port, found, allow_private)


@functools.lru_cache(maxsize=LITERAL_CACHE_SIZE)
def pinned(destination: Destination) -> tuple[URL, dict[str, str], str | None]:
    """The request to make: the URL with the checked address as its host, the `Host`
    header of the original URL, and the name TLS must verify the certificate for.

    Cached: a function of the (frozen) destination alone; callers copy the header dict.
    """
    original = URL(destination.url)
    target = original.with_host(destination.address)
    host_header = original.raw_host or destination.host
    if ":" in host_header:  # an IPv6 literal
        host_header = f"[{host_header}]"
    if not original.is_default_port():
        host_header = f"{host_header}:{destination.port}"
    server_hostname = destination.host if original.scheme == "https" else None
    return target, {"Host": host_header}, server_hostname
