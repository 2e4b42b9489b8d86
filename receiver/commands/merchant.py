"""`coinvoice merchant add`: check the callback URL the way delivery will, then register.

A callback URL that delivery would refuse (not http(s), or resolving to a
private, loopback or link-local address while COINVOICE_ALLOW_PRIVATE_CALLBACKS
is off) is refused here, at once and with the reason, instead of every callback
being dead-lettered later. The check is the delivery guard's own
(`worker.outbox.destinations.check_destination`).
"""

from __future__ import annotations

from worker.outbox.destinations import DestinationRefused, check_destination


def callback_url_problem(url: str, allow_private: bool) -> str | None:
    """Why callbacks to `url` would never be delivered, or None when they can be."""
    try:
        check_destination(url, allow_private)
    except DestinationRefused as exc:
        return str(exc)
    return None


PRIVATE_HINT = (
    "callbacks to private, loopback or link-local addresses are delivered only with "
    "COINVOICE_ALLOW_PRIVATE_CALLBACKS=1 (tests and local demos)"
)
