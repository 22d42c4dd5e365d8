"""A session-paid app on the devnet's anvil: AgentChannels deployed, a fresh payer and payee, the paywall."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from escrow import DevnetState, Rpc, TxSender
from escrow.chain._abi import ContractAbi
from escrow.payments._escrow import deploy_contract, escrow_artifact
from gateway import MemoryStore, PaymentStore
from gateway._channels import AgentChannelsChain, ChannelSettler, EoaChannelOpener
from gateway._metering import charge
from gateway._pricing import Asset
from gateway._session import SessionPaywall, SessionRoute, billed_sse
from tests._serving import serving
from x402 import LocalSigner
from x402.client import SpendPolicy
from x402.client_session import SessionClient

UNIT = 100  # $0.0001 per unit on /meter (maximum 100 units: $0.01)
TOKEN = 10  # $0.00001 per streamed token


async def _tokens(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield f"t{i}"
        await asyncio.sleep(0)


def app() -> Starlette:
    async def once(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def meter(request: Request) -> JSONResponse:
        units = int(request.query_params.get("units", "1"))
        if request.query_params.get("via") == "header":
            return JSONResponse(
                {"units": units}, headers={"Settlement-Overrides": f'{{"amount": "{units * UNIT}"}}'}
            )
        charge(request, units * UNIT)
        return JSONResponse({"units": units})

    async def stream(request: Request) -> StreamingResponse:
        n = int(request.query_params.get("tokens", "10"))
        return StreamingResponse(billed_sse(request, _tokens(n)), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/once", once),
            Route("/meter", meter),
            Route("/stream", stream, methods=["GET", "POST"]),
        ]
    )


ROUTES = {
    "/once": SessionRoute(unit_price=250),
    "/meter": SessionRoute(unit_price=UNIT, units=100, metered=True),
    "/stream": SessionRoute(unit_price=TOKEN, unit_type="llm_token", stream=True),
}


class Session(NamedTuple):
    client: SessionClient
    paywall: SessionPaywall
    settler: ChannelSettler
    opener: EoaChannelOpener
    rpc: Rpc
    payee: str
    payer: str
    escrow: str
    usdc: str
    store: PaymentStore

    async def balance(self, who: str) -> int:
        abi = ContractAbi(escrow_artifact("TestUSDC").abi)
        (out,) = abi.decode("balanceOf", await self.rpc.call(self.usdc, abi.encode("balanceOf", who)))
        return int(out)


async def _funded(rpc: Rpc, devnet: DevnetState, usdc: int) -> str:
    key = "0x" + os.urandom(32).hex()
    address = LocalSigner(key).address
    await rpc.request("anvil_setBalance", [address, hex(10**20)])
    if usdc:
        abi = ContractAbi(escrow_artifact("TestUSDC").abi)
        minter = TxSender(rpc, devnet.deployer.private_key, chain_id=devnet.chain_id)
        await minter.transact(devnet.contracts["usdc"], abi.encode("mint", address, usdc), gas=100_000)
    return key


@asynccontextmanager
async def session(
    devnet: DevnetState,
    *,
    deposit: int = 1_000_000,
    settle_every: int = 0,
    max_step: int = 10_000,
    served: bool = False,
    payee_usdc: int = 0,
    store: PaymentStore | None = None,
    policy: SpendPolicy | None = None,
    **kw: Any,
) -> AsyncIterator[Session]:
    rpc = Rpc(devnet.rpc_url)
    try:
        escrow = await deploy_contract(rpc, devnet.deployer.private_key, escrow_artifact("AgentChannels"))
        payee_key, payer_key = (
            await _funded(rpc, devnet, payee_usdc),
            await _funded(rpc, devnet, 10 * deposit),
        )
        payee = TxSender(rpc, payee_key, chain_id=devnet.chain_id)
        chain = AgentChannelsChain(rpc, escrow, chain_id=devnet.chain_id, sender=payee)
        store = store if store is not None else MemoryStore()
        settler = ChannelSettler(store, chain)
        asset = Asset(
            address=devnet.contracts["usdc"],
            chain_id=devnet.chain_id,
            name=devnet.usdc_name,
            version=devnet.usdc_version,
        )
        paywall = SessionPaywall(
            app(),
            routes=ROUTES,
            chain=chain,
            asset=asset,
            pay_to=payee.address,
            store=store,
            secret=b"s" * 32,
            settler=settler,
            settle_every=settle_every,
            **kw,
        )
        payer = TxSender(rpc, payer_key, chain_id=devnet.chain_id)
        opener = EoaChannelOpener(payer, devnet.contracts["usdc"])
        async with contextlib.AsyncExitStack() as stack:
            if served:  # a real server: httpx's ASGITransport buffers whole responses, so no live stream
                base = await stack.enter_async_context(serving(lambda base: paywall))
                http = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30))
            else:
                http = await stack.enter_async_context(
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=paywall), base_url="http://svc")
                )
            client = SessionClient(
                http,
                signer=LocalSigner.random(),
                opener=opener,
                deposit=deposit,
                max_voucher_step=max_step,
                policy=policy,
            )
            yield Session(
                client,
                paywall,
                settler,
                opener,
                rpc,
                payee.address,
                payer.address,
                escrow,
                devnet.contracts["usdc"],
                store,
            )
    finally:
        await rpc.aclose()


def restarted(s: Session, store: PaymentStore) -> SessionPaywall:
    """A gateway started again: a new paywall over the same store and chain, nothing in memory."""
    return SessionPaywall(
        app(),
        routes=ROUTES,
        chain=s.paywall.chain,
        asset=s.paywall.asset,
        pay_to=s.payee,
        store=store,
        secret=b"s" * 32,
    )
