"""`coinvoice`: the one console script of spec §11.

Each subcommand parses its arguments, reads the settings once and hands over
to the module that does the work; operator commands print JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from receiver.commands import operator, simulate
from receiver.commands.merchant import PRIVATE_HINT, callback_url_problem
from worker.config import Settings, load_settings
from worker.logs import configure_logging
from worker.store.connection import RedisUrlMissing, connect
from worker.store.merchants import MerchantExists, MerchantStore, make_merchant

Command = Callable[[argparse.Namespace, Settings], int]


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal number: {text!r}") from None
    if not value.is_finite() or value < 0 or value > 100:
        raise argparse.ArgumentTypeError("must be a percentage between 0 and 100")
    return value


def _print_json(payload: object) -> None:
    print(json.dumps(payload, default=str))


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


# --------------------------------------------------------------------------- processes


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from receiver.commands.up import up

    return up(settings)


def cmd_receiver(args: argparse.Namespace, settings: Settings) -> int:
    from receiver.app import run

    run(settings)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import main

    if args.check:
        host = socket.gethostname() if args.this_host else None
        return 0 if _run_async(_check(settings, host)) else 1
    main.run(settings)
    return 0


async def _check(settings: Settings, host: str | None) -> int:
    from worker.app.main import check

    return int(await check(settings, host))


# --------------------------------------------------------------------------- merchants


def cmd_merchant_add(args: argparse.Namespace, settings: Settings) -> int:
    # Without COINVOICE_REDIS_URL the merchant goes into the Redis of a running
    # `coinvoice up`, whose worker delivers to private addresses (its demo does).
    embedded = not (settings.redis_url or settings.redis_sentinels)
    allow_private = settings.allow_private_callbacks or embedded
    problem = callback_url_problem(args.callback_url, allow_private)
    if problem is not None:
        print(f"coinvoice: --callback-url {args.callback_url}: {problem}", file=sys.stderr)
        if problem.startswith("refused"):
            print(f"coinvoice: {PRIVATE_HINT}", file=sys.stderr)
        return 2
    merchant = make_merchant(
        args.name,
        args.callback_url,
        key=args.key,
        secret=args.secret,
        fee_percent=args.fee_percent,
        underpayment_tolerance_percent=args.underpayment_tolerance_percent,
        standard_webhooks=args.standard_webhooks,
        require_timestamp=args.require_timestamp,
    )

    async def add() -> int:
        redis = connect(settings)
        try:
            await MerchantStore(redis).add(merchant)
        except MerchantExists:
            print(f"coinvoice: a merchant with key {merchant.key} exists", file=sys.stderr)
            return 1
        finally:
            await redis.aclose()
        return 0

    status = _run_async(add())
    if status == 0:
        payload: dict[str, object] = {
            "name": merchant.name,
            "key": merchant.key,
            "secret": merchant.secret,
            "callback_url": merchant.callback_url,
            "fee_percent": str(merchant.fee_percent),
            "underpayment_tolerance_percent": str(merchant.underpayment_tolerance_percent),
        }
        if merchant.standard_webhooks_secret:
            payload["standard_webhooks_secret"] = merchant.standard_webhooks_secret
        if merchant.require_timestamp:
            payload["require_timestamp"] = True
        _print_json(payload)
    return status


# --------------------------------------------------------------------------- operators


def cmd_simulate_deposit(args: argparse.Namespace, settings: Settings) -> int:
    """Send one signed processing callback to the local receiver (demos and tests)."""
    return _run_async(simulate.deposit(args, settings))


def cmd_orphans(args: argparse.Namespace, settings: Settings) -> int:
    """Deposits to addresses no invoice owns, one JSON object per transaction."""
    return _run_async(operator.orphans(settings))


def cmd_invoice_show(args: argparse.Namespace, settings: Settings) -> int:
    return _run_async(operator.invoice_show(settings, args.merchant, args.foreign_id))


def cmd_callbacks_redeliver(args: argparse.Namespace, settings: Settings) -> int:
    return _run_async(operator.callbacks_redeliver(settings, args.merchant, args.foreign_id))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coinvoice", description="Invoice back end for crypto payments."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run Redis, a receiver and a worker for a first look")
    up.set_defaults(func=cmd_up)

    receiver = commands.add_parser("receiver", help="run one receiver process (HTTP)")
    receiver.set_defaults(func=cmd_receiver)

    worker = commands.add_parser("worker", help="run one worker process (arq)")
    worker.add_argument("--check", action="store_true", help="exit 0 if a worker is healthy")
    worker.add_argument(
        "--this-host",
        action="store_true",
        help="with --check: only a worker on this host counts (a container's or pod's own)",
    )
    worker.set_defaults(func=cmd_worker)

    merchant = commands.add_parser("merchant", help="merchant accounts")
    merchant_commands = merchant.add_subparsers(dest="merchant_command", required=True)
    add = merchant_commands.add_parser("add", help="register a merchant; prints its keys as JSON")
    add.add_argument("--name", required=True, help="the merchant's name, for operators")
    add.add_argument(
        "--callback-url",
        required=True,
        help="http(s) URL that receives the signed invoice callbacks; a private or loopback "
        "address is refused unless COINVOICE_ALLOW_PRIVATE_CALLBACKS is set (or the "
        "merchant goes into a running `coinvoice up`, whose worker allows them)",
    )
    add.add_argument("--key", help="public key, sent as X-Processing-Key (generated when absent)")
    add.add_argument(
        "--secret", help="secret that signs requests and callbacks (generated when absent)"
    )
    add.add_argument(
        "--fee-percent",
        type=_decimal,
        default=Decimal(1),
        metavar="P",
        help="fee charged on each confirmed invoice, percent of the credited amount (default: 1)",
    )
    add.add_argument(
        "--underpayment-tolerance-percent",
        type=_decimal,
        default=Decimal(0),
        metavar="T",
        help="a payment this many percent short still confirms the invoice (default: 0)",
    )
    add.add_argument(
        "--standard-webhooks",
        action="store_true",
        help="also sign callbacks with Standard Webhooks headers; prints the whsec_ secret",
    )
    add.add_argument(
        "--require-timestamp",
        action="store_true",
        help="replay protection: requests must sign X-Processing-Timestamp and are accepted once",
    )
    add.set_defaults(func=cmd_merchant_add)

    simulate_cmd = commands.add_parser("simulate", help="demo inputs")
    simulate_commands = simulate_cmd.add_subparsers(dest="simulate_command", required=True)
    deposit = simulate_commands.add_parser(
        "deposit", help="send a signed processing callback for a deposit to ADDRESS"
    )
    deposit.add_argument("--address", required=True, help="the invoice's deposit address")
    deposit.add_argument(
        "--amount", required=True, help="amount paid, in the address's currency (e.g. 0.0018)"
    )
    deposit.add_argument(
        "--status",
        choices=["not_confirmed", "confirmed", "cancelled"],
        default="not_confirmed",
        help="not_confirmed: seen in the mempool (default); confirmed: final; "
        "cancelled: dropped or replaced",
    )
    deposit.add_argument(
        "--confirmations", type=int, default=0, help="block confirmations so far (default: 0)"
    )
    deposit.add_argument(
        "--tx-id",
        type=int,
        metavar="ID",
        help="the processing layer's transaction id (a number). Send the same --tx-id again "
        "to update that transaction, e.g. to confirm it; a new one is a second payment "
        "(generated when absent and printed)",
    )
    deposit.add_argument(
        "--txid",
        metavar="HASH",
        help="the blockchain transaction hash, as an explorer shows it; not the same as "
        "--tx-id (random when absent)",
    )
    deposit.add_argument(
        "--compliance",
        choices=["clear", "flagged"],
        default="clear",
        help="flagged: compliance flagged the payment (a pending or processing invoice fails)",
    )
    deposit.add_argument("--currency", help="the address's currency (looked up when absent)")
    deposit.add_argument("--observed-at", type=int, help="unix seconds (default: now)")
    deposit.add_argument("--url", help="receiver base URL (default: COINVOICE_PUBLIC_URL)")
    deposit.set_defaults(func=cmd_simulate_deposit)

    orphans = commands.add_parser("orphans", help="deposits no invoice owns (JSON lines)")
    orphans.set_defaults(func=cmd_orphans)

    invoice = commands.add_parser("invoice", help="operator views of invoices")
    invoice_commands = invoice.add_subparsers(dest="invoice_command", required=True)
    show = invoice_commands.add_parser("show", help="an invoice with its delivery state (JSON)")
    show.add_argument("foreign_id", help="the merchant's foreign_id of the invoice")
    show.add_argument("--merchant", required=True, help="the merchant key")
    show.set_defaults(func=cmd_invoice_show)

    callbacks = commands.add_parser("callbacks", help="merchant callback delivery")
    callbacks_commands = callbacks.add_subparsers(dest="callbacks_command", required=True)
    again = callbacks_commands.add_parser(
        "redeliver", help="deliver the newest snapshot again now (dead-lettered too)"
    )
    again.add_argument("foreign_id", help="the merchant's foreign_id of the invoice")
    again.add_argument("--merchant", required=True, help="the merchant key")
    again.set_defaults(func=cmd_callbacks_redeliver)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings()
    # Logs go to stderr, so what a command prints on stdout stays machine-readable.
    configure_logging(settings.log_format, settings.log_level)
    command: Command = args.func
    try:
        return command(args, settings)
    except RedisUrlMissing as exc:
        print(f"coinvoice: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
