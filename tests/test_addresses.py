"""Deposit addresses: HD derivation, the pool, allocation races, validation, payment URIs.

Every known answer is checked against the well-known BIP39 test mnemonic,
derived here independently through bip-utils' full BIP44/84 path from the seed.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from bip_utils import (
    BchBech32Encoder,
    Bip39SeedGenerator,
    Bip44,
    Bip44Changes,
    Bip44Coins,
    Bip49,
    Bip49Coins,
    Bip84,
    Bip84Coins,
    Bip86,
    Bip86Coins,
    P2PKHAddrEncoder,
    SegwitBech32Encoder,
)

from worker.domain.addresses import (
    HdAccount,
    NoAddressAvailable,
    canonical_address,
    demo_key_currencies,
    demo_xpubs,
    payment_uri,
    read_pool_file,
    validate_address,
    xpubs_for,
)
from worker.store import keys
from worker.store.addresses import RedisAddressProvider, load_pool
from worker.store.redis_server import RedisServer

MNEMONIC = "abandon " * 11 + "about"
CURRENCIES = ("BTC", "LTC", "BCH", "ETH", "USDTT")
# Per-address derivation budget (seconds): ~0.15 ms measured; 10x headroom for slow CI.
DERIVATION_BUDGET_SECONDS = 0.002


@cache
def _seed() -> bytes:
    """The BIP39 seed of the test mnemonic (empty passphrase)."""
    return bytes(Bip39SeedGenerator(MNEMONIC).Generate())


@cache
def _account(currency: str, account: int = 0) -> Bip44 | Bip84:
    """The BIP44/84 account of the test mnemonic, derived from the seed (not from an xpub)."""
    seed = _seed()
    if currency in ("BTC", "LTC"):
        coin84 = {"BTC": Bip84Coins.BITCOIN, "LTC": Bip84Coins.LITECOIN}[currency]
        return Bip84.FromSeed(seed, coin84).Purpose().Coin().Account(account)
    coin44 = {
        "BCH": Bip44Coins.BITCOIN_CASH,
        "ETH": Bip44Coins.ETHEREUM,
        "USDTT": Bip44Coins.TRON,
    }[currency]
    return Bip44.FromSeed(seed, coin44).Purpose().Coin().Account(account)


def expected_address(currency: str, index: int, account: int = 0) -> str:
    """The address at <account>/0/index, derived independently from the mnemonic."""
    node = _account(currency, account).Change(Bip44Changes.CHAIN_EXT).AddressIndex(index)
    return str(node.PublicKey().ToAddress())


def xpub(currency: str, account: int = 0) -> str:
    return str(_account(currency, account).PublicKey().ToExtended())


def _first(bip: Any) -> str:
    """Address m/purpose'/coin'/0'/0/0 of a bip-utils BIP44-family object from the seed."""
    node = bip.Purpose().Coin().Account(0).Change(Bip44Changes.CHAIN_EXT).AddressIndex(0)
    return str(node.PublicKey().ToAddress())


# --- derivation --------------------------------------------------------------------


def test_first_btc_address_is_the_published_bip84_vector() -> None:
    """The first BIP84 address of the test mnemonic is the published bc1qcr8te4kr…306fyu."""
    account = HdAccount("BTC", demo_xpubs()["BTC"])
    assert account.address(0) == "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"


@pytest.mark.parametrize("currency", CURRENCIES)
def test_derivation_matches_the_full_path_from_the_seed(currency: str) -> None:
    """Addresses derived from the account xpub equal those of the full path from the seed."""
    account = HdAccount(currency, demo_xpubs()[currency])
    for index in (0, 1, 2, 19, 1000, 2**31 - 1):
        assert account.address(index) == expected_address(currency, index)


