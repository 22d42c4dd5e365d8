"""A payment's replay claim belongs to the request that took it for as long as that request runs (issue 9,
item 3): a handler slower than `claim_ttl` keeps its claim, so the same credential presented meanwhile is
refused instead of served a second time; and a request body that does not arrive in time ends in a 408
that frees the claim. Real devnet, real stores, the real middleware over httpx.ASGITransport.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import DevnetState
from escrow.chain._rpc import Rpc
from gateway import ExactScheme, MemoryStore, PaidRoute, PaymentMiddleware, SettleMode
from gateway._store import PaymentStore
from gateway._stores import open_store
from tests.test_gateway_paid import PRICE, SECRET, Env, _reason
from tests.test_store import isolated_url

pytestmark = [pytest.mark.chain, pytest.mark.anyio]

CLAIM_TTL = 1.0
HANDLER_SECONDS = 1.5
AGAIN_AT = 1.2  # the copy arrives after the first claim's TTL, while its handler still runs
BODY_TIMEOUT = 0.5


async def _slow(request: Request) -> Response:
    await asyncio.sleep(HANDLER_SECONDS)
    return JSONResponse({"slow": "but paid once"})


async def _stalls_the_loop(request: Request) -> Response:
    time.sleep(HANDLER_SECONDS)  # blocks the event loop: not even the claim's renewal can run meanwhile
    return JSONResponse({"stalled": "content"})


async def _upload(request: Request) -> Response:
    return JSONResponse({"bytes": len(await request.body())})


async def _priced_by_body(request: Request) -> int:
    return len(await request.body()) + PRICE


def _gateway(env: Env, store: PaymentStore, settle: SettleMode) -> httpx.AsyncClient:
    app = PaymentMiddleware(
        Starlette(
            routes=[
                Route("/slow", _slow),
                Route("/stall", _stalls_the_loop),
                Route("/upload", _upload, methods=["POST"]),
                Route("/by-size", _upload, methods=["POST"]),
            ]
        ),
        routes={
            "GET /slow": PRICE,
            "GET /stall": PRICE,
            "POST /upload": PRICE,
            "POST /by-size": PaidRoute(price=_priced_by_body),
        },
        schemes=[ExactScheme(env.chain)],
        pay_to=env.payee,
        asset=env.asset,
        store=store,
        secret=SECRET,
        settle=settle,
        claim_ttl=CLAIM_TTL,
        body_timeout=BODY_TIMEOUT,
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30)


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with isolated_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def world(devnet: DevnetState, store_url: str) -> AsyncIterator[tuple[Env, PaymentStore]]:
    rpc = Rpc(devnet.rpc_url)
    store = await open_store(store_url)
    env = Env(devnet, rpc, MemoryStore(), "before-response")  # its chain handles and helpers only
    try:
        yield env, store
    finally:
        await env.client.aclose()
        await store.close()
        await rpc.aclose()


@pytest.mark.parametrize("settle", ["before-response", "deferred"])
async def test_a_copy_presented_while_a_slow_handler_outlives_its_claim_ttl_is_not_served(
    world: tuple[Env, PaymentStore], settle: SettleMode
) -> None:
    env, store = world
    payer = await env.payer()
    header = {"PAYMENT-SIGNATURE": env.v2_header(payer)}
    async with _gateway(env, store, settle) as client:

        async def again() -> httpx.Response:
            await asyncio.sleep(AGAIN_AT)
            return await client.get("/slow", headers=header)

        first, second = await asyncio.gather(client.get("/slow", headers=header), again())
    assert (first.status_code, second.status_code) == (200, 402), (first.text, second.text)
    assert first.json() == {"slow": "but paid once"} and "paid once" not in second.text
    assert _reason(second) == "invalid_exact_evm_nonce_already_used"
    stats = await store.stats()
    if settle == "deferred":
        assert (stats.queued, stats.settled) == (1, 0)  # one payment for the settler, not two
    else:
        assert await env.balance(env.payee) == PRICE
        assert (stats.queued, stats.settled) == (0, 1)


async def test_a_request_that_lost_its_claim_is_not_served_and_charges_nothing(
    world: tuple[Env, PaymentStore],
) -> None:
    env, store = world
    payer = await env.payer()
    header = {"PAYMENT-SIGNATURE": env.v2_header(payer)}
    async with _gateway(env, store, "deferred") as client:
        response = await client.get("/stall", headers=header)
        # Its claim lapsed while the loop was stalled: `complete` refuses, the content is withheld.
        assert response.status_code == 409 and "content" not in response.text
        assert response.json()["error"] == "claim_lost"
        assert (await store.stats()).queued == 0
        response = await client.get("/slow", headers=header)  # the payment was not used: it still pays
        assert response.status_code == 200
    assert (await store.stats()).queued == 1


async def test_a_body_that_does_not_arrive_in_time_is_a_408_and_frees_the_payment(
    world: tuple[Env, PaymentStore],
) -> None:
    env, store = world
    payer = await env.payer()
    header = {"PAYMENT-SIGNATURE": env.v2_header(payer)}

    async def trickle() -> AsyncIterator[bytes]:
        yield b"the first bytes"
        await asyncio.sleep(30)  # ... and then nothing
        yield b"never"

    async with _gateway(env, store, "before-response") as client:
        started = asyncio.get_running_loop().time()
        response = await client.post("/upload", headers=header, content=trickle())
        waited = asyncio.get_running_loop().time() - started
        assert response.status_code == 408 and waited < BODY_TIMEOUT + 5
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == 408 and "did not arrive within 0.5 s" in problem["detail"]
        assert await env.balance(env.payee) == 0
        # Nothing was charged and the claim was released: the same payment buys a complete upload.
        response = await client.post("/upload", headers=header, content=b"0123456789")
        assert response.status_code == 200 and response.json() == {"bytes": 10}
        assert await env.balance(env.payee) == PRICE
        # A price computed from the body waits for it the same way (before any payment is looked at).
        response = await client.post("/by-size", content=trickle())
        assert response.status_code == 408 and response.json()["status"] == 408
