"""A paid sub-agent: a small Starlette API behind the agentpay paywall, settling on a devnet.

    python -m examples.subagent --devnet .agentpay/devnet.json --port 8402

Routes (prices in TestUSDC, paid to devnet account 2 by default):

    GET  /hello            $0.001
    GET  /weather?city=X   $0.002
    POST /summarize        $0.0001 per started 100 characters of `text` (priced from the request body)
    GET  /health           free

Every priced route answers an unpaid request with one 402 that offers x402 v2, x402 v1 and MPP at once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import DevnetState
from escrow._exact import ExactEvm
from escrow._rpc import Rpc, TxSender
from gateway import Asset, ExactScheme, PaidRoute, PaymentMiddleware, PaymentStore, SettleMode, open_store

__all__ = ["PRICES", "build_app", "main"]

PRICES = {"GET /hello": "$0.001", "GET /weather": "$0.002"}


async def hello(request: Request) -> Response:
    return JSONResponse({"message": "hello, orchestrator", "paid": True})


async def weather(request: Request) -> Response:
    city = request.query_params.get("city", "Lisbon")
    return JSONResponse({"city": city, "forecast": "sunny", "celsius": 21})


async def summarize(request: Request) -> Response:
    text = str((await request.json()).get("text", ""))
    return JSONResponse({"summary": text[:60] + ("..." if len(text) > 60 else ""), "chars": len(text)})


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def summarize_price(request: Request) -> str:
    """$0.0001 per started 100 characters, at least one unit."""
    text = str((await request.json()).get("text", ""))
    units = max(1, math.ceil(len(text) / 100))
    return f"${units * 0.0001:.4f}"


def build_app(
    state: DevnetState,
    *,
    payee: str | None = None,
    relayer_key: str | None = None,
    store: PaymentStore | str | None = None,
    settle: SettleMode = "before-response",
    pympp_compat: bool = False,
) -> PaymentMiddleware:
    """The sub-agent's app for a devnet: `payee` gets the money, `relayer_key` pays the settlement gas.

    `store` is a store object or URL (`sqlite:///payments.db`, ...), opened when the app starts.
    `pympp_compat` also accepts pympp 0.16's non-standard EIP-3009 nonce for MPP credentials.
    """
    rpc = Rpc(state.rpc_url)
    relayer = TxSender(rpc, relayer_key or state.accounts[3].private_key, chain_id=state.chain_id)
    asset = Asset(
        address=state.contracts["usdc"],
        chain_id=state.chain_id,
        name=state.usdc_name,
        version=state.usdc_version,
        decimals=state.usdc_decimals,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        opened = await open_store(store) if isinstance(store, str) else None
        if opened is not None:
            paid.paywall.store = opened
        try:
            yield
        finally:
            if opened is not None:
                await opened.close()
            await rpc.aclose()

    api = Starlette(
        routes=[
            Route("/hello", hello),
            Route("/weather", weather),
            Route("/summarize", summarize, methods=["POST"]),
            Route("/health", health),
        ],
        lifespan=lifespan,
    )
    paid = PaymentMiddleware(
        api,
        routes={
            **PRICES,
            "POST /summarize": PaidRoute(price=summarize_price, description="Summarize a text"),
        },
        schemes=[ExactScheme(ExactEvm(rpc, relayer))],
        pay_to=payee or state.accounts[2].address,
        asset=asset,
        store=None if isinstance(store, str) else store,
        settle=settle,
        accept_pympp_challenge_hash=pympp_compat,
    )
    return paid


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devnet", required=True, help="devnet state file (agentpay devnet up writes one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8402)
    parser.add_argument("--payee", type=int, default=2, help="devnet account index that gets paid")
    parser.add_argument(
        "--relayer", type=int, default=3, help="devnet account index that pays settlement gas"
    )
    parser.add_argument("--store", default=None, help="payment store URL (default: in memory)")
    parser.add_argument(
        "--pympp-compat", action="store_true", help="accept pympp 0.16's non-standard MPP nonce too"
    )
    args = parser.parse_args(argv)
    state = DevnetState.load(args.devnet)
    app = build_app(
        state,
        payee=state.accounts[args.payee].address,
        relayer_key=state.accounts[args.relayer].private_key,
        store=args.store,
        pympp_compat=args.pympp_compat,
    )
    print(
        f"sub-agent: paid API on http://{args.host}:{args.port} (payee {state.accounts[args.payee].address})"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
