"""Sending an e-mail: SMTP (``COINVOICE_SMTP_URL``) or a Maildir folder (the local default).

Failures are told apart: a transient one is retried, a permanent one (a 5xx
refusal of this mail) is recorded and stops.
"""

from __future__ import annotations

import asyncio
import mailbox
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from worker.config import Settings
from worker.logs import get_logger
from worker.mail.render import one_line

log = get_logger(__name__)

# One SMTP conversation or Maildir write may take this long (seconds).
SEND_TIMEOUT_SECONDS = 30.0
# Server replies and exception texts are cut to this many characters in records and logs.
MAX_ERROR_CHARS = 300


class MailError(Exception):
    """A send did not succeed."""


class TransientMailError(MailError):
    """Worth another try later (server busy, network, 4xx)."""


class PermanentMailError(MailError):
    """Another try would fail the same way (5xx refusal of this message, bad address)."""


class Transport(Protocol):
    """Where mails go: an SMTP server or a local Maildir."""

    name: str

    async def send(self, message: EmailMessage, sender: str, recipient: str) -> None:
        """Deliver or raise `TransientMailError` / `PermanentMailError`."""


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """A parsed ``COINVOICE_SMTP_URL``; the password stays out of its repr."""

    host: str
    port: int
    use_tls: bool  # smtps://: TLS from the first byte
    start_tls: bool | None  # True required, False never, None when the server offers it
    username: str | None = None
    password: str | None = field(default=None, repr=False)


_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_smtp_url(url: str) -> SmtpConfig:
    """``smtp://user:pass@host:port[?starttls=1]`` or ``smtps://…`` (implicit TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        # The message names no part of the URL: it may hold the password.
        raise ValueError("COINVOICE_SMTP_URL must look like smtp[s]://user:pass@host:port")
    use_tls = parts.scheme == "smtps"
    flag = parse_qs(parts.query).get("starttls", [""])[-1].lower()
    if flag and flag not in _FLAGS:
        raise ValueError("COINVOICE_SMTP_URL: starttls must be 1 or 0")
    start_tls = _FLAGS.get(flag) if flag else None
    if use_tls and start_tls:
        raise ValueError("COINVOICE_SMTP_URL: smtps:// and starttls=1 exclude each other")
    if use_tls:
        start_tls = False
    default_port = 465 if use_tls else 587 if start_tls else 25
    return SmtpConfig(
        host=parts.hostname,
        port=parts.port or default_port,
        use_tls=use_tls,
        start_tls=start_tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def short_error(text: str) -> str:
    """A server reply or exception text for records and logs: one line, bounded."""
    return one_line(text)[:MAX_ERROR_CHARS]


class SmtpTransport:
    """One SMTP conversation per mail (aiosmtplib); 5xx refusals are permanent."""

    name = "smtp"

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config

    async def send(self, message: EmailMessage, sender: str, recipient: str) -> None:
        config = self.config
        try:
            await aiosmtplib.send(
                message,
                sender=sender,
                recipients=[recipient],
                hostname=config.host,
                port=config.port,
                username=config.username,
                password=config.password,
                use_tls=config.use_tls,
                start_tls=config.start_tls,
                timeout=SEND_TIMEOUT_SECONDS,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refusals = [(r.code, r.message) for r in exc.recipients]
            text = short_error("; ".join(f"{code} {msg}" for code, msg in refusals))
            if refusals and all(500 <= code < 600 for code, _ in refusals):
                raise PermanentMailError(text) from None
            raise TransientMailError(text) from None
        except (
            aiosmtplib.SMTPAuthenticationError,
            aiosmtplib.SMTPHeloError,
            aiosmtplib.SMTPConnectResponseError,
        ) as exc:
            # Our login or the server's greeting: nothing wrong with this mail, so a
            # later try (after the operator fixed it) may well succeed.
            raise TransientMailError(short_error(f"{exc.code} {exc.message}")) from None
        except aiosmtplib.SMTPResponseException as exc:
            text = short_error(f"{exc.code} {exc.message}")
            if 500 <= exc.code < 600:
                raise PermanentMailError(text) from None
            raise TransientMailError(text) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientMailError(short_error(f"{type(exc).__name__}: {exc}")) from None


class MaildirTransport:
    """The local default: every mail as a file in a Maildir, readable with any mail client."""

    name = "maildir"

    def __init__(self, path: Path) -> None:
        self.path = path

    async def send(self, message: EmailMessage, sender: str, recipient: str) -> None:
        try:
            await asyncio.to_thread(self._add, message)
        except OSError as exc:
            raise TransientMailError(short_error(f"{type(exc).__name__}: {exc}")) from None

    def _add(self, message: EmailMessage) -> None:
        # Maildir creates its own folder (with cur/new/tmp) but not the parents.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Files in a Maildir end lines with LF; the message's policy speaks SMTP (CRLF).
        data = message.as_bytes(policy=message.policy.clone(linesep="\n"))
        mailbox.Maildir(self.path, create=True).add(data)


def transport_from(settings: Settings) -> Transport:
    """SMTP when ``COINVOICE_SMTP_URL`` is set, else the Maildir."""
    if settings.smtp_url is not None:
        return SmtpTransport(parse_smtp_url(settings.smtp_url.get_secret_value()))
    return MaildirTransport(settings.maildir)


def recipient_address(email: str) -> str:
    """The one address to send to; anything else (a list, line breaks) is refused."""
    try:
        return Address(addr_spec=email).addr_spec
    except (ValueError, IndexError, HeaderParseError) as exc:
        raise PermanentMailError("the invoice's e-mail address is not valid") from exc
