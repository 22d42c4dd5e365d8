"""A paid sub-agent: a small Starlette API behind the agentpay paywall, settling on a devnet.

    python -m examples.subagent --devnet .agentpay/devnet.json --port 8402
    python -m examples.subagent --devnet FILE --store postgresql://host/db?schema=a --settle deferred

Routes (prices in TestUSDC, paid to devnet account 2 by default):

    GET  /hello            $0.001
    GET  /weather?city=X   $0.002
    POST /summarize        $0.0001 per started 100 characters of `text` (priced from the request body)
    GET  /health           free

Every priced route answers an unpaid request with one 402 that offers x402 v2, x402 v1 and MPP at once.

Settlement: `--settle before-response` (default) settles each payment before its response; `deferred`
queues it and the process's `ExactSettler` batches the transfers. Either way the process runs recovery at
start and in the background (`gateway._recovery.Recovery`): what a crashed process left in the store is
finished from the chain, and never sent twice. Several processes may share one PostgreSQL store (replicas);
each must then settle with its own `--relayer` key, since a relayer counts its account nonce in process.
`agentpay settlements --store URL` shows what is pending.

Test-only: `AGENTPAY_FAULT=after_verify|after_handler|after_send` makes the process SIGKILL itself at that
point (see `escrow._exact_settler.fault_point`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import AsyncIterator

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import DevnetState
from escrow._exact import ExactEvm
from escrow._exact_settler import ExactSettler
from escrow._rpc import Rpc, TxSender
from gateway import Asset, ExactScheme, PaidRoute, PaymentMiddleware, PaymentStore, SettleMode
from gateway._recovery import Recovery

from ._discovery import DISCOVERY

__all__ = ["PRICES", "Tuning", "build_app", "main"]

PRICES = {"GET /hello": "$0.001", "GET /weather": "$0.002"}


class Tuning(msgspec.Struct, frozen=True, kw_only=True):
    """Settlement knobs (tests shorten the times; the defaults suit a real chain)."""

    claim_ttl: float = 300.0  # replay claim of a payment in progress; > handler time + one settlement
    lease_seconds: float = 120.0  # a settler's hold on a batch; after it, a crashed settler's work is retried
    batch_size: int = 64  # transfers per settler batch
    max_age: float = 0.5  # the longest a queued payment waits for its batch to fill
    retry_cap: float = 60.0  # longest backoff between retries while the chain is unreachable
    recover_every: float = 5.0  # how often open in-flight records are reconciled


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
    rpc_url: str | None = None,
    settle_rpc_url: str | None = None,
    tuning: Tuning | None = None,
) -> PaymentMiddleware:
    """The sub-agent's app for a devnet: `payee` gets the money, `relayer_key` pays the settlement gas.

    `store` is a store object or URL (`sqlite:///payments.db`, ...), opened when the app starts.
    `pympp_compat` also accepts pympp 0.16's non-standard EIP-3009 nonce for MPP credentials.
    `rpc_url` serves verification, `settle_rpc_url` the relayer and the settler (both default to the
    devnet's node).
    """
    tuning = tuning or Tuning()
    rpc = Rpc(rpc_url or state.rpc_url)
    settle_rpc = rpc if settle_rpc_url in (None, rpc.url) else Rpc(settle_rpc_url or "")
    relayer = TxSender(settle_rpc, relayer_key or state.accounts[3].private_key, chain_id=state.chain_id)
    exact = ExactEvm(rpc, relayer)
    asset = Asset(
        address=state.contracts["usdc"],
        chain_id=state.chain_id,
        name=state.usdc_name,
        version=state.usdc_version,
        decimals=state.usdc_decimals,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        active = await paid.open_store()  # a URL was opened by the middleware at lifespan startup
        # One settler drains the deferred queue (also under before-response: leftovers of an earlier run)
        # and closes the in-flight records of payments settled before their response.
        settler = ExactSettler(
            active,
            exact,
            batch_size=tuning.batch_size,
            max_age=tuning.max_age,
            lease_seconds=tuning.lease_seconds,
            retry_cap=tuning.retry_cap,
        )
        recovery = Recovery(
            active,
            settlers=[settler],
            reconcilers={"exact": settler},
            claim_ttl=tuning.claim_ttl,
            interval=tuning.recover_every,
        )
        await recovery.start()
        try:
            yield
        finally:
            await recovery.stop()
            if settle_rpc is not rpc:
                await settle_rpc.aclose()
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
        schemes=[ExactScheme(exact)],
        pay_to=payee or state.accounts[2].address,
        asset=asset,
        store=store,
        settle=settle,
        claim_ttl=tuning.claim_ttl,
        accept_pympp_challenge_hash=pympp_compat,
        discovery=DISCOVERY,  # /openapi.json, /llms.txt, /discovery/resources
    )
    return paid


def _payee(state: DevnetState, value: str) -> str:
    return value if value.startswith("0x") else state.accounts[int(value)].address


def _relayer(state: DevnetState, value: str) -> str:
    return value if value.startswith("0x") else state.accounts[int(value)].private_key


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
    parser.add_argument("--rpc", default=None, help="JSON-RPC URL for verification (default: the devnet's)")
    parser.add_argument("--settle-rpc", default=None, help="JSON-RPC URL for settlement (default: --rpc)")
    parser.add_argument(
        "--pympp-compat", action="store_true", help="accept pympp 0.16's non-standard MPP nonce too"
    )
    knobs = parser.add_argument_group("settlement tuning (seconds)")
    defaults = Tuning()
    for name in Tuning.__struct_fields__:
        kind = int if name == "batch_size" else float
        flag = "--" + name.replace("_", "-")
        knobs.add_argument(flag, type=kind, default=getattr(defaults, name), dest=name)
    args = parser.parse_args(argv)
    state = DevnetState.load(args.devnet)
    tuning = Tuning(**{name: getattr(args, name) for name in Tuning.__struct_fields__})
    payee = _payee(state, args.payee)
    app = build_app(
        state,
        payee=payee,
        relayer_key=_relayer(state, args.relayer),
        store=args.store,
        settle=args.settle,
        pympp_compat=args.pympp_compat,
        rpc_url=args.rpc,
        settle_rpc_url=args.settle_rpc,
        tuning=tuning,
    )
    where = f"fd {args.fd}" if args.fd is not None else f"http://{args.host}:{args.port}"
    print(f"sub-agent: paid API on {where} (payee {payee}, settle {args.settle})", flush=True)
    if args.fd is not None:
        uvicorn.run(app, fd=args.fd, log_level="warning")
    else:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
