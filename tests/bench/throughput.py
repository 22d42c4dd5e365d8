"""Paid requests per second through the gateway, in process.

    python -m tests.bench.throughput [--calls 4000] [--settled-calls 1500] [--concurrency 16] [--no-chain]

Measures, with httpx.ASGITransport and `concurrency` concurrent callers:

- `ours_rps`: paid requests/s with a stub settler (signature recovered, `exact` checks, replay claim, handler,
  receipt; no chain), payments signed beforehand: the server's own cost, comparable to the official SDK's
  424 paid req/s with a stub facilitator;
- `ours_e2e_rps`: the same through our client (`PaymentAuth`: 402, sign, paid retry per call);
- `ours_settled_rps`: paid requests/s with real settlement on a fresh anvil devnet
  (`settle="before-response"`: verify with simulation, `transferWithAuthorization`, receipt, Transfer
  event), comparable to the official SDK's 37 req/s;
- `unpaid_402_rps`: 402 challenges/s (every offer in x402 v2, v1 and MPP, one fresh HMAC challenge each);
- `client_sign_us`: time for our wallet to sign one payment and encode its header.

The last line of output is one JSON object. `official_rps` / `official_settled_rps` stay null here: the
official SDK lives in `.venv-peers` (its package is also named `x402`), so its run is a separate process;
plug it into `official()` below and the ratios fill themselves in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
from eth_utils.address import to_checksum_address
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import Devnet, DevnetState
from escrow._exact import ExactEvm, ExactRejected
from escrow._rpc import Rpc, TxSender
from gateway import Asset, ExactScheme, PaymentMiddleware
from x402 import (
    Eip712Domain,
    ExactEvmPayload,
    LocalSigner,
    PaymentRequirements,
    Reason,
    recover_transfer_authorization,
)
from x402.client import Eip3009Wallet, Offer, PaymentAuth, SpendPolicy, payment_headers

#: Reference figures from the official SDKs, measured by the research brief on the same kind of setup.
REFERENCE = {"official_rps": 424.0, "official_settled_rps": 37.0}
STUB_ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PRICE = 1000


class StubChain:
    """A local settler: the signature is checked (EOA), nothing goes on chain."""

    async def verify(self, domain: Eip712Domain, payload: ExactEvmPayload) -> None:
        if recover_transfer_authorization(domain, payload) != payload.authorization.from_:
            raise ExactRejected("bad signature", code=Reason.SIGNATURE)

    async def settle(self, domain: Eip712Domain, payload: ExactEvmPayload) -> str:
        return "0x" + "00" * 32


async def _hello(request: Request) -> Response:
    return JSONResponse({"hello": "world"})


def _paid_app(asset: Asset, pay_to: str, chain: Any) -> PaymentMiddleware:
    return PaymentMiddleware(
        Starlette(routes=[Route("/hello", _hello)]),
        routes={"GET /hello": PRICE},
        schemes=[ExactScheme(chain)],
        pay_to=pay_to,
        asset=asset,
        secret=os.urandom(32),
    )


def _offer(asset: Asset, pay_to: str) -> Offer:
    requirements = PaymentRequirements(
        scheme="exact",
        network=asset.network,
        asset=asset.address,
        amount=str(PRICE),
        pay_to=pay_to,
        max_timeout_seconds=60,
        extra={"name": asset.name, "version": asset.version},
    )
    return Offer(
        protocol="x402v2",
        scheme="exact",
        network=asset.network,
        asset=asset.address,
        amount=PRICE,
        pay_to=pay_to,
        max_timeout_seconds=60,
        extra=requirements.extra,
        requirements=requirements,
    )


def _sign_headers(
    wallets: list[Eip3009Wallet], offer: Offer, count: int
) -> tuple[list[dict[str, str]], float]:
    """`count` paid-request headers, round-robin over `wallets`; also the mean microseconds per payment."""
    out = []
    start = time.perf_counter()
    for i in range(count):
        out.append(payment_headers(offer, wallets[i % len(wallets)].pay(offer)))
    return out, (time.perf_counter() - start) / count * 1e6


async def _drive(app: Any, jobs: list[dict[str, str]], concurrency: int, *, auth: Any = None) -> float:
    """Requests/s for GET /hello with each of `jobs` as headers; every answer must be a 200."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", auth=auth) as client:
        queue = iter(jobs)

        async def worker() -> None:
            for headers in queue:
                response = await client.get("/hello", headers=headers)
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text[:300]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(jobs) / (time.perf_counter() - start)


async def _unpaid(app: Any, count: int, concurrency: int) -> float:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        remaining = iter(range(count))

        async def worker() -> None:
            for _ in remaining:
                if (await client.get("/hello")).status_code != 402:
                    raise RuntimeError("expected a 402")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - start)


