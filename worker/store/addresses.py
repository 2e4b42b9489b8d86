"""Deposit-address allocation in Redis: a preloaded pool first, then HD derivation.

Both sources are consumed with one atomic Lua step (LPOP / INCR), so any number
of processes can allocate at once; an address is never handed out twice. The
derivation itself and address validation are `worker.domain.addresses`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources

import structlog
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from worker.domain.addresses import (
    MAX_HD_INDEX,
    POOL_LOAD_BATCH,
    HdAccount,
    NoAddressAvailable,
    canonical_address,
)
from worker.domain.models import DepositAddress
from worker.store import keys

log = structlog.get_logger(__name__)


@cache
def _lua(name: str) -> str:
    return resources.files("worker.store").joinpath("lua", f"{name}.lua").read_text()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def load_pool(redis: Redis, pool: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """Add preloaded addresses to the pools; returns how many were new per currency.

    Idempotent across restarts and concurrent starts: an address ever loaded
    before (even one handed out since) is not pushed again. Addresses of the
    currencies coinvoice can validate are validated first; one bad address
    refuses the whole load, before anything is written.
    """
    batches: dict[str, list[str]] = {}
    for currency, addresses in pool.items():
        listed: list[str] = []
        bad: list[str] = []
        for address in addresses:
            try:
                if not address or address != address.strip():
                    raise ValueError(address)
                listed.append(canonical_address(currency, address))
            except ValueError:
                bad.append(address)
        if bad:
            shown = ", ".join(map(repr, bad[:5]))
            raise ValueError(f"invalid {currency} pool address(es): {shown}")
        batches[currency] = listed
    script = redis.register_script(_lua("address_pool_load"))
    added: dict[str, int] = {}
    for currency, listed in batches.items():
        added[currency] = 0
        for start in range(0, len(listed), POOL_LOAD_BATCH):
            chunk = listed[start : start + POOL_LOAD_BATCH]
            added[currency] += int(
                await script(
                    keys=[keys.address_pool(currency), keys.address_pool_known(currency)],
                    args=chunk,
                )
            )
    return added


class RedisAddressProvider:
    """Addresses from the preloaded pool first, then HD derivation; state in Redis.

    Any number of instances, in any number of processes, may share one Redis:
    every pool entry and every derivation index is taken by one atomic step.
    """

    def __init__(
        self,
        redis: Redis,
        xpubs: Mapping[str, str],
        pool: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        """Parse every key now, so a bad configuration fails at start-up."""
        self._redis = redis
        self._accounts = {currency: HdAccount(currency, key) for currency, key in xpubs.items()}
        self._pool = {currency: list(addresses) for currency, addresses in (pool or {}).items()}
        self._pool_loaded = not self._pool
        self._pool_lock = asyncio.Lock()
        self._allocate: AsyncScript = redis.register_script(_lua("address_allocate"))

    async def load_pool(self) -> dict[str, int]:
        """Load this provider's preloaded addresses (idempotent; also done on first use)."""
        async with self._pool_lock:
            added = await load_pool(self._redis, self._pool)
            self._pool_loaded = True
        if any(added.values()):
            log.info("address_pool_loaded", added=added)
        return added

    async def allocate(self, currency: str) -> DepositAddress:
        """A deposit address of `currency` no caller has ever received before."""
        if not self._pool_loaded:
            async with self._pool_lock:
                # Pool addresses must be in Redis before the first HD fallback.
                if not self._pool_loaded:
                    await load_pool(self._redis, self._pool)
                    self._pool_loaded = True
        account = self._accounts.get(currency)
        reply = await self._allocate(
            keys=[keys.address_pool(currency), keys.hd_index(currency), keys.ADDRESS_IDS],
            args=["1" if account is not None else "0"],
        )
        if not reply:
            raise NoAddressAvailable(currency)
        address_id, source, value = int(reply[0]), _text(reply[1]), reply[2]
        if source == "pool":
            address = _text(value)
        else:
            index = int(value)
            if account is None:  # unreachable: the script derives only when told of a key
                raise NoAddressAvailable(currency)
            if index > MAX_HD_INDEX:
                raise NoAddressAvailable(currency, "HD index space exhausted")
            address = account.address(index)
        log.info("address_allocated", currency=currency, address_id=address_id, source=source)
        return DepositAddress(id=address_id, currency=currency, address=address)
