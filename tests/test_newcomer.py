"""What a newcomer tripped over (issue 10 part 3), the parts that need no process.

The CLI's help texts, the callback URL check of `merchant add`, and the
gross/fee/net settlement that `invoice show` prints. The same behaviours run
as real `coinvoice` processes in tests/test_cli.py.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from decimal import Decimal

import pytest

from receiver.commands.cli import build_parser
from receiver.commands.merchant import callback_url_problem
from tests.machine_factories import make_invoice
from worker.services.operations import settlement


def _parsers(
    parser: argparse.ArgumentParser, name: str = "coinvoice"
) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser and sub-parser of the command, with its command line."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}")
    return found


def test_every_cli_option_has_help() -> None:
    """Each option and argument of each `coinvoice` command says what it is for."""
    missing = [
        f"{command} {action.dest}"
        for command, parser in _parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []


def test_tx_id_and_txid_help_tell_them_apart() -> None:
    """--tx-id names the processing id and --txid the chain hash, each pointing at the other."""
    (deposit,) = [p for name, p in _parsers(build_parser()) if name.endswith("simulate deposit")]
    helps = {a.dest: a.help or "" for a in deposit._actions}
    assert "processing" in helps["tx_id"] and "--txid" not in helps["tx_id"]
    assert "same --tx-id again" in helps["tx_id"]
    assert "hash" in helps["txid"] and "not the same as --tx-id" in helps["txid"]


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://127.0.0.1:9/callbacks", "127.0.0.1 resolves to non-public address 127.0.0.1"),
        ("http://10.1.2.3/cb", "10.1.2.3 resolves to non-public address 10.1.2.3"),
        ("http://[::1]:8000/cb", "::1 resolves to non-public address ::1"),
        ("http://169.254.169.254/latest", "resolves to non-public address 169.254.169.254"),
        ("http://localhost:8000/cb", "localhost resolves to non-public address 127.0.0.1"),
        ("ftp://shop.example/cb", "not an http(s) URL"),
        ("https://8.8.8.8/cb", None),
        # The delivery guard's rule: a name that resolves nowhere is refused at once.
        ("https://shop.invalid/cb", "shop.invalid does not resolve"),
    ],
)
def test_callback_url_check_without_private_callbacks(url: str, refused: str | None) -> None:
    """Private, loopback and link-local callback URLs are refused with the reason."""
    problem = callback_url_problem(url, allow_private=False)
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and refused in problem


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/cb", "http://localhost:8000/cb"])
def test_callback_url_check_with_private_callbacks(url: str) -> None:
    """With COINVOICE_ALLOW_PRIVATE_CALLBACKS a loopback callback URL is fine."""
    assert callback_url_problem(url, allow_private=True) is None


def test_settlement_names_gross_fee_and_net() -> None:
    """A confirmed invoice's settlement: gross credited, the fee, and the net on the balance."""
    invoice = replace(make_invoice(3), credited=Decimal("106.75"), fee=Decimal("1.0675"))
    assert settlement(invoice) == {
        "currency": invoice.currency,
        "gross": "106.75000000",
        "fee": "1.06750000",
        "net": "105.68250000",
        "meaning": "gross: the payment exchanged into the invoice currency, before the fee; "
        "net = gross - fee: what reached the merchant's balance",
    }
    assert settlement(replace(invoice, credited=None, fee=None)) is None
