"""Every Redis key name coinvoice uses, built in one place.

The layout is documented in docs/architecture.md. All keys share the
``cv:`` prefix so one Redis can be shared with arq's own keys (``arq:*``).
"""

from __future__ import annotations

PREFIX = "cv:"

INVOICE_IDS = PREFIX + "invoice:ids"  # INCR counter
ADDRESS_IDS = PREFIX + "address:ids"  # INCR counter: DepositAddress.id, global over currencies
TIMERS = PREFIX + "timers"  # zset invoice id → fire time
UPDATES = PREFIX + "updates"  # stream of accepted processing callbacks
UPDATES_GROUP = PREFIX + "appliers"  # its consumer group
ORPHANS = PREFIX + "orphans"  # hash "{tx id}:{state}" → deposit no invoice owns
UPDATES_PARKED = PREFIX + "updates:parked"  # hash → updates that could not be applied
INGEST_STATS = PREFIX + "stats:ingest"  # hash counter → value, summed over all workers
DELIVERY_DUE = PREFIX + "dlv:due"  # zset invoice id → next attempt time
MAIL_DUE = PREFIX + "mail:due"  # zset "{invoice id}:{cause}" → due time
MERCHANTS = PREFIX + "merchants"  # set of merchant keys
WORKERS = PREFIX + "workers"  # zset worker name → last heartbeat (unix seconds)
# INCR counter a sender bumps before WAIT, so the WAIT covers every commit it has read.
FENCE = PREFIX + "fence"


def merchant(key: str) -> str:
    return f"{PREFIX}merchant:{key}"


def invoice(invoice_id: int) -> str:
    return f"{PREFIX}inv:{invoice_id}"


def foreign_id(merchant_key: str, foreign: str) -> str:
    return f"{PREFIX}fid:{merchant_key}:{foreign}"


def token(public_token: str) -> str:
    return f"{PREFIX}tok:{public_token}"


def address(currency: str, addr: str) -> str:
    return f"{PREFIX}addr:{currency}:{addr}"


def hd_index(currency: str) -> str:
    return f"{PREFIX}hd:{currency}"


def address_pool(currency: str) -> str:
    return f"{PREFIX}pool:{currency}"


def address_pool_known(currency: str) -> str:
    """Set of every address ever loaded into the pool, so a reload never pushes one twice."""
    return f"{PREFIX}pool-known:{currency}"


def balance(merchant_key: str) -> str:
    return f"{PREFIX}bal:{merchant_key}"


def ledger(merchant_key: str) -> str:
    return f"{PREFIX}ledger:{merchant_key}"


def delivery(invoice_id: int) -> str:
    return f"{PREFIX}dlv:{invoice_id}"


def delivery_log(invoice_id: int) -> str:
    return f"{PREFIX}dlog:{invoice_id}"


def mails(invoice_id: int) -> str:
    return f"{PREFIX}mails:{invoice_id}"


def rate_limit(scope: str, who: str, second: int) -> str:
    return f"{PREFIX}rl:{scope}:{who}:{second}"
