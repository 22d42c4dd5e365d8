"""`examples.subagent` serves `/metered` and `/stream` over MPP sessions on the devnet's AgentChannels."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from escrow import Chain, DevnetState, Rpc, TxSender
from examples.subagent import build_app, with_sessions
from gateway import EoaChannelOpener
from tests._serving import serving
from x402 import LocalSigner
from x402.client_session import SessionClient

pytestmark = pytest.mark.anyio


async def _balance(rpc: Rpc, token: str, who: str) -> int:
    data = await rpc.call(token, bytes.fromhex("70a08231") + bytes(12) + bytes.fromhex(who[2:]))
    return int.from_bytes(data, "big")


@contextlib.asynccontextmanager
async def _subagent(devnet: DevnetState, *, served: bool) -> AsyncIterator[tuple[SessionClient, str, Rpc]]:
    chain = Chain.from_devnet(devnet)
    payee = devnet.accounts[7]
    app = with_sessions(
        build_app(chain, pay_to=payee.address, store="memory://"),
        chain,
        channels=devnet.contracts["channels"],
        payee_key=payee.private_key,
        secret="x" * 64,
    )
    payer = TxSender(chain.rpc, devnet.accounts[6].private_key, chain_id=devnet.chain_id)
    async with contextlib.AsyncExitStack() as stack:
        if served:
            base = await stack.enter_async_context(serving(lambda base: app))
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30))
        else:
            transport = httpx.ASGITransport(app=app)
            http = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://a")
            )
        opener = EoaChannelOpener(payer, devnet.contracts["usdc"])
        client = SessionClient(
            http, signer=LocalSigner.random(), opener=opener, deposit=200_000, max_voucher_step=10_000
        )
        yield client, payee.address, chain.rpc
    await chain.aclose()


async def test_metered_charges_the_units_used(devnet: DevnetState) -> None:
    async with _subagent(devnet, served=False) as (client, payee, rpc):
        usdc = devnet.contracts["usdc"]
        before = await _balance(rpc, usdc, payee)
        # One 402 offers the route per call (x402 `escrow` here) and over the session.
        unpaid = await client.http.get("/metered?units=3")
        assert unpaid.status_code == 402 and "payment-required" in unpaid.headers
        assert 'intent="session"' in unpaid.headers["www-authenticate"]
        r = await client.request("GET", "/metered?units=3")
        assert r.status_code == 200 and r.json()["units"] == 3
        assert "payment-response" not in r.headers  # paid over the session, not again per call
        assert client.receipts[-1].spent == "300"  # 3 x $0.0001, not the $0.01 maximum
        bad = await client.request("GET", "/metered?units=101")
        assert bad.status_code == 400  # a failed call is not charged
        assert (await client.request("GET", "/metered?units=0")).status_code == 200
        receipt = await client.close("/metered")
        assert receipt is not None and receipt.spent == "300"
        assert await _balance(rpc, usdc, payee) - before == 300


async def test_stream_charges_per_token(devnet: DevnetState) -> None:
    async with _subagent(devnet, served=True) as (client, payee, rpc):
        usdc = devnet.contracts["usdc"]
        before = await _balance(rpc, usdc, payee)
        events = [e async for e in client.stream("/stream?tokens=1200")]
        assert sum(1 for name, _ in events if name == "message") == 1200
        receipt = await client.close("/stream")
        assert receipt is not None and receipt.spent == str(1200 * 10)
        assert await _balance(rpc, usdc, payee) - before == 1200 * 10
