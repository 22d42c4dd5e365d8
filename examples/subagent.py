"""A paid sub-agent: a small Starlette API behind the agentpay paywall, settling on a devnet.

    python -m examples.subagent --devnet .agentpay/devnet.json --port 8402
    python -m examples.subagent --devnet FILE --store postgresql://host/db?schema=a --settle deferred

Routes (prices in TestUSDC, paid to devnet account 2 by default):

    GET  /hello            $0.001
    GET  /weather?city=X   $0.002
    POST /summarize        $0.0001 per started 100 characters of `text` (priced from the request body)
    GET  /health           free

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
import math
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import Chain
from gateway import PaidRoute, PaymentMiddleware, SettlementOptions

from ._discovery import DISCOVERY

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


# The sub-agent itself: its API, its prices, the paywall. Everything below is command-line plumbing.
def build_app(chain: Chain, *, pay_to: str, **options: Any) -> PaymentMiddleware:
    """The paid API on `chain`, paying `pay_to`; `options` go to `PaymentMiddleware` (store, settle, ...)."""
    api = Starlette(
        routes=[
            Route("/hello", hello),
            Route("/weather", weather),
            Route("/summarize", summarize, methods=["POST"]),
            Route("/health", health),
        ]
    )
    summarize_route = PaidRoute(price=summarize_price, description="Summarize a text")
    routes: dict[str, PaidRoute | str] = {**PRICES, "POST /summarize": summarize_route}
    return PaymentMiddleware(api, routes=routes, chain=chain, pay_to=pay_to, discovery=DISCOVERY, **options)


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
    parser.add_argument("--schemes", default="exact", help="comma-separated: exact, escrow (default: exact)")
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
    app = build_app(
        chain,
        pay_to=pay_to,
        schemes=[name.strip() for name in args.schemes.split(",") if name.strip()],
        store=args.store,
        settle=args.settle,
        claim_ttl=args.claim_ttl,
        settlement=SettlementOptions(**{name: getattr(args, name) for name in tuned}),
        mpp_strict=args.mpp_strict,
    )
    where = f"fd {args.fd}" if args.fd is not None else f"http://{args.host}:{args.port}"
    print(f"sub-agent: paid API on {where} (payee {pay_to}, settle {args.settle})", flush=True)
    if args.fd is not None:
        uvicorn.run(app, fd=args.fd, log_level="warning")
    else:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
