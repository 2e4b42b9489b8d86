"""`coinvoice merchant add`: check the callback URL the way delivery will, then register.

A callback URL that delivery would refuse (not http(s), or a private, loopback
or link-local address while COINVOICE_ALLOW_PRIVATE_CALLBACKS is off) is refused
here, at once and with the reason, instead of every callback failing later.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

from worker.outbox.delivery import DestinationRefused, check_destination, is_public

# How long `merchant add` waits for the callback host's name to resolve (seconds).
RESOLVE_TIMEOUT_SECONDS = 3.0


def _resolve(host: str, timeout: float) -> list[str] | None:
    """The addresses `host` resolves to, or None if that fails or takes too long.

    A daemon thread, so a hanging resolver neither blocks the command nor its exit.
    """
    found: list[str] = []

    def lookup() -> None:
        with contextlib.suppress(OSError, UnicodeError):  # unresolvable: decided by the caller
            found.extend(str(info[4][0]) for info in socket.getaddrinfo(host, None))

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return found if found and not thread.is_alive() else None


def callback_url_problem(
    url: str, allow_private: bool, timeout: float = RESOLVE_TIMEOUT_SECONDS
) -> str | None:
    """Why callbacks to `url` would never be delivered, or None when they can be.

    `check_destination` (the delivery loop's own check) refuses other schemes and
    literal private addresses; a name is resolved once here so that `localhost` or a
    name pointing only at private addresses is refused too. A name that does not
    resolve now is accepted: it may exist where the workers run, and delivery checks
    every address it resolves to anyway.
    """
    try:
        check_destination(url, allow_private)
    except DestinationRefused as exc:
        return str(exc)
    host = urlsplit(url).hostname or ""
    if allow_private:
        return None
    addresses = _resolve(host, timeout)
    if addresses and not any(is_public(address) for address in addresses):
        listed = ", ".join(sorted(set(addresses)))
        return f"refused: {host} resolves only to non-public addresses ({listed})"
    return None


PRIVATE_HINT = (
    "callbacks to private, loopback or link-local addresses are delivered only with "
    "COINVOICE_ALLOW_PRIVATE_CALLBACKS=1 (tests and local demos)"
)
