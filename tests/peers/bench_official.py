"""Peer benchmark: the official x402 middleware's paid requests per second, in-process (.venv-peers).

The app is ``x402_server.build_app`` (official ``PaymentMiddlewareASGI`` + ``x402ResourceServer``);
the payer is the official ``x402AsyncTransport`` over ``httpx.ASGITransport``, so no socket is
involved. ``concurrency`` tasks share ``n`` paid requests (each one is 402 -> sign -> paid retry).

* ``--settle stub``: a facilitator that answers verify ok / settle ok without a chain;
* ``--settle chain``: the official ``x402Facilitator`` + ``FacilitatorWeb3Signer`` on the devnet,
  one ``transferWithAuthorization`` per request (needs --rpc-url, --asset, payer and facilitator keys).

It also times the official client's signing alone (``ExactEvmScheme.create_payment_payload``).
Output (last line, JSON): ``{"req_per_s", "seconds", "n", "concurrency", "statuses", "sign_ms", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import time
from typing import Any

import httpx
from _peer import emit, token_domain
from eth_account import Account
from eth_keys.backends import get_backend
from x402.http.clients.httpx import x402AsyncTransport
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.schemas import PaymentRequirements
from x402_server import build_app, make_facilitator

from x402 import x402Client

STUB_ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
STUB_PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"


def time_signing(account: Any, network: str, asset: str, name: str, version: str, rounds: int) -> float:
    """Mean milliseconds per official ``create_payment_payload`` (EIP-3009 typed data + ECDSA)."""
    scheme = ExactEvmScheme(signer=account)
    requirements = PaymentRequirements(
        scheme="exact",
        network=network,
        asset=asset,
        amount="1000",
        pay_to=STUB_PAY_TO,
        max_timeout_seconds=60,
        extra={"name": name, "version": version},
    )
    for _ in range(10):
        scheme.create_payment_payload(requirements)
    start = time.perf_counter()
    for _ in range(rounds):
        scheme.create_payment_payload(requirements)
    return (time.perf_counter() - start) * 1000 / rounds


async def run(args: argparse.Namespace) -> dict[str, Any]:
    network = f"eip155:{args.chain_id}"
    if args.settle == "chain":
        if not (args.rpc_url and args.asset and args.payer_key and args.facilitator_key):
            raise SystemExit("--settle chain needs --rpc-url, --asset, --payer-key, --facilitator-key")
        asset, pay_to = args.asset, args.pay_to or Account.create().address
        name, version = token_domain(args.rpc_url, asset)
        payer = Account.from_key(args.payer_key)
    else:
        asset, pay_to = args.asset or STUB_ASSET, args.pay_to or STUB_PAY_TO
        name, version = "USD Coin", "2"
        payer = Account.from_key(args.payer_key) if args.payer_key else Account.create()

    facilitator = make_facilitator(args.settle, network, args.rpc_url, args.facilitator_key)
    app, _ = build_app(
        facilitator=facilitator,
        network=network,
        asset=asset,
        pay_to=pay_to,
        amount=args.amount,
        name=name,
        version=version,
        record=False,
    )
    client = x402Client()
    client.register(network, ExactEvmScheme(signer=payer))
    client.set_spend_controls({"allowed_assets": [{"network": network, "asset": asset}]})  # type: ignore[typeddict-item]
    transport = x402AsyncTransport(client, transport=httpx.ASGITransport(app=app))
    statuses: collections.Counter[int] = collections.Counter()

    async with httpx.AsyncClient(transport=transport, base_url="http://bench.local", timeout=120) as http:
        for _ in range(args.warmup):
            await http.get("/paid")  # first-request initialisation and caches, not counted

        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.n):
            queue.put_nowait(i)

        async def worker() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                response = await http.get("/paid")
                statuses[response.status_code] += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        seconds = time.perf_counter() - start

    paid = statuses.get(200, 0)
    return {
        "impl": "x402-official-2.25.0",
        "settle": args.settle,
        "n": args.n,
        "concurrency": args.concurrency,
        "seconds": round(seconds, 4),
        "req_per_s": round(paid / seconds, 2) if seconds > 0 else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items()) if v},
        "ecc_backend": type(get_backend()).__name__,
        "sign_ms": round(time_signing(payer, network, asset, name, version, args.sign_rounds), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settle", choices=["stub", "chain"], default="stub")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sign-rounds", type=int, default=300)
    parser.add_argument("--chain-id", type=int, default=31337)
    parser.add_argument("--rpc-url")
    parser.add_argument("--asset")
    parser.add_argument("--pay-to")
    parser.add_argument("--amount", default="1000")
    parser.add_argument("--payer-key", default=os.environ.get("PEER_PRIVATE_KEY"))
    parser.add_argument("--facilitator-key", default=os.environ.get("PEER_FACILITATOR_KEY"))
    emit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
