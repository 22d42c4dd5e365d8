"""Paying agents on two chains with one wallet set (issue 14), on a two-chain devnet.

    python -m examples.multichain

Two devnet chains that look like Base and Arbitrum (their chain ids, USDC at their canonical addresses).
Three sub-agents: one prices its work on Base, one on Arbitrum, one on both at once (one gateway,
`chain=[base, arbitrum]`). The orchestrator holds one key and a `WalletSet` with a wallet per chain; it
prefers Arbitrum and caps what it spends there and in total (`SpendPolicy`). It pays every sub-agent on a
chain that sub-agent accepts: the two-chain one on Arbitrum until that cap is reached, then on Base; one call
past the total is refused before anything is signed. It then checks that every payee holds exactly what was
served, on each chain, and stops everything. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httpx
from eth_account import Account
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import Chain, Devnets, DevnetState, Erc20
from gateway import PaymentMiddleware
from x402 import LocalSigner, SettleResponse, SpendPolicyViolation
from x402.client import Eip3009Wallet, PaymentAuth, SpendPolicy, WalletSet, receipt_of

PRICE = "$0.002"
ATOMIC = 2_000
GATEWAY_RELAYER = 3  # the devnet account each sub-agent's gateway settles with (on every chain)
ORCHESTRATOR = 1  # the devnet account that pays (funded with TestUSDC on every chain)


def _agent(name: str) -> Starlette:
    async def work(request: Request) -> Response:
        return JSONResponse({"agent": name, "result": f"{name} did the job"})

    return Starlette(routes=[Route("/work", work)])


def _gateway(name: str, chains: list[Chain], pay_to: str) -> PaymentMiddleware:
    return PaymentMiddleware(
        _agent(name),
        routes={"GET /work": PRICE},
        chain=chains,
        schemes=["exact"],
        pay_to=pay_to,
        store="memory://",
    )


async def run(devnet: DevnetState, calls: int = 2) -> dict[str, Any]:
    base_net, arb_net = (c.network for c in devnet.chains)

    def chain(network: str) -> Chain:
        return Chain.from_devnet(devnet, chain=network, relayer=GATEWAY_RELAYER)

    payees = {name: str(Account.create().address) for name in ("base-only", "arbitrum-only", "both")}
    agents = {
        "base-only": _gateway("base-only", [chain(base_net)], payees["base-only"]),
        "arbitrum-only": _gateway("arbitrum-only", [chain(arb_net)], payees["arbitrum-only"]),
        "both": _gateway("both", [chain(base_net), chain(arb_net)], payees["both"]),
    }
    signer = LocalSigner(devnet.accounts[ORCHESTRATOR].private_key)
    readers = [Chain.from_devnet(devnet, chain=c.network, relayer=None) for c in devnet.chains]
    wallets = WalletSet([Eip3009Wallet.for_network(signer, r.network) for r in readers])
    # Arbitrum first; room there for the Arbitrum-only agent and one more call; the total covers every
    # planned call and no more.
    policy = SpendPolicy(
        max_per_call=PRICE,
        per_network_budget={arb_net: (calls + 1) * ATOMIC},
        total_budget=3 * calls * ATOMIC,
    )
    auth = PaymentAuth(wallets, policy=policy, networks=[arb_net, base_net])
    paid: list[dict[str, str]] = []
    plan = [agent for agent in ("arbitrum-only", "base-only", "both") for _ in range(calls)] + ["both"]
    try:
        for app in agents.values():
            await app.startup()
        for agent in plan:
            transport = httpx.ASGITransport(app=agents[agent])
            async with httpx.AsyncClient(
                transport=transport, base_url=f"http://{agent}", auth=auth
            ) as client:
                try:
                    response = await client.get("/work")
                except SpendPolicyViolation as refused:  # refused before anything was signed
                    paid.append({"agent": agent, "refused": refused.message})
                    print(f"refused {agent:<11} {refused.message}")
                    continue
            receipt = receipt_of(response)
            assert response.status_code == 200 and isinstance(receipt, SettleResponse), response.text
            paid.append({"agent": agent, "network": receipt.network, "tx": receipt.transaction})
            print(f"paid {agent:<14} on {receipt.network:<13} {receipt.transaction}")
        # What each payee holds on each chain is exactly what was served there.
        exact = True
        for agent, payee in payees.items():
            for reader in readers:
                token = Erc20(reader.rpc, reader.network.token)
                held = await token.balance_of(payee)
                served = sum(
                    1 for p in paid if p["agent"] == agent and p.get("network") == reader.network.network
                )
                exact = exact and held == served * ATOMIC
    finally:
        for app in agents.values():
            await app.shutdown()
        for reader in readers:
            await reader.aclose()
    return {
        "payments": paid,
        "spent_by_network": policy.spent_by_network(),
        "spent": policy.spent,
        "exact": exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2, help="calls to each sub-agent")
    args = parser.parse_args()
    with Devnets(["base", "arbitrum"]) as devnet:
        summary = asyncio.run(run(devnet, args.calls))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