@pytest.mark.parametrize(
    ("currency", "first"),
    [
        ("LTC", "ltc1q"),
        ("BCH", "bitcoincash:q"),
        ("ETH", "0x"),
        ("USDTT", "T"),
    ],
)
def test_each_currency_uses_its_network_format(currency: str, first: str) -> None:
    """LTC is native segwit, BCH CashAddr, ETH checksummed hex, USDTT a Tron address."""
    address = HdAccount(currency, demo_xpubs()[currency]).address(0)
    assert address.startswith(first)
    assert validate_address(currency, address)


@pytest.mark.parametrize("currency", CURRENCIES)
def test_demo_file_holds_the_test_mnemonics_account_xpubs(currency: str) -> None:
    """worker/data/demo_xpubs.toml is exactly the test mnemonic's account-level public keys."""
    assert demo_xpubs()[currency] == xpub(currency)


def test_ethereum_and_tron_demo_addresses_are_the_published_ones() -> None:
    """ETH and Tron first addresses match the values every wallet shows for the test mnemonic."""
    assert demo_xpubs().keys() == set(CURRENCIES)
    assert HdAccount("ETH", xpub("ETH")).address(0) == "0x9858EfFD232B4033E47d90003D41EC34EcaEda94"
    assert HdAccount("USDTT", xpub("USDTT")).address(0) == "TUEZSdKsoDHQMeZwihtdoBiN46zxhGWYdH"


def test_a_private_extended_key_is_refused_without_echoing_it() -> None:
    """Configuring an xprv is refused, and the error never contains the key."""
    private = str(_account("BTC").PrivateKey().ToExtended())
    with pytest.raises(ValueError, match="PRIVATE") as caught:
        HdAccount("BTC", private)
    assert private not in str(caught.value)


@pytest.mark.parametrize(
    ("currency", "key"),
    [
        pytest.param("BTC", "not-a-key", id="garbage"),
        pytest.param("BTC", xpub("BTC")[:-1] + "t", id="bad-checksum"),
        pytest.param("ETH", xpub("BTC"), id="zpub-for-eth"),
        pytest.param("DOGE", xpub("BCH"), id="unsupported-currency"),
    ],
)
def test_a_malformed_or_foreign_key_is_refused(currency: str, key: str) -> None:
    """A garbage, corrupted, other-network or unsupported-currency key is refused."""
    with pytest.raises(ValueError):
        HdAccount(currency, key)


def test_a_key_that_is_not_account_level_is_refused() -> None:
    """Only the account-level key (depth 3, hardened) is accepted, not the external chain key."""
    chain_key = _account("ETH").Change(Bip44Changes.CHAIN_EXT).PublicKey().ToExtended()
    with pytest.raises(ValueError, match="account-level"):
        HdAccount("ETH", chain_key)


@pytest.mark.parametrize("currency", CURRENCIES)
def test_derivation_is_cheap_enough_for_the_event_loop(currency: str) -> None:
    """One derivation from the cached chain key stays far below 2 ms."""
    account = HdAccount(currency, demo_xpubs()[currency])
    count = 200
    started = time.perf_counter()
    for index in range(count):
        account.address(index)
    assert (time.perf_counter() - started) / count < DERIVATION_BUDGET_SECONDS


# --- configuration ------------------------------------------------------------------


def test_configured_keys_override_the_demo_keys_per_currency() -> None:
    """xpubs_for keeps the demo keys and replaces only the configured currencies."""
    merged = xpubs_for({"btc": xpub("BTC", account=1)})
    assert merged["BTC"] == xpub("BTC", account=1)
    assert merged["ETH"] == demo_xpubs()["ETH"]
    assert demo_key_currencies(merged) == ("LTC", "BCH", "ETH", "USDTT")


def test_pool_file_is_read_per_currency(tmp_path: Path) -> None:
    """A pool file maps each currency to its list of addresses."""
    path = tmp_path / "pool.toml"
    path.write_text(f'btc = ["{expected_address("BTC", 0, account=1)}"]\n')
    assert read_pool_file(path) == {"BTC": [expected_address("BTC", 0, account=1)]}


# --- allocation ------------------------------------------------------------------------


