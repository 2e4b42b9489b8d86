"""Settings: one typed object, parsed once at start-up and passed down.

Every value comes from a ``COINVOICE_*`` environment variable or from a TOML
file named by ``COINVOICE_CONFIG`` (environment wins), and every one has a
working default for a local run (spec §11).
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# Spec §9: 1, 5, 10, 15, 20, 30, 60, 90, 120, 150, 180, 210, 240 minutes.
DEFAULT_RETRY_SCHEDULE = tuple(
    minutes * 60 for minutes in (1, 5, 10, 15, 20, 30, 60, 90, 120, 150, 180, 210, 240)
)
# Processing and merchant request bodies are limited to 64 KiB (spec §6).
MAX_BODY_BYTES = 64 * 1024
# Demo processing key pair: fine for a laptop, refused nowhere, logged as a warning.
DEMO_PROCESSING_KEY = "demo-processing-key"
DEMO_PROCESSING_SECRET = "demo-processing-secret"  # noqa: S105 - a documented demo value
# The live market sources worker/rates/ can read (COINVOICE_RATES_SOURCES).
RateSourceName = Literal["kraken", "bitstamp", "coinbase", "ecb"]


def _split_pairs(value: object) -> object:
    """``"BTC=86400,ETH=3600"`` → ``{"BTC": "86400", "ETH": "3600"}``; dicts pass through."""
    if not isinstance(value, str):
        return value
    pairs: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        name, sep, raw = item.partition("=")
        if not sep or not name.strip() or not raw.strip():
            raise ValueError(f"expected CURRENCY=VALUE pairs, got {item!r}")
        pairs[name.strip().upper()] = raw.strip()
    return pairs


def _host_port(item: str) -> tuple[str, int]:
    """``" 10.0.0.1:26379 "`` → ``("10.0.0.1", 26379)``; the port is required."""
    host, sep, port = item.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {item.strip()!r}")
    return host.strip("[]"), int(port)


class Settings(BaseSettings):
    """All configuration of receiver, worker and CLI."""

    model_config = SettingsConfigDict(env_prefix="COINVOICE_", extra="ignore", frozen=True)

    # Unset: `coinvoice up` runs an embedded Redis and exports its URL to its children.
    redis_url: str | None = None
    # Sentinel mode (spec §11): "host:port,host:port"; set, it wins over redis_url and
    # every process asks the Sentinels for the current primary of `redis_sentinel_master`.
    redis_sentinels: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()
    redis_sentinel_master: str = "coinvoice"
    # A write is acknowledged (200, or a callback sent) only once this many replicas
    # hold it (Redis WAIT); fewer within redis_wait_timeout_ms (milliseconds) is a 503.
    redis_min_replicas: int = Field(default=0, ge=0)
    # Redis Cluster mode (spec §11): "host:port,host:port", any reachable nodes; set, it wins
    # over redis_url and redis_sentinels.
    redis_cluster_nodes: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()
    # Partitions of the updates stream and of the invoices with their schedules (spec §11).
    # Part of the data layout: an invoice id says its partition, so it is fixed per deployment.
    stream_partitions: int = Field(default=16, ge=1, le=1024)
    # Cluster mode: arq's own Redis (its queue and cron bookkeeping; nothing durable).
    # arq speaks to one Redis, not a cluster. Unset: arq uses redis_url.
    arq_redis_url: str | None = None
    redis_wait_timeout_ms: int = Field(default=1000, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Base of invoice URLs handed to customers; defaults to http://host:port.
    public_url: str | None = None

    # Invoice timer (types 2 and 3 from creation, type 1 from confirmation).
    timer_seconds: int = Field(default=900, gt=0)
    # How long an invoice may stay `processing` before it fails (seconds).
    processing_window_seconds: int = Field(default=86_400, gt=0)
    # Per-currency overrides of the processing window: "BTC=86400,ETH=3600".
    processing_windows: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    # Timers fire this long after `expires_at`, so callbacks in flight apply first.
    expiry_grace_seconds: int = Field(default=30, ge=0)

    # Seconds between delivery attempts after each failure: "60,300,600".
    callback_retry_schedule: Annotated[tuple[int, ...], NoDecode] = DEFAULT_RETRY_SCHEDULE
    # A delivery is successful on any 2xx within this many seconds.
    callback_timeout_seconds: float = Field(default=10.0, gt=0)
    # Tests and local demos post callbacks to 127.0.0.1; production must not.
    allow_private_callbacks: bool = False

    # Updates a worker took but did not acknowledge for this long (it died) are
    # taken over by another worker and applied again (a no-op if they had been).
    reclaim_idle_seconds: float = Field(default=30.0, gt=0)
    # SIGTERM to exit: a receiver drains (readiness 503, still serving) then finishes
    # open requests; a worker finishes the batch and deliveries in hand (spec §11).
    shutdown_seconds: float = Field(default=20.0, gt=0)

    processing_key: str = DEMO_PROCESSING_KEY
    processing_secret: SecretStr = SecretStr(DEMO_PROCESSING_SECRET)

    # SMTP URL (smtp://user:pass@host:port, smtps:// for TLS); unset: write to the Maildir.
    smtp_url: SecretStr | None = None
    maildir: Path = Path(".coinvoice/maildir")
    mail_from: str = "coinvoice <no-reply@coinvoice.invalid>"

    # json: one JSON object per line; console: for a terminal. Unset: console on a TTY.
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Requests per second per merchant key / per client address; 0 disables.
    rate_limit_merchant: int = Field(default=200, ge=0)
    rate_limit_public: int = Field(default=20, ge=0)
    # Take the client address from X-Forwarded-For (only behind a trusted proxy).
    trust_forwarded: bool = False
    # Merchants with replay protection (`merchant add --require-timestamp`): how far
    # X-Processing-Timestamp may be from our clock either way (seconds); a signature
    # is remembered, and refused a second time, while its timestamp is this fresh.
    replay_window_seconds: int = Field(default=300, gt=0)

    # Slow clients (slowloris): a request head must arrive within this many seconds of
    # its first byte (of the connection opening, for the first request), and a body
    # (at most 64 KiB) within this many seconds of its head; otherwise 408 and closed.
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    body_timeout_seconds: float = Field(default=20.0, gt=0)
    # An idle keep-alive connection is closed after this many seconds (keep it above
    # the load balancer's idle timeout, 60 s on most, so the balancer closes first).
    keepalive_seconds: float = Field(default=75.0, gt=0)
    # Open connections per client address; more are answered 429 and closed. 0 disables.
    # Behind a load balancer every connection comes from it: raise this, or set 0.
    max_connections_per_client: int = Field(default=64, ge=0)

    # Rates (prices per currency) and HD extended public keys; unset: the bundled demo files.
    rates_file: Path | None = None
    # Live exchange rates (spec §11): market sources read by one worker into Redis.
    # Empty: the rates file's prices, which never go stale (the default, tests, `up`).
    rates_sources: Annotated[tuple[RateSourceName, ...], NoDecode] = ()
    # How often the leading worker reads the sources (seconds).
    rates_refresh_seconds: float = Field(default=15.0, gt=0)
    # A price older than this is never quoted: create and confirm answer 503 (seconds).
    rates_max_age_seconds: int = Field(default=120, gt=0)
    # With three or more sources, one further than this from their median is dropped
    # (percent); two that differ by more than it give no price at all.
    rates_max_spread_percent: Decimal = Field(default=Decimal(2), gt=0, lt=100)
    # One source's answer must arrive within this (seconds); a slow source is skipped.
    rates_timeout_seconds: float = Field(default=5.0, gt=0)
    # Base URLs of the sources (tests replay recorded answers from a local server).
    rates_url_kraken: str = "https://api.kraken.com"
    rates_url_bitstamp: str = "https://www.bitstamp.net"
    rates_url_coinbase: str = "https://api.coinbase.com"
    rates_url_ecb: str = "https://www.ecb.europa.eu"
    xpubs: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # Optional preloaded deposit addresses: a TOML file {CURRENCY = ["addr", ...]}.
    address_pool_file: Path | None = None

    # Where `coinvoice up` keeps the embedded Redis data and the demo Maildir.
    data_dir: Path = Path(".coinvoice")

    @field_validator("processing_windows", "xpubs", mode="before")
    @classmethod
    def _pairs(cls, value: object) -> object:
        return _split_pairs(value)

    @field_validator("rates_sources", mode="before")
    @classmethod
    def _sources(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
        return value

    @field_validator("redis_sentinels", "redis_cluster_nodes", mode="before")
    @classmethod
    def _sentinels(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(_host_port(item) for item in value.split(",") if item.strip())
        return value

    @field_validator("callback_retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        return value

    @field_validator("callback_retry_schedule")
    @classmethod
    def _schedule_positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(v <= 0 for v in value):
            raise ValueError("every retry delay must be a positive number of seconds")
        return value

    @property
    def base_url(self) -> str:
        """Public base URL without a trailing slash."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def uses_demo_processing_secret(self) -> bool:
        return self.processing_secret.get_secret_value() == DEMO_PROCESSING_SECRET

    @property
    def live_rates(self) -> bool:
        """Prices come from market sources through Redis rather than the rates file."""
        return bool(self.rates_sources)

    def rates_url(self, source: RateSourceName) -> str:
        """The base URL of a market source, without a trailing slash."""
        url: str = getattr(self, f"rates_url_{source}")
        return url.rstrip("/")

    def processing_window(self, currency: str) -> int:
        """Seconds a `processing` invoice paid in `currency` may wait for confirmations."""
        return self.processing_windows.get(currency, self.processing_window_seconds)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("COINVOICE_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings once (environment, then the optional TOML file)."""
    return Settings(**overrides)
