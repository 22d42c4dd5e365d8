"""An orchestrator agent that pays a sub-agent's 402s with agentpay's httpx client.

    python -m examples.orchestrator --devnet .agentpay/devnet.json --url http://127.0.0.1:8402 --calls 3

It pays `--calls` requests to `GET <url>/hello` from devnet account 1 (EIP-3009 `exact`, gasless for the
payer), under a spend policy, and prints each receipt and both balances before and after.

With a session key instead (`session_key_auth`, what `examples.demo` uses), the orchestrator pays `escrow`
offers out of its smart account's escrow deposit, under the grant the account's owner signed offline, and
falls back to a small hot EOA wallet for sub-agents that only take `exact`. Its spend policy mirrors the
grant, so an over-cap call is refused before anything is signed.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

import httpx
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from escrow import DevnetState
from escrow._rpc import Rpc
from x402 import LocalSigner, MppReceipt, SettleResponse, Signer, decode_payment_required
from x402._escrow import GrantMessage
from x402.client import Eip3009Wallet, PaymentAuth, ProtocolName, SpendPolicy, receipt_of
from x402.client_escrow import EscrowWallet, SessionKeyAuth

__all__ = ["Outcome", "balance_of", "call_many", "main", "run", "session_key_auth"]


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


async def balance_of(rpc: Rpc, token: str, who: str) -> int:
    data = keccak(text="balanceOf(address)")[:4] + abi_encode(["address"], [who])
    return int.from_bytes(await rpc.call(token, data), "big")


def _describe(receipt: SettleResponse | MppReceipt | None) -> str:
    if isinstance(receipt, SettleResponse):
        return f"x402 settled={receipt.success} tx={receipt.transaction} network={receipt.network}"
    if isinstance(receipt, MppReceipt):
        return f"MPP status={receipt.status} tx={receipt.reference} challenge={receipt.challenge_id}"
    return "no receipt"


async def run(
    state: DevnetState,
    url: str,
    calls: int,
    *,
    path: str = "/hello",
    payer_index: int = 1,
    prefer: tuple[ProtocolName, ...] = ("x402v2", "mpp", "x402v1"),
    log: bool = True,
) -> Outcome:
    """Pay `calls` requests to `url + path`; return what moved."""
    signer = LocalSigner(state.accounts[payer_index].private_key)
    token = state.contracts["usdc"]
    wallet = Eip3009Wallet(signer, state.chain_id, {token: (state.usdc_name, state.usdc_version)})
    policy = SpendPolicy(max_per_call=10_000, total_budget=1_000_000, allowed_assets=[token])
    rpc = Rpc(state.rpc_url)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as plain:
            offer = await plain.get(path)  # learn who gets paid, and how much, from the 402 itself
        required = decode_payment_required(offer.headers["payment-required"]).accepts[0]
        payee, price = required.pay_to, int(required.amount)
        payer_before = await balance_of(rpc, token, signer.address)
        payee_before = await balance_of(rpc, token, payee)
        if log:
            print(f"orchestrator: {signer.address} pays {payee} {price} atomic units per call to {url}{path}")
            print(f"  before: payer {payer_before / 1e6:.6f} USDC, payee {payee_before / 1e6:.6f} USDC")
        receipts = []
        auth = PaymentAuth(wallet, policy, prefer=prefer)
        async with httpx.AsyncClient(base_url=url, auth=auth, timeout=30.0) as client:
            for i in range(calls):
                response = await client.get(path)
                response.raise_for_status()
                receipt = receipt_of(response)
                receipts.append(_describe(receipt))
                if log:
                    print(f"  call {i + 1}: {response.status_code} {response.json()} | {receipts[-1]}")
        payer_after = await balance_of(rpc, token, signer.address)
        payee_after = await balance_of(rpc, token, payee)
        if log:
            print(f"  after:  payer {payer_after / 1e6:.6f} USDC, payee {payee_after / 1e6:.6f} USDC")
            print(f"  moved:  {payee_after - payee_before} atomic units = {calls} calls x {price}")
        return Outcome(
            payer=signer.address,
            payee=payee,
            price=price,
            calls=calls,
            payer_before=payer_before,
            payer_after=payer_after,
            payee_before=payee_before,
            payee_after=payee_after,
            receipts=receipts,
        )
    finally:
        await rpc.aclose()


def session_key_auth(
    state: DevnetState, session: Signer, grant: GrantMessage, *, hot_wallet: Signer
) -> SessionKeyAuth:
    """The orchestrator's payer: `session` pays `escrow` offers for the grant's payer (its smart account);
    `hot_wallet` pays `exact` offers (EIP-3009) where the escrow is not accepted.

    One spend policy covers both, and carries the grant's limits: a call over the per-call cap, or past the
    budget, is refused by the client before anything is signed (the escrow would refuse it anyway).
    """
    token = state.contracts["usdc"]
    wallet = EscrowWallet(
        session,
        payer=grant.payer,
        chain_id=state.chain_id,
        escrow=state.contracts["escrow"],
        token=grant.token,
        epoch=grant.epoch,
        payees=grant.payees,
        valid_after=grant.valid_after,
        valid_until=grant.valid_until,
    )
    policy = SpendPolicy(max_per_call=grant.max_per_call, total_budget=grant.budget, allowed_assets=[token])
    fallback = Eip3009Wallet(hot_wallet, state.chain_id, {token: (state.usdc_name, state.usdc_version)})
    return SessionKeyAuth(wallet, policy, fallback=fallback)


async def call_many(client: httpx.AsyncClient, url: str, count: int) -> list[httpx.Response]:
    """`count` paid calls to `url` at once: concurrent payments by one key never share a nonce."""
    return list(await asyncio.gather(*(client.get(url) for _ in range(count))))


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--devnet", required=True, help="devnet state file")
    parser.add_argument("--url", required=True, help="the sub-agent's base URL")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--path", default="/hello")
    parser.add_argument("--payer", type=int, default=1, help="devnet account index that pays")
    parser.add_argument(
        "--protocol", choices=["x402v2", "mpp", "x402v1"], default=None, help="pay with this protocol only"
    )
    args = parser.parse_args(argv)
    state = DevnetState.load(args.devnet)
    prefer: tuple[ProtocolName, ...] = (args.protocol,) if args.protocol else ("x402v2", "mpp", "x402v1")
    outcome = asyncio.run(
        run(state, args.url, args.calls, path=args.path, payer_index=args.payer, prefer=prefer)
    )
    if outcome.payee_after - outcome.payee_before != outcome.price * outcome.calls:
        raise SystemExit("balances did not move by price x calls")


if __name__ == "__main__":
    main()