async def stub_figures(calls: int, concurrency: int) -> dict[str, float]:
    asset = Asset(address=STUB_ASSET, chain_id=31337, name="USD Coin", version="2")
    pay_to = LocalSigner.random().address
    app = _paid_app(asset, pay_to, StubChain())
    wallets = [Eip3009Wallet(LocalSigner.random(), 31337, {STUB_ASSET: ("USD Coin", "2")}) for _ in range(8)]
    headers, sign_us = _sign_headers(wallets, _offer(asset, pay_to), calls)
    await _drive(app, headers[: min(200, calls)], concurrency)  # warm-up: imports, caches, pools
    rps = await _drive(app, headers[min(200, calls) :], concurrency)
    auth = PaymentAuth(wallets[0], SpendPolicy())
    e2e = await _drive(app, [{}] * (calls // 4), concurrency, auth=auth)
    return {
        "ours_rps": rps,
        "ours_e2e_rps": e2e,
        "unpaid_402_rps": await _unpaid(app, calls, concurrency),
        "client_sign_us": sign_us,
    }


async def settled_figures(state: DevnetState, calls: int, concurrency: int) -> dict[str, float]:
    usdc = to_checksum_address(state.contracts["usdc"])
    asset = Asset(address=usdc, chain_id=state.chain_id, name=state.usdc_name, version=state.usdc_version)
    pay_to = LocalSigner.random().address
    rpc = Rpc(state.rpc_url)
    try:
        relayer = TxSender(rpc, state.accounts[9].private_key, chain_id=state.chain_id)
        app = _paid_app(asset, pay_to, ExactEvm(rpc, relayer))
        wallets = [
            Eip3009Wallet(LocalSigner(a.private_key), state.chain_id, {usdc: (asset.name, asset.version)})
            for a in state.accounts[1:9]
        ]
        headers, _ = _sign_headers(wallets, _offer(asset, pay_to), calls)
        before = await _balance(rpc, usdc, pay_to)
        rps = await _drive(app, headers, concurrency)
        moved = await _balance(rpc, usdc, pay_to) - before
        if moved != PRICE * calls:
            raise RuntimeError(f"settled {moved}, expected {PRICE * calls}")
        return {"ours_settled_rps": rps}
    finally:
        await rpc.aclose()


async def on_fresh_devnet(calls: int, concurrency: int) -> dict[str, float]:
    """One settled run on its own devnet: anvil gets slower as its state grows (it snapshots every block's
    state), so runs sharing one chain would not measure the same thing."""
    with Devnet() as state:
        return await settled_figures(state, calls, concurrency)


async def _balance(rpc: Rpc, token: str, who: str) -> int:
    data = bytes.fromhex("70a08231") + bytes(12) + bytes.fromhex(who[2:])
    return int.from_bytes(await rpc.call(token, data), "big")


def official() -> dict[str, float | None]:
    """The official SDKs' figures on this machine. The interop suite fills this in (it must run the
    `.venv-peers` interpreter in a subprocess and parse its JSON); until then: unknown."""
    return {"official_rps": None, "official_settled_rps": None}


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or not theirs else round(ours / theirs, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=4000, help="paid calls with the stub settler")
    parser.add_argument("--settled-calls", type=int, default=1000, help="paid calls settled on anvil")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-chain", action="store_true", help="skip the devnet run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is reported")
    args = parser.parse_args(argv)

    def median(run: Callable[[], Coroutine[Any, Any, dict[str, float]]]) -> dict[str, float]:
        runs: list[dict[str, float]] = [asyncio.run(run()) for _ in range(args.repeat)]
        return {key: statistics.median(r[key] for r in runs) for key in runs[0]}

    figures: dict[str, Any] = dict(median(lambda: stub_figures(args.calls, args.concurrency)))
    print(
        f"stub settler: {figures['ours_rps']:.0f} paid req/s (client e2e {figures['ours_e2e_rps']:.0f}), "
        f"{figures['unpaid_402_rps']:.0f} 402/s, client signs in {figures['client_sign_us']:.0f} us"
    )
    figures["ours_settled_rps"] = None
    if not args.no_chain:
        figures.update(median(lambda: on_fresh_devnet(args.settled_calls, args.concurrency)))
        print(f"settled on a devnet: {figures['ours_settled_rps']:.0f} paid req/s")
    figures.update(official())
    figures["ratio"] = _ratio(figures["ours_rps"], figures["official_rps"])
    figures["settled_ratio"] = _ratio(figures["ours_settled_rps"], figures["official_settled_rps"])
    figures["reference"] = REFERENCE
    figures["ratio_vs_reference"] = _ratio(figures["ours_rps"], REFERENCE["official_rps"])
    figures["settled_ratio_vs_reference"] = _ratio(
        figures["ours_settled_rps"], REFERENCE["official_settled_rps"]
    )
    figures["concurrency"] = args.concurrency
    rounded = {k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}
    print(json.dumps(rounded, sort_keys=False))


if __name__ == "__main__":
    main()
