"""A route priced on one chain versus on two (issue 14): what the second network costs the gateway.

    python -m tests.bench.multichain [--challenges 2000] [--payments 60]

Two anvils (`escrow.Devnets([8453, 42161])`), one in-process gateway (`PaymentMiddleware`, memory store,
httpx's ASGI transport, no sockets). Figures:

- ``challenge_us_1`` / ``challenge_us_2``: mean microseconds (best of two interleaved runs) to answer an
  unpaid request with its 402 when the gateway is on one chain / on two (every `accepts` entry and MPP
  challenge built, HMAC'd, encoded);
  ``challenge_bytes_*``: the 402's header bytes;
- ``paid_rps_2``: paid requests per second through the two-chain gateway (`settle="deferred"`, our
  `PaymentAuth` paying half the calls on each chain, verification on each chain's node);
- ``settled_*``: payments each chain's settler landed at shutdown, ``txs_*`` the transactions it sent;
  ``exact_balances``: whether both payees' balances moved by exactly what was served.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx
from eth_account import Account
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import Chain, Devnets
from gateway import PaymentMiddleware
from tests._two_chains import Node
from x402 import LocalSigner
from x402.client import PaymentAuth, WalletSet

PRICE = 1000
CHAIN_IDS = (8453, 42161)


def _app() -> Starlette:
    async def paid(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/paid", paid)])


def _gateway(nodes: list[Node], pay_to: str, *, settle: str = "before-response") -> PaymentMiddleware:
    chains = [Chain.from_devnet(n.devnet, chain=n.one.chain_id, relayer=3) for n in nodes]
    return PaymentMiddleware(
        _app(),
        routes={"GET /paid": PRICE},
        chain=chains,
        schemes=["exact"],
        pay_to=pay_to,
        store="memory://",
        settle=settle,  # type: ignore[arg-type]
        secret=b"bench-multichain-secret-of-32-bytes-at-least",
    )


async def _challenges(app: PaymentMiddleware, n: int) -> tuple[float, int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        first = await client.get("/paid")
        size = sum(len(k) + len(v) for k, v in first.headers.raw)
        for _ in range(50):  # warm the caches (quotes, encoded offers)
            await client.get("/paid")
        started = time.perf_counter()
        for _ in range(n):
            response = await client.get("/paid")
            assert response.status_code == 402
        return (time.perf_counter() - started) / n * 1e6, size


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Devnets(list(CHAIN_IDS), backend="anvil", usdc_each=1_000) as devnet:
        nodes = [Node(devnet, chain_id) for chain_id in CHAIN_IDS]
        try:
            pay_to = str(Account.create().address)
            for count in (1, 2, 1, 2):  # interleaved, best of two: the machine is shared
                app = _gateway(nodes[:count], pay_to)
                try:
                    mean, size = await _challenges(app, args.challenges)
                finally:
                    await app.shutdown()
                out[f"challenge_us_{count}"] = min(mean, out.get(f"challenge_us_{count}", mean))
                out[f"challenge_bytes_{count}"] = size
            payee = str(Account.create().address)
            app = _gateway(nodes, payee, settle="deferred")
            payers = [LocalSigner.random() for _ in range(2)]
            for node in nodes:
                for payer in payers:
                    node.mint(payer.address, args.payments * PRICE)
            await app.startup()
            settlers = app.network_settlers
            transport = httpx.ASGITransport(app=app)
            clients = [
                httpx.AsyncClient(
                    transport=transport,
                    base_url="http://gw",
                    auth=PaymentAuth(
                        WalletSet([n.wallet(payer) for n in nodes]),
                        networks=[nodes[i].network, nodes[1 - i].network],
                    ),
                )
                for i, payer in enumerate(payers)
            ]
            started = time.perf_counter()
            for k in range(args.payments):
                response = await clients[k % 2].get("/paid")
                assert response.status_code == 200, response.text
            elapsed = time.perf_counter() - started
            for client in clients:
                await client.aclose()
            await app.shutdown()  # flushes each chain's queue through its own settler
            out["paid_rps_2"] = round(args.payments / elapsed, 1)
            for node in nodes:
                exact = settlers[node.network]["exact"]
                out[f"settled_{node.one.chain_id}"] = exact.paid
                out[f"txs_{node.one.chain_id}"] = exact.sent
            half = args.payments // 2
            out["exact_balances"] = [n.balance(payee) for n in nodes] == [
                (args.payments - half) * PRICE,
                half * PRICE,
            ]
        finally:
            for node in nodes:
                node.close()
    out["challenge_us_1"] = round(out["challenge_us_1"], 1)
    out["challenge_us_2"] = round(out["challenge_us_2"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--challenges", type=int, default=2000)
    parser.add_argument("--payments", type=int, default=60)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
