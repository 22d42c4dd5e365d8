"""`agentpay pay URL`: a paid HTTP request from a shell, curl-like, with a session wallet file.

    agentpay pay http://127.0.0.1:8402/hello --wallet agent.session.json --max '$0.002'

The body goes to stdout as it came; the receipt (what was paid, to whom, the settlement) goes to stderr, so
`agentpay pay URL > out.json` keeps the body clean. `--json` prints all of it as one object instead. A
refused payment, a payment the wallet or `--max` cannot make, or an HTTP error is one `agentpay: error:`
line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec

from x402.client import OFFER_EXTENSION, PAYMENT_ERROR_EXTENSION, Offer, PaymentAuth, SpendPolicy, receipt_of
from x402.client_escrow import SessionKeyWallet, SessionWalletFile

from ._cli_common import CliError, add_json, emit, handler, human
from .cli import command

__all__: list[str] = []


def _body(data: str | None) -> bytes | None:
    """curl's `-d`: the text itself, or `@FILE` for a file's bytes (`@-` for stdin)."""
    if data is None:
        return None
    if not data.startswith("@"):
        return data.encode()
    source = data[1:]
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror}") from None


def _headers(values: list[str], body: bytes | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            raise CliError(f"-H {value!r}: a header is 'Name: value'")
        headers[name.strip()] = content.strip()
    if body is not None and not any(k.lower() == "content-type" for k in headers):
        try:
            json.loads(body)
            headers["Content-Type"] = "application/json"
        except ValueError:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
    return headers


def _refusal(response: httpx.Response) -> str:
    error = response.extensions.get(PAYMENT_ERROR_EXTENSION)
    for name in ("error_reason", "code", "detail", "title"):
        value = getattr(error, name, None)
        if value:
            return str(value)
    return "no reason given"


@handler
def _pay(args: argparse.Namespace) -> int:
    path = args.wallet or os.environ.get("AGENTPAY_WALLET")
    if not path:
        raise CliError("no wallet: pass --wallet FILE (a session wallet file) or set $AGENTPAY_WALLET")
    file = SessionWalletFile.load(path)
    wallet = SessionKeyWallet.from_file(file)
    network = file.network
    policy = SpendPolicy(max_per_call=args.max, decimals=network.token_decimals)
    body = _body(args.data)
    method = (args.request or ("POST" if body is not None else "GET")).upper()
    headers = _headers(args.header, body)
    with httpx.Client(auth=PaymentAuth(wallet, policy), timeout=args.timeout) as client:
        response = client.request(method, args.url, content=body, headers=headers)
    offer: Offer | None = response.extensions.get(OFFER_EXTENSION)
    if response.status_code == 402:
        if offer is None and PAYMENT_ERROR_EXTENSION not in response.extensions:
            raise CliError(f"{args.url} asked for a payment this wallet found no offer to pay in")
        raise CliError(f"the payment was refused: {_refusal(response)}")
    receipt = receipt_of(response) if offer is not None else None
    paid = (
        None
        if offer is None
        else {
            "protocol": offer.protocol,
            "scheme": offer.scheme,
            "network": offer.network,
            "amount": offer.amount,
            "asset": offer.asset,
            "pay_to": offer.pay_to,
        }
    )
    if args.json:
        try:
            shown: Any = response.json()
        except ValueError:
            shown = response.text
        result = {
            "status": response.status_code,
            "url": str(response.url),
            "body": shown,
            "paid": paid,
            "receipt": None if receipt is None else msgspec.to_builtins(receipt),
        }
        emit(args, result)
    else:
        sys.stdout.buffer.write(response.content)
        sys.stdout.flush()
        if paid is not None:
            settled = getattr(receipt, "transaction", "") or getattr(receipt, "reference", "")
            sys.stderr.write(
                f"agentpay: paid {human(offer.amount, network) if offer else ''} ({paid['scheme']},"
                f" {paid['protocol']}) to {paid['pay_to']}; settlement: {settled or 'pending'}\n"
            )
    if response.status_code >= 400:
        raise CliError(f"HTTP {response.status_code} from {args.url}")
    return 0


@command("pay", help="a paid HTTP request (curl-like) with a session wallet; the receipt goes to stderr")
def _pay_command(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url")
    parser.add_argument("-X", "--request", metavar="METHOD", help="default: GET, or POST with -d")
    parser.add_argument("-d", "--data", metavar="DATA", help="request body; @FILE reads a file, @- stdin")
    parser.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'")
    parser.add_argument("--max", metavar="AMOUNT", help="pay at most this per call (atomic, or like $0.01)")
    parser.add_argument("--wallet", metavar="FILE", help="session wallet file (default: $AGENTPAY_WALLET)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    add_json(parser)
    parser.set_defaults(func=_pay)
