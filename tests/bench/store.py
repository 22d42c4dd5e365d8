"""`python -m tests.bench.store`: paid-request-shaped store throughput per backend.

A "request" is what the gateway asks of its store for one paid call. Two store shapes are measured:
`paid` = claim + finalize + put_receipt + enqueue (four calls), and `complete` = claim + complete (the
same work in two calls, one of them one transaction; the gateway pipeline uses this one), reported as
`<backend>_ops_per_s` and `<backend>_complete_ops_per_s`. Then the whole gateway: paid requests per second
through `PaymentMiddleware` in process (httpx ASGITransport; x402 v2 decode, EIP-3009 signature recovery,
the `exact` checks, replay claim, handler, receipt) with a stub chain (nothing is sent), payments signed
beforehand: `<backend>_gateway_ops_per_s` with `settle="deferred"` (claim + complete with the queue item)
and `<backend>_gateway_now_ops_per_s` with `settle="before-response"` (claim + in-flight record +
complete + mark_settled, the durable path a crash can be recovered from). Each runs with an in-process
concurrency of 16 for a few seconds per backend (`sqlite` is the default synchronous=full, `sqlite_normal`
the opt-in). `<backend>_<shape>_cost_us` is the extra wall time per request relative to the memory store
in the same shape (1e6/ops - 1e6/memory_ops). The last line printed is one JSON object. Numbers from a
shared, loaded machine swing a lot (fsync-bound ones most): compare runs taken back to back.

To add a scenario, add an entry to SCENARIOS: an async factory that gets the opened store and returns the
per-request coroutine function (or that and an async clean-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import Asset, ExactScheme, PaidRoute, PaymentMiddleware, SettleMode
from gateway._store import PaymentStore, Settlement
from gateway._stores import open_store
from tests.test_store import isolated_url
from x402 import (
    Eip712Domain,
    ExactEvmPayload,
    LocalSigner,
    PaymentRejected,
    PaymentRequirements,
    Reason,
    recover_transfer_authorization,
)
from x402.client import Eip3009Wallet, Offer, payment_headers

Request = Callable[[int], Awaitable[None]]
Cleanup = Callable[[], Awaitable[None]]
Scenario = Callable[[PaymentStore], Awaitable[Request | tuple[Request, Cleanup]]]

RECEIPT = b'{"success":true,"transaction":"","network":"eip155:84532","payer":"0x' + b"ab" * 20 + b'"}'
PAYLOAD = bytes(range(256)) * 2  # about the size of a signed escrow payment


def _settlement(key: str) -> Settlement:
    return Settlement(
        key=key, kind="escrow", payload=PAYLOAD, payer="0x" + "cd" * 20, amount=10_000, created_at=time.time()
    )


async def paid(store: PaymentStore) -> Request:
    async def request(n: int) -> None:
        key = f"pay-{n}"
        assert await store.claim(key, ttl=60)
        await store.finalize(key)
        await store.put_receipt(key, RECEIPT)
        await store.enqueue(_settlement(key))

    return request


async def complete(store: PaymentStore) -> Request:
    async def request(n: int) -> None:
        key = f"pay-{n}"
        holder = await store.claim(key, ttl=60)
        assert holder
        await store.complete(key, holder, receipt=RECEIPT, settlement=_settlement(key))

    return request


# -- the whole gateway, with a stub chain -------------------------------------------------------------------

STUB_ASSET = Asset(
    address="0x5FbDB2315678afecb367f032d93F642f64180aa3", chain_id=31337, name="USD Coin", version="2"
)
PAY_TO = "0x" + "77" * 20
PRICE = 1000
_signed: list[dict[str, str]] = []  # payment headers signed once, reused by every backend (fresh stores)


class StubChain:
    """The chain side of `exact` without a chain: the signature is recovered, nothing is sent."""

    async def verify(self, domain: Eip712Domain, payload: ExactEvmPayload) -> None:
        if recover_transfer_authorization(domain, payload).lower() != payload.authorization.from_.lower():
            raise PaymentRejected(Reason.SIGNATURE, "bad signature")

    async def settle(self, domain: Eip712Domain, payload: ExactEvmPayload) -> str:
        return "0x" + "00" * 32


def sign_payments(count: int) -> list[dict[str, str]]:
    """At least `count` PAYMENT-SIGNATURE headers for GET /hello, from 8 payers (signed once, kept)."""
    if len(_signed) < count:
        asset = STUB_ASSET
        requirements = PaymentRequirements(
            scheme="exact",
            network=asset.network,
            asset=asset.address,
            amount=str(PRICE),
            pay_to=PAY_TO,
            max_timeout_seconds=600,
            extra={"name": asset.name, "version": asset.version},
        )
        offer = Offer(
            protocol="x402v2",
            scheme="exact",
            network=asset.network,
            asset=asset.address,
            amount=PRICE,
            pay_to=PAY_TO,
            max_timeout_seconds=600,
            extra=requirements.extra,
            requirements=requirements,
        )
        domains = {asset.address: (asset.name, asset.version)}
        wallets = [Eip3009Wallet(LocalSigner.random(), asset.chain_id, domains) for _ in range(8)]
        _signed.extend(payment_headers(offer, wallets[i % 8].pay(offer)) for i in range(len(_signed), count))
    return _signed


async def _hello(request: HttpRequest) -> Response:
    return JSONResponse({"hello": "world"})


def _gateway(settle: SettleMode) -> Scenario:
    async def scenario(store: PaymentStore) -> tuple[Request, Cleanup]:
        app = PaymentMiddleware(
            Starlette(routes=[Route("/hello", _hello)]),
            routes={"GET /hello": PaidRoute(price=PRICE, max_timeout_seconds=600)},  # signed once, used late
            schemes=[ExactScheme(StubChain())],
            pay_to=PAY_TO,
            asset=STUB_ASSET,
            store=store,
            settle=settle,
            secret=os.urandom(32),
        )
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench")
        payments = _signed

        async def request(n: int) -> None:
            if n >= len(payments):
                raise RuntimeError(f"only {len(payments)} payments were signed: raise GATEWAY_RATE_CAP")
            response = await client.get("/hello", headers=payments[n])
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

        return request, client.aclose

    return scenario


GATEWAY_RATE_CAP = 4000  # paid requests/s the pre-signed pool is sized for (well above what one core does)
SCENARIOS: dict[str, Scenario] = {
    "paid": paid,
    "complete": complete,
    "gateway": _gateway("deferred"),
    "gateway_now": _gateway("before-response"),
}
# backend name in the JSON -> (test backend, extra URL query)
BACKENDS: dict[str, tuple[str, str]] = {
    "memory": ("memory", ""),
    "sqlite": ("sqlite", ""),
    "sqlite_normal": ("sqlite", "synchronous=normal"),
    "postgres": ("postgres", ""),
    "postgres_redis": ("postgres+redis", ""),
}


async def measure(url: str, scenario: Scenario, *, concurrency: int, seconds: float) -> float:
    """Requests per second of `scenario` against a fresh store at `url`."""
    store = await open_store(url)
    cleanup: Cleanup | None = None
    try:
        made = await scenario(store)
        request, cleanup = made if isinstance(made, tuple) else (made, None)
        counter = iter(range(10**9))
        for _ in range(50):  # warm up pools, prepared statements, page cache
            await request(next(counter))
        done = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await request(next(counter))
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)
    finally:
        if cleanup is not None:
            await cleanup()
        await store.close()


def _with_query(url: str, extra: str) -> str:
    if not extra:
        return url
    return url + ("&" if "?" in url else "?") + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    out: dict[str, float | int | None] = {"concurrency": args.concurrency, "seconds": args.seconds}
    shapes: dict[str, str] = {}  # result key -> its scenario suffix ("", "_complete", "_gateway", ...)
    sign_payments(int(args.seconds * GATEWAY_RATE_CAP) + 100)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends.split(","):
            backend, extra = BACKENDS[name]
            for scenario_name, scenario in SCENARIOS.items():
                label = name if scenario_name == "paid" else f"{name}_{scenario_name}"
                shape = "" if scenario_name == "paid" else f"_{scenario_name}"
                try:
                    with isolated_url(backend, Path(tmp)) as url:
                        ops = asyncio.run(
                            measure(
                                _with_query(url, extra),
                                scenario,
                                concurrency=args.concurrency,
                                seconds=args.seconds,
                            )
                        )
                except BaseException as exc:  # pytest.skip outside pytest, server down: report, go on
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    print(f"{label:>24}: skipped ({type(exc).__name__}: {exc})")
                    out[f"{label}_ops_per_s"] = None
                    continue
                out[f"{label}_ops_per_s"] = round(ops, 1)
                shapes[f"{label}_ops_per_s"] = shape
                print(f"{label:>24}: {ops:10.1f} requests/s")
    for key, rate in list(out.items()):
        if key not in shapes or key.startswith("memory"):
            continue
        memory = out.get(f"memory{shapes[key]}_ops_per_s")  # the same shape in memory
        if isinstance(rate, float) and isinstance(memory, float):
            out[key.replace("_ops_per_s", "_cost_us")] = round(1e6 / rate - 1e6 / memory, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
