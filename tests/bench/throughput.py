"""Paid requests per second through the gateway, in process, beside the official x402 SDK in the same run.

    python -m tests.bench.throughput [--calls 4000] [--chain-calls 1000] [--official-calls 2000]
                                     [--official-chain-calls 200] [--concurrency 16] [--repeat 3]
                                     [--no-chain] [--no-official]

Both servers are driven in process through ``httpx.ASGITransport`` by ``concurrency`` concurrent tasks;
ours runs here, the official one (``PaymentMiddlewareASGI`` from x402 2.25, whose package name clashes with
ours) in the peer venv through ``tests.bench._official.run_official``. Each figure is the median of
``--repeat`` runs; the last line of output is one JSON object:

- ``ours_rps`` / ``official_rps`` / ``ratio``: paid requests/s with a stub settler, payments signed
  beforehand: the server's own cost. Both stubs recover the EIP-3009 signer and compare it with ``from``
  (ours: ``StubChain`` below; theirs: ``--verify`` in ``tests/peers/bench_official.py``); nothing goes on
  chain. ``official_trusting_rps``: the official server with a stub that checks nothing (its ceiling).
- ``ours_e2e_rps`` / ``official_e2e_rps`` / ``e2e_ratio``: the same stubs paid through each side's own
  client (ours ``PaymentAuth``, theirs ``x402AsyncTransport``): 402, sign, paid retry per call.
- ``ours_chain_rps`` / ``official_chain_rps`` / ``chain_ratio``: paid requests/s with real settlement,
  each run on a fresh anvil devnet, payments signed beforehand: ours ``ExactEvm`` with
  ``settle="before-response"`` (simulation, ``transferWithAuthorization``, receipt, Transfer event), theirs
  ``x402Facilitator`` + ``FacilitatorWeb3Signer``.
- ``client_sign_us`` / ``official_sign_us`` / ``sign_ratio``: one payment signed and encoded into its
  ``PAYMENT-SIGNATURE`` header (ours ``Eip3009Wallet.pay`` + ``payment_headers``; theirs
  ``x402Client.create_payment_payload`` + ``encode_payment_signature_header``); ``sign_ratio`` is
  official / ours (how many times faster ours signs).
- ``unpaid_rps`` / ``official_unpaid_rps``: 402 answers/s (ours offers x402 v2, v1 and MPP at once, with a
  fresh HMAC challenge each; theirs x402 v2 only).
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
from escrow.chain._rpc import Rpc, TxSender
from escrow.payments._exact import ExactEvm, ExactRejected
from gateway import Asset, ExactScheme, MemoryStore, PaymentMiddleware
from x402 import (
    Eip712Domain,
    ExactEvmPayload,
    LocalSigner,
    PaymentRequirements,
    Reason,
    recover_transfer_authorization,
)
from x402.client import Eip3009Wallet, Offer, PaymentAuth, SpendPolicy, payment_headers

from ._official import run_official

#: Figures the research brief measured for the official SDK (end to end, stub / settled); context only.
REFERENCE = {"official_e2e_rps": 424.0, "official_chain_rps": 37.0}
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
        # Like for like: the official SDK keeps no payment state; `python -m tests.bench.store` prices ours.
        store=MemoryStore(),
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
        "unpaid_rps": await _unpaid(app, calls, concurrency),
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
        return {"ours_chain_rps": rps}
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


def official_stub_figures(calls: int, concurrency: int) -> dict[str, float]:
    """The official server with the same kind of stub as ours (signer recovered): pre-signed, then through
    its own client; and once with a stub that checks nothing."""
    presigned = run_official(
        concurrency, calls, "stub", presigned=True, verify=True, unpaid=calls, sign_rounds=0
    )
    e2e = run_official(concurrency, calls // 4, "stub", verify=True, sign_rounds=0)
    trusting = run_official(concurrency, calls, "stub", presigned=True, sign_rounds=0)
    for result in (presigned, e2e, trusting):
        _all_paid(result)
    return {
        "official_rps": presigned["req_per_s"],
        "official_e2e_rps": e2e["req_per_s"],
        "official_trusting_rps": trusting["req_per_s"],
        "official_unpaid_rps": presigned["unpaid_per_s"],
        "official_sign_us": presigned["sign_us"],
    }


def official_chain_figures(calls: int, concurrency: int) -> dict[str, float]:
    """The official facilitator settling on its own fresh devnet (see `on_fresh_devnet`)."""
    with Devnet() as state:
        result = run_official(
            concurrency, calls, "chain", devnet=state, presigned=True, sign_rounds=0, amount=PRICE
        )
    _all_paid(result)
    expected = PRICE * (calls + result["warmup"])
    if result.get("settled_amount") != expected:
        raise RuntimeError(f"the official facilitator settled {result.get('settled_amount')}, not {expected}")
    return {"official_chain_rps": result["req_per_s"]}


def _all_paid(result: dict[str, Any]) -> None:
    if set(result["statuses"]) != {"200"}:
        raise RuntimeError(f"the official server refused payments: {result}")


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or not theirs else round(ours / theirs, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=4000, help="our paid calls with the stub settler")
    parser.add_argument("--chain-calls", type=int, default=1000, help="our paid calls settled on anvil")
    parser.add_argument("--official-calls", type=int, default=2000, help="official paid calls, stub")
    parser.add_argument("--official-chain-calls", type=int, default=200, help="official calls on anvil")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-chain", action="store_true", help="skip the devnet runs")
    parser.add_argument("--no-official", action="store_true", help="skip the official SDK (no .venv-peers)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is reported")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def median(runs: list[dict[str, float]]) -> dict[str, float]:
        return {key: statistics.median(r[key] for r in runs) for key in runs[0]}

    def rounds(*runs: Callable[[], dict[str, float]]) -> list[dict[str, float]]:
        """Each run's median over `--repeat` rounds. The sides take turns within a round, so that a slow
        spell of the machine (other jobs, thermal) weighs on both rather than on whichever ran then."""
        results: list[list[dict[str, float]]] = [[] for _ in runs]
        for _ in range(args.repeat):
            for run, out in zip(runs, results, strict=True):
                out.append(run())
        return [median(out) for out in results]

    def ours(run: Callable[[], Coroutine[Any, Any, dict[str, float]]]) -> Callable[[], dict[str, float]]:
        return lambda: asyncio.run(run())

    figures: dict[str, Any] = {}
    stub_runs = [ours(lambda: stub_figures(args.calls, args.concurrency))]
    if not args.no_official:
        stub_runs.append(lambda: official_stub_figures(args.official_calls, args.concurrency))
    for result in rounds(*stub_runs):
        figures.update(result)
    print(
        f"ours, stub settler: {figures['ours_rps']:.0f} paid req/s "
        f"(client e2e {figures['ours_e2e_rps']:.0f}), {figures['unpaid_rps']:.0f} 402/s, "
        f"client signs in {figures['client_sign_us']:.0f} us",
        flush=True,
    )
    if not args.no_official:
        print(
            f"official, stub facilitator: {figures['official_rps']:.0f} paid req/s "
            f"(client e2e {figures['official_e2e_rps']:.0f}, trusting stub "
            f"{figures['official_trusting_rps']:.0f}), {figures['official_unpaid_rps']:.0f} 402/s, "
            f"client signs in {figures['official_sign_us']:.0f} us",
            flush=True,
        )
    if not args.no_chain:
        chain_runs = [ours(lambda: on_fresh_devnet(args.chain_calls, args.concurrency))]
        if not args.no_official:
            chain_runs.append(lambda: official_chain_figures(args.official_chain_calls, args.concurrency))
        for result in rounds(*chain_runs):
            figures.update(result)
        print(f"ours, settled on a devnet: {figures['ours_chain_rps']:.0f} paid req/s", flush=True)
        if not args.no_official:
            print(f"official, settled on a devnet: {figures['official_chain_rps']:.0f} req/s", flush=True)

    keys = (
        "ours_rps", "official_rps", "ratio", "ours_e2e_rps", "official_e2e_rps", "e2e_ratio",
        "official_trusting_rps", "ours_chain_rps", "official_chain_rps", "chain_ratio",
        "client_sign_us", "official_sign_us", "sign_ratio", "unpaid_rps", "official_unpaid_rps",
    )  # fmt: skip
    out: dict[str, Any] = {key: figures.get(key) for key in keys}
    out["ratio"] = _ratio(out["ours_rps"], out["official_rps"])
    out["e2e_ratio"] = _ratio(out["ours_e2e_rps"], out["official_e2e_rps"])
    out["chain_ratio"] = _ratio(out["ours_chain_rps"], out["official_chain_rps"])
    out["sign_ratio"] = _ratio(out["official_sign_us"], out["client_sign_us"])
    out.update(
        calls=args.calls,
        chain_calls=None if args.no_chain else args.chain_calls,
        official_calls=None if args.no_official else args.official_calls,
        official_chain_calls=None if args.no_official or args.no_chain else args.official_chain_calls,
        concurrency=args.concurrency,
        repeat=args.repeat,
        reference=REFERENCE,
        seconds=time.perf_counter() - started,
    )
    # Ratios keep their two decimals; every other float is rounded to one.
    print(
        json.dumps(
            {k: round(v, 1) if isinstance(v, float) and "ratio" not in k else v for k, v in out.items()}
        )
    )


if __name__ == "__main__":
    main()
