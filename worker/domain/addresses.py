"""Deposit addresses: where they come from, and what a valid address looks like.

Spec §7: an `AddressProvider` hands out deposit addresses, never the same one
twice. This module is the pure half: deriving an address from a currency's
account-level extended public key (BIP44/84, external chain), validating and
normalising addresses, payment URIs. Allocation (a preloaded pool first, then
the next derivation index, both taken atomically in Redis) is
`worker.store.addresses.RedisAddressProvider`.

Only public keys are ever configured: coinvoice can derive addresses but never
spend from them. Operational consequences worth knowing:

* Indexes are never reused, and most invoices are never paid, so the wallet
  that holds the private keys must scan with a large gap limit (Electrum's
  default of 20 unused addresses will miss payments).
* The HD counter is per currency, not per key: replacing a currency's key
  continues at the old index (harmless, the new key's low indexes stay unused).

Derivation is CPU work. The external-chain key of every account is derived
once and cached, so each address costs one public child derivation plus the
address hashing: 0.11-0.16 ms per address with coincurve (ETH fastest, LTC
slowest; 0.4-0.5 ms when parsing the key and deriving both steps each time).
That is cheap enough to run on the event loop; tests/test_addresses.py keeps
it under a 2 ms budget.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from bip_utils import (
    Base58Decoder,
    BchBech32Encoder,
    BchP2PKHAddrDecoder,
    BchP2SHAddrDecoder,
    Bip32KeyNetVersions,
    Bip32Slip10Secp256k1,
    Bip44Conf,
    Bip84Conf,
    EthAddrDecoder,
    Kekkak256,
    P2PKHAddrDecoder,
    SegwitBech32Decoder,
    TrxAddrDecoder,
)
from bip_utils.base58 import Base58ChecksumError
from bip_utils.bech32 import Bech32ChecksumError
from bip_utils.bip.bip32 import Bip32KeyError

from worker.domain.models import DepositAddress

# BIP32: indexes from 2^31 on are hardened and cannot be derived from a public key.
MAX_HD_INDEX = 2**31 - 1
# BIP44 path depth of an account key (m / purpose' / coin' / account').
ACCOUNT_DEPTH = 3
# BIP44 "change" level: 0 is the external chain, the one addresses are given out from.
EXTERNAL_CHAIN = 0
# Addresses per pool-load script call: keeps each Redis call short (~1 ms).
POOL_LOAD_BATCH = 1000
# Longer input is no address of any supported network; refused before any
# base58 decoding, whose cost grows with the square of the input length.
MAX_ADDRESS_CHARS = 100
# Wei per ether (EIP-681 `value` is in the smallest unit).
WEI_PER_ETHER = Decimal(10) ** 18

# Extended key version bytes (SLIP-132). The version only labels the key; the
# derivation is the same, so each currency accepts the labels wallets export.
_XPUB = bytes.fromhex("0488b21e")
_ZPUB = bytes.fromhex("04b24746")
_LTUB = bytes.fromhex("019da462")  # Litecoin's own label for xpub
_PRIVATE_VERSIONS = {
    bytes.fromhex("0488ade4"),  # xprv
    bytes.fromhex("04b2430c"),  # zprv
    bytes.fromhex("019d9cfe"),  # Ltpv
}


class NoAddressAvailable(Exception):
    """No deposit address can be handed out for `currency`.

    Its pool is empty and it has no extended public key (or its HD index space
    is exhausted). An operator problem, not the customer's: map it to a 5xx.
    """

    def __init__(
        self, currency: str, reason: str = "pool empty and no extended public key"
    ) -> None:
        super().__init__(f"no deposit address available for {currency}: {reason}")
        self.currency = currency


# --- HD derivation -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Scheme:
    """How one currency derives addresses: its account path and bip-utils coin config."""

    account_path: str  # where the configured key must come from (for messages)
    conf: Any  # bip_utils BipCoinConf: address encoder and its parameters
    public_versions: frozenset[bytes]


_SCHEMES: dict[str, _Scheme] = {
    # Native segwit P2WPKH, bc1q…
    "BTC": _Scheme("m/84'/0'/0'", Bip84Conf.BitcoinMainNet, frozenset({_ZPUB, _XPUB})),
    # Native segwit P2WPKH, ltc1q…
    "LTC": _Scheme("m/84'/2'/0'", Bip84Conf.LitecoinMainNet, frozenset({_ZPUB, _XPUB, _LTUB})),
    # CashAddr P2PKH, bitcoincash:q…
    "BCH": _Scheme("m/44'/145'/0'", Bip44Conf.BitcoinCashMainNet, frozenset({_XPUB})),
    # EIP-55 checksummed 0x…
    "ETH": _Scheme("m/44'/60'/0'", Bip44Conf.Ethereum, frozenset({_XPUB})),
    # USDT (TRC-20) lives at ordinary Tron addresses, T…
    "USDTT": _Scheme("m/44'/195'/0'", Bip44Conf.Tron, frozenset({_XPUB})),
}


class HdAccount:
    """One currency's account-level extended public key, ready to derive addresses.

    Parsing and the account → external-chain step happen once here; each
    `address(index)` is then a single public child derivation.
    """

    def __init__(self, currency: str, extended_key: str) -> None:
        scheme = _SCHEMES.get(currency)
        if scheme is None:
            raise ValueError(f"no HD derivation scheme for {currency}")
        self.currency = currency
        self._scheme = scheme
        self._chain = _parse_account(currency, scheme, extended_key).ChildKey(EXTERNAL_CHAIN)

    def address(self, index: int) -> str:
        """The external-chain address at `index` (0 ≤ index ≤ 2^31 − 1)."""
        if not 0 <= index <= MAX_HD_INDEX:
            raise ValueError(f"HD index out of range: {index}")
        public_key = self._chain.ChildKey(index).PublicKey().KeyObject()
        conf = self._scheme.conf
        return str(conf.AddrClass().EncodeKey(public_key, **conf.AddrParams()))


def _parse_account(currency: str, scheme: _Scheme, extended_key: str) -> Any:
    """Decode an account-level extended public key; refuse anything else.

    Error messages never repeat the key: a public key still reveals every
    address (and so every payment) of the account.
    """
    where = f"{currency} extended key"
    try:
        version = Base58Decoder.CheckDecode(extended_key.strip())[:4]
    except (ValueError, Base58ChecksumError):
        raise ValueError(f"{where}: not a base58check extended key") from None
    if version in _PRIVATE_VERSIONS:
        raise ValueError(f"{where}: is a PRIVATE key; configure the account's extended public key")
    if version not in scheme.public_versions:
        raise ValueError(f"{where}: unexpected version {version.hex()} for this currency")
    try:
        account = Bip32Slip10Secp256k1.FromExtendedKey(
            extended_key.strip(),
            Bip32KeyNetVersions(version, scheme.conf.KeyNetVersions().Private()),
        )
    except (ValueError, Bip32KeyError):
        raise ValueError(f"{where}: not a valid extended public key") from None
    if account.Depth().ToInt() != ACCOUNT_DEPTH or not account.Index().IsHardened():
        raise ValueError(f"{where}: must be the account-level key ({scheme.account_path})")
    return account


# --- demo keys and configuration ----------------------------------------------


@cache
def _demo_table() -> dict[str, str]:
    text = resources.files("worker").joinpath("data/demo_xpubs.toml").read_text()
    return {currency: str(key) for currency, key in tomllib.loads(text).items()}


def demo_xpubs() -> dict[str, str]:
    """The bundled demo keys (worker/data/demo_xpubs.toml). Never for real funds."""
    return dict(_demo_table())


def xpubs_for(settings_xpubs: Mapping[str, str]) -> dict[str, str]:
    """The extended public key per currency: the demo keys, overridden by configured ones."""
    return demo_xpubs() | {currency.upper(): key for currency, key in settings_xpubs.items()}


def demo_key_currencies(xpubs: Mapping[str, str]) -> tuple[str, ...]:
    """The currencies in `xpubs` still on a public demo key: worth a loud start-up warning."""
    demo = _demo_table()
    return tuple(c for c, key in xpubs.items() if demo.get(c) == key)


def read_pool_file(path: Path) -> dict[str, list[str]]:
    """Read a preloaded pool file: TOML ``CURRENCY = ["address", ...]``."""
    table = tomllib.loads(path.read_text())
    pool: dict[str, list[str]] = {}
    for currency, addresses in table.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError(f"{path}: {currency} must be a list of address strings")
        pool[currency.upper()] = addresses
    return pool


# --- validation ------------------------------------------------------------------

_SEGWIT_HRP = {"BTC": "bc", "LTC": "ltc"}
_ETH_SHAPE = re.compile(r"0x[0-9a-fA-F]{40}")
_BCH_HRP = "bitcoincash"
_BCH_PREFIX = _BCH_HRP + ":"
_BCH_P2PKH, _BCH_P2SH = b"\x00", b"\x08"  # CashAddr type bytes
_BTC_P2PKH, _BTC_P2SH = b"\x00", b"\x05"
_LTC_P2PKH, _LTC_P2SH = b"\x30", b"\x32"
# Taproot (witness v1) programs are 32 bytes; v0 is 20 (P2WPKH) or 32 (P2WSH),
# which the decoder checks. Later witness versions have no meaning yet: refused.
_TAPROOT_VERSION, _TAPROOT_PROGRAM_BYTES = 1, 32


def _segwit(hrp: str, address: str) -> bool:
    version, program = SegwitBech32Decoder.Decode(hrp, address)
    return bool(
        version == 0 or (version == _TAPROOT_VERSION and len(program) == _TAPROOT_PROGRAM_BYTES)
    )


def _base58(address: str, *versions: bytes) -> bool:
    """Base58check with a 20-byte hash after one of `versions` (P2PKH and P2SH alike)."""
    for version in versions:
        try:
            P2PKHAddrDecoder.DecodeAddr(address, net_ver=version)
        except ValueError:
            continue
        return True
    return False


def _valid_btc(address: str) -> bool:
    if address.lower().startswith(_SEGWIT_HRP["BTC"] + "1"):
        return _segwit(_SEGWIT_HRP["BTC"], address)
    return _base58(address, _BTC_P2PKH, _BTC_P2SH)


def _valid_ltc(address: str) -> bool:
    if address.lower().startswith(_SEGWIT_HRP["LTC"] + "1"):
        return _segwit(_SEGWIT_HRP["LTC"], address)
    # M… is today's P2SH form; 3… is the deprecated one Litecoin shared with Bitcoin.
    return _base58(address, _LTC_P2PKH, _LTC_P2SH, _BTC_P2SH)


def _valid_bch(address: str) -> bool:
    if address[:1] in ("1", "3"):
        # Legacy form: the same base58 P2PKH / P2SH versions as Bitcoin.
        return _base58(address, _BTC_P2PKH, _BTC_P2SH)
    # CashAddr, prefix optional; the prefix's case must match the rest (no mixed case).
    if ":" not in address:
        address = (_BCH_PREFIX.upper() if address.isupper() else _BCH_PREFIX) + address
    for decoder, version in ((BchP2PKHAddrDecoder, _BCH_P2PKH), (BchP2SHAddrDecoder, _BCH_P2SH)):
        try:
            decoder.DecodeAddr(address, hrp=_BCH_HRP, net_ver=version)
        except ValueError:
            continue
        return True
    return False


def _valid_eth(address: str) -> bool:
    if not _ETH_SHAPE.fullmatch(address):
        return False
    digits = address[2:]
    # EIP-55: single-case hex carries no checksum; mixed case must be the checksum.
    if digits.islower() or digits.isupper() or digits.isdigit():
        return True
    EthAddrDecoder.DecodeAddr(address)
    return True


def _valid_tron(address: str) -> bool:
    TrxAddrDecoder.DecodeAddr(address)
    return True


_VALIDATORS: dict[str, Callable[[str], bool]] = {
    "BTC": _valid_btc,
    "LTC": _valid_ltc,
    "BCH": _valid_bch,
    "ETH": _valid_eth,
    "USDTT": _valid_tron,
}


def validate_address(currency: str, address: str) -> bool:
    """True only for a syntactically valid mainnet address of `currency`'s network.

    Checks encoding, checksum, network prefix and payload length with
    bip-utils' decoders; it cannot know whether anybody holds the key. The
    caller strips surrounding whitespace. Unknown currency: False.
    """
    validator = _VALIDATORS.get(currency)
    if validator is None or not address or len(address) > MAX_ADDRESS_CHARS:
        return False
    try:
        return validator(address)
    except (ValueError, Base58ChecksumError, Bech32ChecksumError):
        return False


def canonical_address(currency: str, address: str) -> str:
    """The one spelling coinvoice stores for a valid address of `currency`.

    Bech32 lower-cased, CashAddr lower-cased with its prefix (legacy BCH
    converted to CashAddr), Ethereum in EIP-55 checksum case; base58 is
    case-sensitive and stays as it is. Two spellings of one address must never
    count as two pool entries. Unknown currencies pass through unchanged.
    """
    if currency in _VALIDATORS and not validate_address(currency, address):
        raise ValueError(f"not a valid {currency} address")
    hrp = _SEGWIT_HRP.get(currency)
    if hrp is not None and address.lower().startswith(hrp + "1"):
        return address.lower()
    if currency == "BCH":
        if address[:1] in ("1", "3"):
            payload = Base58Decoder.CheckDecode(address)
            kind = _BCH_P2PKH if payload[:1] == _BTC_P2PKH else _BCH_P2SH
            return str(BchBech32Encoder.Encode(_BCH_HRP, kind, payload[1:]))
        address = address.lower()
        return address if address.startswith(_BCH_PREFIX) else _BCH_PREFIX + address
    if currency == "ETH":
        return _eip55(address[2:].lower())
    return address


def _eip55(hex_digits: str) -> str:
    """EIP-55: upper-case each hex letter whose nibble in keccak256(lower hex) is ≥ 8."""
    digest = Kekkak256.QuickDigest(hex_digits.encode()).hex()
    return "0x" + "".join(
        c.upper() if int(h, 16) >= 8 else c for c, h in zip(hex_digits, digest, strict=False)
    )


# --- payment URIs ------------------------------------------------------------------


def _plain(amount: Decimal) -> str:
    """`amount` as a plain decimal without exponent or trailing zeros: 1.5, 100, 0.00000001."""
    return format(amount.normalize(), "f")


def payment_uri(uri_scheme: str | None, address: str, amount: Decimal) -> str:
    """The QR payload: a BIP21-style ``scheme:address?amount=…``, or the bare address.

    ``ethereum`` follows EIP-681 instead (``?value=`` in wei), the form Ethereum
    wallets read. A CashAddr that already carries its ``bitcoincash:`` prefix
    keeps a single one.
    """
    if not amount.is_finite() or amount <= 0:
        raise ValueError(f"payment amount must be positive, got {amount}")
    if uri_scheme is None:
        return address
    scheme = uri_scheme.lower()
    if address.lower().startswith(scheme + ":"):
        address = address[len(scheme) + 1 :]
    if scheme == "ethereum":
        wei = amount * WEI_PER_ETHER
        if wei != wei.to_integral_value():
            raise ValueError(f"ether amount finer than 1 wei: {amount}")
        return f"{scheme}:{address}?value={int(wei)}"
    return f"{scheme}:{address}?amount={_plain(amount)}"


# --- allocation ------------------------------------------------------------------------


class AddressProvider(Protocol):
    """Where deposit addresses come from. An address is never handed out twice."""

    async def allocate(self, currency: str) -> DepositAddress:
        """A fresh deposit address of `currency`; raises `NoAddressAvailable`."""
        ...
