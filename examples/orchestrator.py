"""An orchestrator agent that pays a sub-agent's 402s with agentpay's httpx client.

    python -m examples.orchestrator --devnet .agentpay/devnet.json --url http://127.0.0.1:8402 --calls 3
    python -m examples.orchestrator --devnet FILE --url URL --wallet orchestrator.session.json

It pays `--calls` requests to `GET <url>/hello` under a spend policy, and prints each receipt and both
balances before and after. By default it pays from devnet account 1 (EIP-3009 `exact`, gasless for the
payer); with `--wallet` it pays with the session key its owner gave it (`SessionKeyWallet`, written by
`escrow.Chain.open_session`): `escrow` offers out of the owner's escrow deposit, within the owner's grant.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

import httpx
from httpx import Response

from escrow import Chain, KeepAliveTransport
from x402 import LocalSigner, MppReceipt, SettleResponse, decode_payment_required
from x402.client import (
    DEFAULT_PREFERENCE,
    Eip3009Wallet,
    PaymentAuth,
    ProtocolName,
    SpendPolicy,
    Wallet,
    receipt_of,
)
from x402.client_escrow import SessionKeyWallet

__all__ = ["Outcome", "main", "pay", "run"]

Prefer = tuple[ProtocolName, ...]


# The orchestrator itself: a wallet, a spend policy, an httpx client (over agentpay's keep-alive transport:
# about a fourth of the client CPU per paid call). The rest demonstrates it.
async def pay(url: str, wallet: Wallet, calls: int, prefer: Prefer = DEFAULT_PREFERENCE) -> list[Response]:
    """`calls` paid GETs of `url`, each at most $0.01 and $1 in all."""
    auth = PaymentAuth(wallet, SpendPolicy(max_per_call="$0.01", total_budget="$1"), prefer=prefer)
    async with httpx.AsyncClient(auth=auth, transport=KeepAliveTransport(), timeout=30.0) as client:
        return [(await client.get(url)).raise_for_status() for _ in range(calls)]


@dataclass(frozen=True)
class Outcome:
    payer: str
    payee: str
    price: int
    calls: int
    payer_before: int
    payer_after: int
    payee_before: int
    payee_after: int
    receipts: list[str]


def _describe(receipt: SettleResponse | MppReceipt | None) -> str:
    if isinstance(receipt, SettleResponse):
        return f"x402 settled={receipt.success} tx={receipt.transaction} network={receipt.network}"
    if isinstance(receipt, MppReceipt):
        return f"MPP status={receipt.status} tx={receipt.reference} challenge={receipt.challenge_id}"
    return "no receipt"


async def run(
    chain: Chain,
    wallet: Eip3009Wallet | SessionKeyWallet,
    url: str,
    calls: int,
    *,
    path: str = "/hello",
    prefer: tuple[ProtocolName, ...] = ("x402v2", "mpp", "x402v1"),
    log: bool = True,
) -> Outcome:
    """Pay `calls` requests to `url + path` with `wallet`; return what moved (read from `chain`)."""
    token = chain.token
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as plain:
        offer = await plain.get(path)  # learn who gets paid, and how much, from the 402 itself
    required = decode_payment_required(offer.headers["payment-required"]).accepts[0]
    payee, price, payer = required.pay_to, int(required.amount), wallet.address
    payer_before, payee_before = await token.balance_of(payer), await token.balance_of(payee)
    if log:
        print(f"orchestrator: {payer} pays {payee} {price} atomic units per call to {url}{path}")
        print(f"  before: payer {payer_before / 1e6:.6f} USDC, payee {payee_before / 1e6:.6f} USDC")
    responses = await pay(url + path, wallet, calls, prefer=prefer)
    receipts = [_describe(receipt_of(response)) for response in responses]
    if log:
        for i, (response, receipt) in enumerate(zip(responses, receipts, strict=True)):
            print(f"  call {i + 1}: {response.status_code} {response.json()} | {receipt}")
    payer_after, payee_after = await token.balance_of(payer), await token.balance_of(payee)
    if log:
        print(f"  after:  payer {payer_after / 1e6:.6f} USDC, payee {payee_after / 1e6:.6f} USDC")
        print(f"  moved:  {payee_after - payee_before} atomic units = {calls} calls x {price}")
    return Outcome(
        payer=payer,
        payee=payee,
        price=price,
        calls=calls,
        payer_before=payer_before,
        payer_after=payer_after,
        payee_before=payee_before,
        payee_after=payee_after,
        receipts=receipts,
    )


async def _main(args: argparse.Namespace, prefer: tuple[ProtocolName, ...]) -> Outcome:
    async with Chain.from_devnet(args.devnet, relayer=None) as chain:
        wallet: Eip3009Wallet | SessionKeyWallet
        if args.wallet:
            wallet = SessionKeyWallet.load(args.wallet)
        else:
            signer = LocalSigner(chain.accounts[args.payer].private_key)
            wallet = Eip3009Wallet.for_network(signer, chain.network)
        return await run(chain, wallet, args.url, args.calls, path=args.path, prefer=prefer)


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--devnet", required=True, help="devnet state file")
    parser.add_argument("--url", required=True, help="the sub-agent's base URL")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--path", default="/hello")
    parser.add_argument("--payer", type=int, default=1, help="devnet account index that pays")
    parser.add_argument("--wallet", default=None, help="pay with this session wallet file instead")
    parser.add_argument(
        "--protocol", choices=["x402v2", "mpp", "x402v1"], default=None, help="pay with this protocol only"
    )
    args = parser.parse_args(argv)
    prefer: tuple[ProtocolName, ...] = (args.protocol,) if args.protocol else ("x402v2", "mpp", "x402v1")
    outcome = asyncio.run(_main(args, prefer))
    # An escrow payment may settle later, in a batch; an `exact` one has moved by now.
    if not args.wallet and outcome.payee_after - outcome.payee_before != outcome.price * outcome.calls:
        raise SystemExit("balances did not move by price x calls")


if __name__ == "__main__":
    main()