def _pool(currency: str, count: int) -> list[str]:
    """Valid addresses of another account, so they never collide with HD account 0."""
    return [expected_address(currency, index, account=1) for index in range(count)]


async def pooled(redis: aioredis.Redis, currency: str) -> list[str]:
    """The addresses waiting in a currency's pool, in order."""
    entries = await redis.lrange(keys.address_pool(currency), 0, -1)  # type: ignore[misc]
    return [entry.decode() for entry in entries]


async def test_pool_is_used_first_then_hd_derivation(redis: aioredis.Redis) -> None:
    """Preloaded addresses go out first, in order; then HD index 0, 1, …"""
    pool = _pool("BTC", 2)
    provider = RedisAddressProvider(redis, {"BTC": xpub("BTC")}, {"BTC": pool})
    given = [await provider.allocate("BTC") for _ in range(4)]
    assert [a.address for a in given] == [
        *pool,
        expected_address("BTC", 0),
        expected_address("BTC", 1),
    ]
    assert [a.id for a in given] == [1, 2, 3, 4]
    assert all(a.currency == "BTC" and a.tag is None for a in given)


async def test_address_ids_are_global_across_currencies(redis: aioredis.Redis) -> None:
    """DepositAddress.id comes from one counter shared by every currency."""
    provider = RedisAddressProvider(redis, demo_xpubs())
    ids = [(await provider.allocate(currency)).id for currency in CURRENCIES]
    assert ids == [1, 2, 3, 4, 5]
    assert int(await redis.get(keys.ADDRESS_IDS) or 0) == 5


@pytest.mark.parametrize("currency", CURRENCIES)
async def test_hd_allocation_starts_at_index_zero(redis: aioredis.Redis, currency: str) -> None:
    """The first HD address handed out is index 0 of the external chain."""
    provider = RedisAddressProvider(redis, demo_xpubs())
    assert (await provider.allocate(currency)).address == expected_address(currency, 0)


async def test_200_concurrent_allocations_are_all_distinct(redis: aioredis.Redis) -> None:
    """200 concurrent allocations give 200 distinct addresses and 200 distinct ids."""
    pool = _pool("BTC", 50)
    provider = RedisAddressProvider(redis, {"BTC": xpub("BTC")}, {"BTC": pool})
    given = await asyncio.gather(*(provider.allocate("BTC") for _ in range(200)))
    assert len({a.address for a in given}) == 200
    assert len({a.id for a in given}) == 200
    derived = {expected_address("BTC", index) for index in range(150)}
    assert {a.address for a in given} == set(pool) | derived


