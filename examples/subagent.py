"""A paid sub-agent: a small Starlette API behind the agentpay paywall, settling on a devnet.

    python -m examples.subagent --devnet .agentpay/devnet.json --port 8402
    python -m examples.subagent --devnet FILE --store postgresql://host/db?schema=a --settle deferred

Routes (prices in TestUSDC, paid to devnet account 2 by default):

    GET  /hello            $0.001
    GET  /weather?city=X   $0.002
    POST /summarize        $0.0001 per started 100 characters of `text` (priced from the request body)
    GET  /health           free
    GET  /metered?units=N  usage-priced: at most $0.01, charged $0.0001 x N (N = 0..100)
    GET  /stream?tokens=N  Server-Sent Events, $0.00001 per token (N = 1..100000)

`/stream` is paid over an MPP session (`evm/session`): the payer opens a channel on the devnet's
AgentChannels once and then sends a signed cumulative voucher per request (no transaction per call); the
payee settles every `--settle-every` and when the payer closes the channel. `/metered` is offered over the
session too, and per call in the same 402: x402 `upto` (Permit2, when the devnet has it) and metered
`escrow` (when `--schemes` names it). Whichever way it is paid, the payer signs the $0.01 maximum and is
charged what the handler reports with `charge()`.

Every priced route answers an unpaid request with one 402 that offers x402 v2, x402 v1 and MPP at once, for
the schemes in `--schemes` (default `exact`; `exact,escrow` adds session-key payments through the escrow).

Settlement: `--settle before-response` (default) settles each payment before its response; `deferred`
queues it and the middleware's settlers batch the transactions. Either way the middleware runs recovery at
start and in the background: what a crashed process left in the store is finished from the chain, and never
sent twice. Several processes may share one PostgreSQL store (replicas); each must then settle with its own
`--relayer` key, since a relayer counts its account nonce in process. `agentpay settlements --store URL`
shows what is pending.

Test-only: `AGENTPAY_FAULT=after_verify|after_handler|after_send` makes the process SIGKILL itself at that
point.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import socket
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from escrow import AgentEscrow, Chain, DevnetState, Rpc, TxSender
from gateway import (
    PaidRoute,
    PaymentMiddleware,
    SessionPaywall,
    SessionRoute,
    SettlementOptions,
    billed_sse,
    charge,
)

from ._discovery import DISCOVERY

__all__ = [
    "METERED",
    "PRICES",
    "SESSION_ROUTES",
    "allow_metered_settler",
    "build_app",
    "main",
    "with_sessions",
]

PRICES = {"GET /hello": "$0.001", "GET /weather": "$0.002"}
#: Fixed prices are paid in full: `upto` (for usage prices) is offered on /metered only.
FIXED = ("exact", "escrow")
UNIT_PRICE = Decimal("0.0001")  # /metered, per unit
#: /metered per call: the payer signs the maximum (100 units), the handler's `charge()` sets what is paid.
METERED = PaidRoute(
    price=UNIT_PRICE * 100, metered=True, schemes=("upto", "escrow"), description="$0.0001 per unit used"
)
#: Paid over an MPP session: a call to /metered holds at most 100 units ($0.01), is charged what it used.
SESSION_ROUTES = {
    "/metered": SessionRoute(unit_price=UNIT_PRICE, units=100, metered=True),
    "/stream": SessionRoute(unit_price="$0.00001", unit_type="llm_token", stream=True),
}


async def hello(request: Request) -> Response:
    return JSONResponse({"message": "hello, orchestrator", "paid": True})


async def weather(request: Request) -> Response:
    city = request.query_params.get("city", "Lisbon")
    return JSONResponse({"city": city, "forecast": "sunny", "celsius": 21})


async def summarize(request: Request) -> Response:
    text = str((await request.json()).get("text", ""))
    return JSONResponse({"summary": text[:60] + ("..." if len(text) > 60 else ""), "chars": len(text)})


def _count(request: Request, name: str, low: int, high: int) -> int | None:
    text = request.query_params.get(name, str(low))
    ok = text.isascii() and text.isdigit() and len(text) <= 18  # "²".isdigit() is true, int() refuses it
    return int(text) if ok and low <= int(text) <= high else None


def _bad(name: str, low: int, high: int) -> Response:
    body = {"type": "about:blank", "title": "bad request", "status": 400, "detail": f"{name}: {low}..{high}"}
    return JSONResponse(body, status_code=400, media_type="application/problem+json")


async def metered(request: Request) -> Response:
    units = _count(request, "units", 0, 100)
    if units is None:
        return _bad("units", 0, 100)
    charge(request, units * UNIT_PRICE)  # the actual charge, known after the work
    return JSONResponse({"units": units, "charged": str(units * UNIT_PRICE)})


async def _tokens(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield f"token-{i}"


async def stream(request: Request) -> Response:
    tokens = _count(request, "tokens", 1, 100_000)
    if tokens is None:
        return _bad("tokens", 1, 100_000)
    return StreamingResponse(billed_sse(request, _tokens(tokens)), media_type="text/event-stream")


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def summarize_price(request: Request) -> str:
    """$0.0001 per started 100 characters, at least one unit."""
    text = str((await request.json()).get("text", ""))
    units = max(1, math.ceil(len(text) / 100))
    return f"${units * 0.0001:.4f}"


# The sub-agent itself: its API, its prices, the paywall. Everything below is command-line plumbing.
def build_app(chain: Chain, *, pay_to: str, **options: Any) -> PaymentMiddleware:
    """The paid API on `chain`, paying `pay_to`; `options` go to `PaymentMiddleware` (store, settle, ...)."""
    api = Starlette(
        routes=[
            Route("/hello", hello),
            Route("/weather", weather),
            Route("/summarize", summarize, methods=["POST"]),
            Route("/health", health),
            Route("/metered", metered),
            Route("/stream", stream, methods=["GET", "POST"]),  # POST: vouchers while a stream runs
        ]
    )
    routes = {key: PaidRoute(price=price, schemes=FIXED) for key, price in PRICES.items()}
    routes["POST /summarize"] = PaidRoute(
        price=summarize_price, description="Summarize a text", schemes=FIXED
    )
    schemes = options.get("schemes") or (["escrow"] if chain.network.escrow else [])
    if {"escrow", "upto"} & set(schemes):  # /metered per call needs a scheme that settles for less
        routes["GET /metered"] = METERED
    return PaymentMiddleware(api, routes=routes, chain=chain, pay_to=pay_to, discovery=DISCOVERY, **options)


def with_sessions(
    app: ASGIApp, chain: Chain, *, channels: str, payee_key: str, secret: str, settle_every: str = "$0.05"
) -> SessionPaywall:
    """`/metered` and `/stream` paid over MPP sessions on the AgentChannels at `channels` (`/metered` is
    then offered in one 402 with the per-call schemes `app` prices it in)."""
    return SessionPaywall.on_chain(
        app,
        chain,
        channels=channels,
        payee_key=payee_key,
        routes=SESSION_ROUTES,
        secret=secret,
        settle_every=settle_every,
    )


async def allow_metered_settler(chain: Chain, payee_key: str) -> None:
    """The payee lets `chain`'s relayer settle its metered escrow payments below their maximum (once;
    AgentEscrow pays less than signed only to a payee's own settler)."""
    rpc = Rpc(chain.network.rpc_url)  # the caller's event loop, not the one the server will run
    try:
        escrow = AgentEscrow(rpc, chain.network.escrow)
        payee = TxSender(rpc, payee_key, chain_id=chain.network.chain_id)
        if not await escrow.is_settler(payee.address, chain.relayer.address):
            data = escrow.set_settler_calldata(chain.relayer.address, True)
            await payee.transact(escrow.address, data, gas=100_000)
    finally:
        await rpc.aclose()


def _index_or(value: str) -> int | str:
    return value if value.startswith("0x") else int(value)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devnet", required=True, help="devnet state file (agentpay devnet up writes one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8402)
    parser.add_argument("--fd", type=int, default=None, help="serve on this inherited listening socket")
    parser.add_argument("--payee", default="2", help="devnet account index (or 0x address) that gets paid")
    parser.add_argument(
        "--relayer", default="3", help="devnet account index (or 0x private key, devnets only) paying gas"
    )
    parser.add_argument(
        "--store",
        default=None,
        help="payment store URL (default: $AGENTPAY_STORE, else sqlite:///.agentpay/payments.db)",
    )
    parser.add_argument("--settle", choices=["before-response", "deferred"], default="before-response")
    parser.add_argument(
        "--schemes",
        default="exact",
        help="comma-separated: exact, escrow (default: exact); upto is added when the devnet has Permit2",
    )
    parser.add_argument("--rpc", default=None, help="JSON-RPC URL for verification (default: the devnet's)")
    parser.add_argument("--settle-rpc", default=None, help="JSON-RPC URL for settlement (default: --rpc)")
    parser.add_argument(
        "--mpp-strict", action="store_true", help="refuse pympp 0.16's non-standard MPP nonce"
    )
    knobs = parser.add_argument_group("settlement tuning (seconds)")
    knobs.add_argument("--claim-ttl", type=float, default=300.0, dest="claim_ttl")
    defaults = SettlementOptions()
    tuned = [name for name in SettlementOptions.__struct_fields__ if name != "credit_limit"]
    for name in tuned:
        kind = int if name == "batch_size" else float
        flag = "--" + name.replace("_", "-")
        knobs.add_argument(flag, type=kind, default=getattr(defaults, name), dest=name)
    args = parser.parse_args(argv)
    chain = Chain.from_devnet(
        args.devnet, relayer=_index_or(args.relayer), rpc_url=args.rpc, settle_rpc_url=args.settle_rpc
    )
    payee = _index_or(args.payee)
    pay_to = chain.accounts[payee].address if isinstance(payee, int) else payee
    devnet = DevnetState.load(args.devnet)
    schemes = [name.strip() for name in args.schemes.split(",") if name.strip()]
    if "permit2" in devnet.contracts and "upto" not in schemes:
        schemes.append("upto")
    app = build_app(
        chain,
        pay_to=pay_to,
        schemes=schemes,
        store=args.store,
        settle=args.settle,
        claim_ttl=args.claim_ttl,
        settlement=SettlementOptions(**{name: getattr(args, name) for name in tuned}),
        mpp_strict=args.mpp_strict,
    )
    if "escrow" in schemes and isinstance(payee, int):
        asyncio.run(allow_metered_settler(chain, chain.accounts[payee].private_key))
    served: ASGIApp = app
    if "channels" in devnet.contracts and isinstance(payee, int):
        served = with_sessions(
            app,
            chain,
            channels=devnet.contracts["channels"],
            payee_key=chain.accounts[payee].private_key,
            secret=os.environ.get("AGENTPAY_SESSION_SECRET") or secrets.token_hex(32),
        )
    where = f"fd {args.fd}" if args.fd is not None else f"http://{args.host}:{args.port}"
    print(f"sub-agent: paid API on {where} (payee {pay_to}, settle {args.settle})", flush=True)
    if args.fd is not None:
        # The inherited socket as a socket of its own family: uvicorn's `fd=` assumes a UNIX socket, which on
        # TCP leaves Nagle on and makes every keep-alive response wait ~40 ms for the client's delayed ACK.
        inherited = socket.socket(fileno=args.fd)
        uvicorn.Server(uvicorn.Config(served, log_level="warning")).run(sockets=[inherited])
    else:
        uvicorn.run(served, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