async def test_two_processes_never_hand_out_the_same_address(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """Providers on separate connections, racing, share pool and index without repeats."""
    other = aioredis.Redis.from_url(redis_server.url)
    try:
        pool = {"LTC": _pool("LTC", 30)}
        first = RedisAddressProvider(redis, {"LTC": xpub("LTC")}, pool)
        second = RedisAddressProvider(other, {"LTC": xpub("LTC")}, pool)
        given = await asyncio.gather(
            *(provider.allocate("LTC") for _ in range(60) for provider in (first, second))
        )
        later = [await second.allocate("LTC") for _ in range(5)]
    finally:
        await other.aclose()
    everything = [*given, *later]
    assert len({a.address for a in everything}) == len(everything) == 125
    assert len({a.id for a in everything}) == 125
    assert {a.address for a in later} == {expected_address("LTC", i) for i in range(90, 95)}


async def test_pool_load_is_idempotent(redis: aioredis.Redis) -> None:
    """Loading the same pool again adds nothing, even after entries were handed out."""
    pool = {"BTC": _pool("BTC", 5)}
    assert await load_pool(redis, pool) == {"BTC": 5}
    assert await load_pool(redis, pool) == {"BTC": 0}
    provider = RedisAddressProvider(redis, {}, pool)  # a restart with the same pool file
    assert (await provider.allocate("BTC")).address == pool["BTC"][0]
    assert await provider.load_pool() == {"BTC": 0}
    assert len(await pooled(redis, "BTC")) == 4


async def test_concurrent_pool_loads_push_each_address_once(redis: aioredis.Redis) -> None:
    """Ten concurrent starts loading one pool put each address in exactly once."""
    pool = {"ETH": _pool("ETH", 20)}
    results = await asyncio.gather(*(load_pool(redis, pool) for _ in range(10)))
    assert sum(r["ETH"] for r in results) == 20
    assert await pooled(redis, "ETH") == pool["ETH"]


async def test_pool_load_counts_two_spellings_of_one_address_once(redis: aioredis.Redis) -> None:
    """CashAddr with or without prefix, upper case or legacy: one address, one pool entry."""
    cashaddr = expected_address("BCH", 0, account=1)
    legacy = P2PKHAddrEncoder.EncodeKey(
        _account("BCH", 1)
        .Change(Bip44Changes.CHAIN_EXT)
        .AddressIndex(0)
        .PublicKey()
        .Bip32Key()
        .KeyObject(),
        net_ver=b"\x00",
    )
    spellings = [cashaddr, cashaddr.removeprefix("bitcoincash:"), cashaddr.upper(), legacy]
    assert await load_pool(redis, {"BCH": spellings}) == {"BCH": 1}
    assert await pooled(redis, "BCH") == [cashaddr]


async def test_pool_load_refuses_an_invalid_address_before_writing(redis: aioredis.Redis) -> None:
    """One invalid pool address refuses the whole load and nothing is written."""
    pool = {"BTC": [*_pool("BTC", 3), "bc1qnotanaddress"]}
    with pytest.raises(ValueError, match="bc1qnotanaddress"):
        await load_pool(redis, pool)
    assert await redis.exists(keys.address_pool("BTC"), keys.address_pool_known("BTC")) == 0


async def test_no_key_and_no_pool_raises_no_address_available(redis: aioredis.Redis) -> None:
    """A currency with neither a key nor pool entries raises NoAddressAvailable and spends no id."""
    provider = RedisAddressProvider(redis, {"BTC": xpub("BTC")})
    with pytest.raises(NoAddressAvailable) as caught:
        await provider.allocate("XRP")
    assert caught.value.currency == "XRP"
    assert await redis.get(keys.ADDRESS_IDS) is None


async def test_a_pool_only_currency_runs_dry(redis: aioredis.Redis) -> None:
    """Without a key, a currency's addresses end with its pool."""
    pool = _pool("USDTT", 2)
    provider = RedisAddressProvider(redis, {}, {"USDTT": pool})
    assert [(await provider.allocate("USDTT")).address for _ in range(2)] == pool
    with pytest.raises(NoAddressAvailable):
        await provider.allocate("USDTT")


async def test_an_exhausted_hd_index_space_raises(redis: aioredis.Redis) -> None:
    """Past the last non-hardened index (2^31 − 1) no address is derived."""
    provider = RedisAddressProvider(redis, {"ETH": xpub("ETH")})
    await redis.set(keys.hd_index("ETH"), 2**31 - 1)
    assert (await provider.allocate("ETH")).address == expected_address("ETH", 2**31 - 1)
    with pytest.raises(NoAddressAvailable, match="exhausted"):
        await provider.allocate("ETH")


# --- validation ----------------------------------------------------------------------


def _mutate_last(address: str, alphabet: str) -> str:
    """The same address with its last character swapped for another of the same alphabet."""
    last = address[-1]
    replacement = next(c for c in alphabet if c != last and c.isupper() == last.isupper())
    return address[:-1] + replacement


BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
GENESIS = "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa"
ETH_OK = "0x9858EfFD232B4033E47d90003D41EC34EcaEda94"
BTC_0 = expected_address("BTC", 0)
LTC_0 = expected_address("LTC", 0)
BCH_0 = expected_address("BCH", 0)
TRON_0 = expected_address("USDTT", 0)
BCH_LEGACY_0 = P2PKHAddrEncoder.EncodeKey(
    _account("BCH")
    .Change(Bip44Changes.CHAIN_EXT)
    .AddressIndex(0)
    .PublicKey()
    .Bip32Key()
    .KeyObject(),
    net_ver=b"\x00",
)

VALID = [
    pytest.param("BTC", BTC_0, id="btc-p2wpkh"),
    pytest.param("BTC", BTC_0.upper(), id="btc-bech32-upper"),
    pytest.param("BTC", SegwitBech32Encoder.Encode("bc", 0, bytes(32)), id="btc-p2wsh"),
    pytest.param("BTC", _first(Bip86.FromSeed(_seed(), Bip86Coins.BITCOIN)), id="btc-taproot"),
    pytest.param("BTC", _first(Bip44.FromSeed(_seed(), Bip44Coins.BITCOIN)), id="btc-p2pkh"),
    pytest.param("BTC", _first(Bip49.FromSeed(_seed(), Bip49Coins.BITCOIN)), id="btc-p2sh"),
    pytest.param("BTC", GENESIS, id="btc-genesis"),
    pytest.param("LTC", LTC_0, id="ltc-p2wpkh"),
    pytest.param("LTC", _first(Bip44.FromSeed(_seed(), Bip44Coins.LITECOIN)), id="ltc-L"),
    pytest.param("LTC", _first(Bip49.FromSeed(_seed(), Bip49Coins.LITECOIN)), id="ltc-M"),
    pytest.param("BCH", BCH_0, id="bch-cashaddr"),
    pytest.param("BCH", BCH_0.removeprefix("bitcoincash:"), id="bch-cashaddr-no-prefix"),
    pytest.param("BCH", BCH_0.upper(), id="bch-cashaddr-upper"),
    pytest.param("BCH", BchBech32Encoder.Encode("bitcoincash", b"\x08", bytes(20)), id="bch-p2sh"),
    pytest.param("BCH", BCH_LEGACY_0, id="bch-legacy"),
    pytest.param("ETH", ETH_OK, id="eth-eip55"),
    pytest.param("ETH", ETH_OK.lower(), id="eth-lower"),
    pytest.param("ETH", "0x" + ETH_OK[2:].upper(), id="eth-upper"),
    pytest.param("USDTT", TRON_0, id="tron"),
]


@pytest.mark.parametrize(("currency", "address"), VALID)
def test_valid_addresses_are_accepted(currency: str, address: str) -> None:
    """Every address form a customer may paste for a refund validates for its network."""
    assert validate_address(currency, address)


INVALID = [
    pytest.param("BTC", _mutate_last(BTC_0, BECH32), id="btc-bech32-checksum"),
    pytest.param("BTC", BTC_0[:10] + BTC_0[10:].upper(), id="btc-mixed-case"),
    pytest.param("BTC", SegwitBech32Encoder.Encode("tb", 0, bytes(20)), id="btc-testnet"),
    pytest.param("BTC", _mutate_last(GENESIS, BASE58), id="btc-base58-checksum"),
    pytest.param("BTC", SegwitBech32Encoder.Encode("bc", 2, bytes(32)), id="btc-witness-v2"),
    pytest.param("BTC", LTC_0, id="btc-given-ltc"),
    pytest.param("BTC", _first(Bip44.FromSeed(_seed(), Bip44Coins.LITECOIN)), id="btc-given-ltc-L"),
    pytest.param("BTC", "", id="btc-empty"),
    pytest.param("BTC", "bc1q" + "q" * 200, id="btc-overlong"),
    pytest.param("BTC", " " + BTC_0, id="btc-whitespace"),
    pytest.param("LTC", _mutate_last(LTC_0, BECH32), id="ltc-checksum"),
    pytest.param("LTC", BTC_0, id="ltc-given-btc"),
    pytest.param("LTC", GENESIS, id="ltc-given-btc-legacy"),
    pytest.param("BCH", _mutate_last(BCH_0, BECH32), id="bch-checksum"),
    pytest.param("BCH", "bchtest:" + BCH_0.removeprefix("bitcoincash:"), id="bch-testnet-prefix"),
    pytest.param(
        "BCH", "bitcoincash:" + BCH_0.removeprefix("bitcoincash:").upper(), id="bch-mixed"
    ),
    pytest.param("BCH", BTC_0, id="bch-given-btc-segwit"),
    pytest.param("ETH", ETH_OK.replace("E", "e", 1), id="eth-wrong-checksum"),
    pytest.param("ETH", ETH_OK[:-1], id="eth-short"),
    pytest.param("ETH", ETH_OK[2:], id="eth-no-0x"),
    pytest.param("ETH", "0x" + "g" * 40, id="eth-not-hex"),
    pytest.param("ETH", TRON_0, id="eth-given-tron"),
    pytest.param("USDTT", _mutate_last(TRON_0, BASE58), id="tron-checksum"),
    pytest.param("USDTT", GENESIS, id="tron-given-btc"),
    pytest.param("USDTT", ETH_OK, id="tron-given-eth"),
    pytest.param("XRP", "rHb9CJAWyB4rj91VRWn96DkukG4bwdtyTh", id="unknown-currency"),
    pytest.param("btc", BTC_0, id="currency-code-is-exact"),
]


@pytest.mark.parametrize(("currency", "address"), INVALID)
def test_invalid_addresses_are_refused(currency: str, address: str) -> None:
    """Corrupted checksums, other networks, mixed case and unknown currencies are refused."""
    assert not validate_address(currency, address)


def test_canonical_address_is_the_stored_spelling() -> None:
    """Bech32 lower case, CashAddr with prefix, Ethereum in checksum case."""
    btc = expected_address("BTC", 0)
    assert canonical_address("BTC", btc.upper()) == btc
    assert canonical_address("ETH", ETH_OK.lower()) == ETH_OK
    bch = expected_address("BCH", 0)
    assert canonical_address("BCH", bch.removeprefix("bitcoincash:").upper()) == bch
    with pytest.raises(ValueError):
        canonical_address("ETH", ETH_OK.replace("E", "e", 1))


# --- payment URIs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "address", "amount", "uri"),
    [
        ("bitcoin", "bc1qx", "0.00180141", "bitcoin:bc1qx?amount=0.00180141"),
        ("bitcoin", "bc1qx", "1.50000000", "bitcoin:bc1qx?amount=1.5"),
        ("bitcoin", "bc1qx", "100.00000000", "bitcoin:bc1qx?amount=100"),
        ("bitcoin", "bc1qx", "0.00000001", "bitcoin:bc1qx?amount=0.00000001"),
        ("litecoin", "ltc1qx", "2", "litecoin:ltc1qx?amount=2"),
        ("bitcoincash", "bitcoincash:qqx", "0.5", "bitcoincash:qqx?amount=0.5"),
        ("bitcoincash", "qqx", "0.5", "bitcoincash:qqx?amount=0.5"),
        ("ethereum", "0xAb", "0.00000001", "ethereum:0xAb?value=10000000000"),
        ("ethereum", "0xAb", "1.25", "ethereum:0xAb?value=1250000000000000000"),
        (None, "TUEZSdKsoDHQMeZwihtdoBiN46zxhGWYdH", "10", "TUEZSdKsoDHQMeZwihtdoBiN46zxhGWYdH"),
    ],
)
def test_payment_uri(scheme: str | None, address: str, amount: str, uri: str) -> None:
    """BIP21 plain-decimal amount; EIP-681 wei for Ethereum; the bare address without a scheme."""
    assert payment_uri(scheme, address, Decimal(amount)) == uri


@pytest.mark.parametrize("amount", ["0", "-1", "NaN", "Infinity"])
def test_payment_uri_refuses_a_non_positive_amount(amount: str) -> None:
    """A QR code never asks for zero, a negative or a non-finite amount."""
    with pytest.raises(ValueError):
        payment_uri("bitcoin", "bc1qx", Decimal(amount))
